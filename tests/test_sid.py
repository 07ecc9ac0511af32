"""SiD (section 5.3 of the notes "Distilled Diffusion Models"): the 1-D Gaussian argument of 5.3.1 on the code's loss, the signs of
the two terms of Eq. (83), the generator-loss noise range, and the toy distillation."""
import math
import pytest
import torch
import sid
from conftest import matches_mixture, run, toy_metrics

def gaussian_1d(theta, sigma, n=4096, dim=1, seed=0):
    """The notes, 5.3.1: data N(0, 1), generator G_theta = theta + z ~ N(theta, 1), x_t = G + sigma eps, and
    the exact denoisers x_psi(x_t) = x_t / (1 + s^2) (teacher) and x_phi(x_t) = (x_t + phi s^2) / (1 + s^2)
    (fake), with phi tied to theta (phi*(theta) = theta) but held fixed: phi = theta.detach()."""
    g = torch.Generator().manual_seed(seed)
    x = theta + torch.randn(n, dim, generator=g)
    x_t = x + sigma * torch.randn(n, dim, generator=g)
    return x, x_t / (1 + sigma ** 2), (x_t + theta.detach() * sigma ** 2) / (1 + sigma ** 2)

def grad(loss, theta):
    return torch.autograd.grad(loss, theta, retain_graph=True)[0].item()

def test_L1_gives_no_gradient_but_eq83_moves_theta_to_the_data():
    for th in (1.5, -0.7):
        for sigma in (0.3, 1.0, 2.5):
            theta = torch.tensor(th, requires_grad=True)
            x, D_real, D_fake = gaussian_1d(theta, sigma)
            L1 = (D_fake - D_real).pow(2).sum(1).mean()                          # Eq. (73)
            assert abs(L1.item() - (th * sigma ** 2 / (1 + sigma ** 2)) ** 2) < 1e-5  # Eq. (76), squared
            assert abs(grad(L1, theta)) < 1e-6                                   # no signal for theta
            # The code's Eq. (83): d/dtheta = theta s^4 / (1 + s^2)^2 * mean(1 / w), w = |G - x_psi|; alpha's term adds 0.
            w = (x - D_real).abs().clamp_min(1e-5).detach()
            expect = th * sigma ** 4 / (1 + sigma ** 2) ** 2 * (1 / w).mean().item()
            for alpha in (0.0, 1.2):
                g = grad(sid.sid_loss(x, D_real, D_fake, alpha), theta)
                assert abs(g - expect) < 1e-4 * abs(expect) and g * th > 0       # descent moves theta toward 0
            boxed = ((D_fake - D_real) * (D_real - x) / w).mean()                # the notes' boxed sign of the first term
            assert grad(boxed, theta) * th < 0                                   # would move theta away from the data

def test_eq83_descent_reaches_the_data_mean():
    theta = torch.tensor(2.0, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.05)
    for i in range(300):                                                         # phi re-tied to theta every step
        loss = sid.sid_loss(*gaussian_1d(theta, sigma=1.0, n=1024, seed=i), alpha=1.2)
        opt.zero_grad(); loss.backward(); opt.step()
    assert abs(theta.item()) < 0.1

def test_alpha_zero_is_the_first_term_and_alpha_enters_linearly():
    g = torch.Generator().manual_seed(0)
    x, D_real, D_fake = (torch.randn(4, 3, 8, 8, generator=g) for _ in range(3))
    w = (x - D_real).abs().mean((1, 2, 3), keepdim=True)
    first = ((D_real - D_fake) * (D_real - x) / w).sum((1, 2, 3)).mean()
    sq = ((D_real - D_fake) ** 2 / w).sum((1, 2, 3)).mean()
    torch.testing.assert_close(sid.sid_loss(x, D_real, D_fake, 0.0), first)
    for alpha in (0.5, 1.2):
        torch.testing.assert_close(sid.sid_loss(x, D_real, D_fake, alpha), first - alpha * sq)

def test_signs_of_both_terms_on_the_score_identity():
    """With the exact fake denoiser, E[(x_psi - x_phi)^T (x_psi - G)] = E||x_psi - x_phi||^2 (Eq. 79-81), so
    Eq. (83) = (1 - alpha) E||delta||^2 / w: positive for alpha = 0, negative for alpha = 1.2. 2048-dim
    Gaussian so that the per-sample normaliser w is nearly constant."""
    theta, sigma = torch.tensor(1.0), 1.0
    x, D_real, D_fake = gaussian_1d(theta, sigma, n=256, dim=2048)
    w = (x - D_real).abs().mean(1, keepdim=True)
    ref = ((D_real - D_fake) ** 2 / w).sum(1).mean()                             # E||delta||^2 / w > 0
    for alpha in (0.0, 1.2):
        assert abs(sid.sid_loss(x, D_real, D_fake, alpha) / ref - (1 - alpha)) < 0.02

