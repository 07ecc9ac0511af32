"""consistency.py: the point-mass consistency function (Eq. 28-42 of the notes "Distilled Diffusion Models") zeroes the CD and CT losses, the
parameterisation meets the boundary condition bit-exactly, the teacher's Heun step has the expected order, and
toy CD matches the mixture in one step (the untrained student does not), with two steps no worse."""
import math, os
import numpy as np
import pytest
import torch
from conftest import exact_denoiser, matches_mixture, toy_metrics
import consistency as cm

EPS = torch.tensor([0.7, -1.3], dtype=torch.float64)          # the point of p_data = delta(x - eps)

def cd_loss(G, G_target, teacher, x0, t_hi, t_lo, huber_c=None):
    """CD's loss as consistency.py's step builds it: x = x0 + t_{n+1} z, x_hat = the teacher's Heun step, cm_loss."""
    x = x0 + cm.as_sigma(t_hi, x0) * torch.randn_like(x0)
    x_hat = cm.heun_step(teacher, x, t_hi, t_lo)
    return cm.cm_loss(G, G_target, x, t_hi, x_hat, t_lo, loss='l2' if huber_c is None else 'huber', huber_c=huber_c)

def ct_loss(G, x0, t_hi, t_lo, huber_c=None):
    """CT's loss as consistency.py's step builds it: x and x_hat share z, the target is G itself."""
    z = torch.randn_like(x0)
    x, x_hat = x0 + cm.as_sigma(t_hi, x0) * z, x0 + cm.as_sigma(t_lo, x0) * z
    return cm.cm_loss(G, G, x, t_hi, x_hat, t_lo, loss='l2' if huber_c is None else 'huber', huber_c=huber_c)

def f_point(theta):
    """Eq. (36): f_theta(x, sigma) = (s_min / sigma) x + (1 - s_min / sigma) theta; theta = eps is the exact
    consistency function of the point mass, Eq. (34)."""
    def f(x, sigma, class_labels=None):
        r = cm.SIGMA_MIN / cm.as_sigma(sigma, x).double()
        return r * x + (1 - r) * theta
    return f

def point_teacher(x, sigma, class_labels=None):                # the exact denoiser of the point mass: E[x0 | x] = eps
    return EPS.expand_as(x).to(x.dtype)

@pytest.mark.parametrize('huber_c', [None, 0.01])
def test_point_mass_consistency_function_zeroes_cd_and_ct_losses(huber_c):
    torch.manual_seed(0)
    x0, f, wrong = EPS.expand(4096, 2), f_point(EPS), f_point(EPS + torch.tensor([0.05, 0.0], dtype=torch.float64))
    for N, lognormal in [(18, False), (1281, True)]:             # CD's grid (Table 3) and iCT's last curriculum stage
        t_hi, t_lo = cm.sigma_pairs(4096, N, 'cpu', lognormal)
        cd, ct = cd_loss(f, f, point_teacher, x0, t_hi, t_lo, huber_c=huber_c), ct_loss(f, x0, t_hi, t_lo, huber_c=huber_c)
        assert cd.item() < 1e-12 and ct.item() < 1e-12, (N, cd, ct)
        # ... and a consistency function that ends at the wrong point does not zero them (the test can fail)
        assert cd_loss(wrong, wrong, point_teacher, x0, t_hi, t_lo, huber_c=huber_c) > 1e-9
        assert ct_loss(wrong, x0, t_hi, t_lo, huber_c=huber_c) > 1e-9

def test_point_mass_ema_target_pins_theta_near_theta_minus():
    """Eq. (38)-(42): on a point mass CD with the exact teacher equals CT (the noise cancels), the loss is the square of
    (1 - m/t_hi) theta - (1 - m/t_lo) theta- + (m/t_hi - m/t_lo) eps, m = s_min; with a fixed EMA target its minimiser
    puts weight ~ m dt / t^2 on eps (why iCT drops the EMA), and with theta- = theta the minimiser is eps."""
    theta, theta_m, m = torch.tensor([0.2, 0.1], dtype=torch.float64), torch.tensor([-0.5, 0.4], dtype=torch.float64), cm.SIGMA_MIN
    x0 = EPS.expand(256, 2)
    t = cm.karras(torch.arange(18, dtype=torch.float64) / 17).float().double()
    for n in (3, 8, 12):                                              # away from sigma_min, where dt << t
        t_hi, t_lo = t[n], t[n + 1]
        cd = cd_loss(f_point(theta), f_point(theta), point_teacher, x0, t_hi, t_lo)
        assert torch.allclose(cd, ct_loss(f_point(theta), x0, t_hi, t_lo), rtol=1e-9)           # Eq. (38)
        r = lambda th, th_m: (1 - m / t_hi) * th - (1 - m / t_lo) * th_m + (m / t_hi - m / t_lo) * EPS
        ema = cd_loss(f_point(theta), f_point(theta_m), point_teacher, x0, t_hi, t_lo)
        assert torch.allclose(ema, r(theta, theta_m).pow(2).mean() / (t_hi - t_lo), rtol=1e-6)   # mean_flat       # Eq. (39)-(41)
        w = (m / t_lo - m / t_hi) / (1 - m / t_hi)                 # the zero of r: theta* = (1 - w) theta- + w eps
        star = (1 - w) * theta_m + w * EPS
        assert cd_loss(f_point(star), f_point(theta_m), point_teacher, x0, t_hi, t_lo) < 1e-20
        assert 0 < w < 2 * m * (t_hi - t_lo) / t_lo ** 2 and w < 1e-2                                # Eq. (42): tiny
        assert torch.allclose(r(EPS, EPS), torch.zeros(2, dtype=torch.float64), atol=1e-15)          # theta- = theta: eps