def test_generator_noise_range_matches_official_tmax():
    # official: t ~ U[0, tmax/1000], sigma = (max^(1/rho) + (1 - t)(min^(1/rho) - max^(1/rho)))^rho = karras(1 - t)
    s = sid.sample_sigma(100000, 'cpu', u_min=1 - 800 / 1000, u_max=1.0)
    assert s.min() >= 0.002 - 1e-6 and s.max() <= 24.42 and s.max() > 23
    assert abs(sid.karras(torch.tensor(0.2)).item() - 24.41) < 0.01
    r = run('sid', '--tmax', '1001')
    assert r.returncode == 2 and 'Traceback' not in r.stderr and '--tmax' in r.stderr

def test_toy_distillation_matches_mixture(tmp_path, toy_teacher):
    z = torch.randn(10000, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): untrained = sid.GaussianMixture2D().metrics(sid.generate(toy_teacher, z, sigma=2.5))
    assert not matches_mixture(untrained), untrained                              # the check can fail
    m = toy_metrics('sid', tmp_path / 'toy')
    assert matches_mixture(m), m

def test_augment_p0_is_the_identity_with_zero_labels():
    x = torch.randn(8, 3, 32, 32)
    y, labels = sid.augment(x, 0.0)
    assert torch.allclose(y, x, atol=1e-5) and labels.shape == (8, 9) and not labels.any()

def test_augment_transforms_are_exact_and_labelled():
    """EDM's AugmentPipe semantics on a test image: flips, rotations by 90 degrees and integer translations are exact;
    the 9 labels are [xflip, yflip, scale, cos - 1, sin, aniso cos, aniso sin, tx, ty] of what was applied."""
    torch.manual_seed(0)
    img = torch.rand(1, 3, 16, 16) * 2 - 1
    x = img.expand(4000, -1, -1, -1).contiguous()
    y, L = sid.augment(x, 1.0)                                    # every transform on every sample
    assert set(L[:, 0].tolist()) == {0.0, 1.0} and set(L[:, 1].tolist()) == {0.0, 1.0}
    assert L[:, 0].mean().item() == pytest.approx(0.5, abs=0.05)
    torch.testing.assert_close((L[:, 3] + 1) ** 2 + L[:, 4] ** 2, torch.ones(4000))   # cos and sin of one angle
    y, L = sid.augment(x, 0.12)
    assert L[:, 0].mean().item() == pytest.approx(0.5, abs=0.05)                    # xflip: 1e8 p, then a coin
    assert (L[:, 2] != 0).float().mean().item() == pytest.approx(0.12, abs=0.03)     # scale picked with p
    plain = L[:, 1:].abs().sum(1) == 0                                               # only x-flipped, or nothing
    torch.testing.assert_close(y[plain & (L[:, 0] == 0)], x[plain & (L[:, 0] == 0)], atol=1e-5, rtol=0)
    torch.testing.assert_close(y[plain & (L[:, 0] == 1)], x[plain & (L[:, 0] == 1)].flip(3), atol=1e-5, rtol=0)

def test_augment_geometry_is_exact():
    """sid.transform with given draws: flips, rotations by 90 degrees and integer shifts move pixels exactly; a rotation
    by +90 degrees is the y-down rotation EDM's matrices make (output (u, v) samples input (-v, u))."""
    img = torch.rand(1, 2, 16, 16)
    zero, one, zeros2 = torch.zeros(1), torch.ones(1), torch.zeros(1, 2)
    def T(xflip=zero, yflip=zero, scale=zero, rot=zero, aniso=zero, r=zero, t=zeros2):
        return sid.transform(img, xflip, yflip, scale, rot, aniso, r, t)
    close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    close(T(), img)
    close(T(xflip=one), img.flip(3))
    close(T(yflip=one), img.flip(2))
    close(T(xflip=one, yflip=one), img.flip(2).flip(3))
    close(T(rot=torch.tensor([math.pi / 2])), torch.rot90(img, 1, (2, 3)))
    close(T(rot=torch.tensor([math.pi])), img.flip(2).flip(3))
    close(T(aniso=one, r=zero), T(aniso=one, r=torch.tensor([math.pi])))   # the aniso axis: r and r + pi agree
    close(T(t=torch.tensor([[0.5, 0.0]]))[..., 1:], img[..., :-1])      # 0.5 x W / 8 = 1 pixel to the right
    close(T(t=torch.tensor([[0.0, 1.0]]))[..., 2:, :], img[..., :-2, :])  # 2 pixels down
    assert not torch.allclose(T(scale=one), img, atol=1e-2)               # a scale moves pixels

def test_augment_resamples_in_fp32_under_bf16_autocast():
    """The pipe runs with autocast off: under bf16 autocast (the CUDA default) an identity draw still returns the image."""
    img, zero = torch.randn(2, 3, 32, 32), torch.zeros(2)
    with torch.autocast('cpu', torch.bfloat16):
        y = sid.transform(img, zero, zero, zero, zero, zero, zero, torch.zeros(2, 2))
    assert y.dtype == torch.float32 and (y - img).abs().max() < 1e-5