def test_boundary_condition_is_bit_exact(toy_teacher):
    torch.manual_seed(0)
    edm = cm.EDMPrecond(model_channels=16, num_blocks=1).eval()            # eval: no dropout, as in training
    with torch.no_grad():
        for p in edm.parameters(): p.add_(0.05 * torch.randn_like(p))     # an F far from zero
    for net, shape in [(toy_teacher, (512, 2)), (edm, (3, 3, 32, 32))]:
        f, x = cm.Consistency(net), 3 * torch.randn(shape)
        with torch.no_grad():
            assert torch.equal(f(x, cm.SIGMA_MIN), x)                                    # f(x, sigma_min) == x, Eq. (8)
            sigma = torch.full((shape[0],), cm.SIGMA_MIN); sigma[1:] = 1.0               # per-sample sigma, mixed
            y = f(x, sigma)
            assert torch.equal(y[:1], x[:1]) and not torch.allclose(y[1:], x[1:])
    # F is the network's raw output: the CM combination of SongUNet's F equals the wrapper's output
    x, s = torch.randn(2, 3, 32, 32), torch.tensor([0.5, 7.0])
    c_skip, c_out, c_in, c_noise = cm.edm_precond(cm.as_sigma(s, x), 0.5)
    with torch.no_grad():
        F_raw = edm.model(c_in * x, c_noise.flatten())[0]
        direct = 0.25 / ((cm.as_sigma(s, x) - cm.SIGMA_MIN) ** 2 + 0.25) * x + (cm.as_sigma(s, x) - cm.SIGMA_MIN) * 0.5 / (cm.as_sigma(s, x) ** 2 + 0.25).sqrt() * F_raw
        assert torch.allclose(cm.Consistency(edm)(x, s), direct, atol=1e-4)

def test_heun_step_has_third_order_local_and_second_order_global_error():
    """One heun_step driven by the exact mixture denoiser against a 256-substep reference solve of the PF ODE."""
    mix = cm.GaussianMixture2D()
    denoise = exact_denoiser(mix)
    torch.manual_seed(0)
    x = mix.sample(500).double() + 1.5 * torch.randn(500, 2, dtype=torch.float64)
    def solve(x, t0, t1, steps):
        for i in range(steps): x = cm.heun_step(denoise, x, t0 + (t1 - t0) * i / steps, t0 + (t1 - t0) * (i + 1) / steps)
        return x
    local = [(cm.heun_step(denoise, x, 1.5, 1.5 - h) - solve(x, 1.5, 1.5 - h, 256)).norm(dim=1).mean() for h in (0.25, 0.125, 0.0625)]
    for a, b in zip(local, local[1:]): assert 6 < a / b < 10, local                 # ~h^3 per step: ratio ~8
    ref = solve(x, 1.5, 0.5, 512)
    glob = [(solve(x, 1.5, 0.5, n) - ref).norm(dim=1).mean() for n in (8, 16, 32)]
    for a, b in zip(glob, glob[1:]): assert 3 < a / b < 5, glob                     # ~h^2 over a fixed interval: ratio ~4

def test_ct_curriculum_and_sigma_pairs():
    assert [cm.ct_scales(k, 800) for k in (0, 99, 100, 350, 799)] == [11, 11, 21, 81, 1281]    # 10 -> 1280 in 8 stages
    K_prime = math.floor(1000 / (math.log2(math.floor(150 / 10)) + 1))                # iCT's K' when s1/s0 is no power of 2
    assert K_prime == 203 and [cm.ct_scales(k, 1000, 10, 150) for k in (202, 203, 812)] == [11, 21, 151]
    a, b = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(cm.distance(a, b, 'l2'), ((a - b) ** 2).mean((1, 2, 3)))     # CM's mean_flat
    c = 0.00054 * math.sqrt(192)
    torch.testing.assert_close(cm.distance(a, b, 'huber', c), (((a - b) ** 2).sum((1, 2, 3)) + c * c).sqrt() - c)
    t_hi, t_lo = cm.sigma_pairs(10000, 18, 'cpu')
    grid = cm.karras(torch.arange(18, dtype=torch.float64) / 17).float()
    assert (t_hi > t_lo).all() and torch.isin(t_hi, grid).all() and torch.isin(t_lo, grid).all()
    assert abs(float(t_lo.min()) - cm.SIGMA_MIN) < 1e-6 and float(t_hi.max()) == pytest.approx(cm.SIGMA_MAX)
    t_hi, _ = cm.sigma_pairs(20000, 1281, 'cpu', lognormal=True)                     # iCT: ln sigma ~ N(-1.1, 2^2)
    assert abs(t_hi.log().mean() + 1.1) < 0.1 and abs(t_hi.log().std() - 2.0) < 0.15

def test_toy_cd_matches_mixture_and_two_steps_are_no_worse(tmp_path, toy_teacher):
    out = tmp_path / 'cd'
    m1 = toy_metrics('consistency', out)                                             # the README's command: CD, 1 step
    m2 = toy_metrics('consistency', out, '--eval-only', '--sample-steps', '2', samples='toy_samples_2step.npy')   # 2 steps
    assert cm.GaussianMixture2D().metrics(torch.from_numpy(np.load(out / 'toy_samples.npy'))) == m1   # the run's samples are kept
    assert matches_mixture(m1), m1
    assert m2['mode_tv'] < m1['mode_tv'] + 0.01 and m2['precision'] > m1['precision'] - 0.02, (m1, m2)
    z = torch.randn(10000, 2, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():                                                             # the untrained student fails
        for G in (toy_teacher, cm.Consistency(toy_teacher)):
            m0 = cm.GaussianMixture2D().metrics(cm.generate(G, z))
            assert not matches_mixture(m0), m0
