"""Di-Bregman (arXiv 2510.16983): Table 1's weights against autograd of h, KL = DMD's gradient, the optimal
discriminator's e^{-l} = q/p, the weight's overflow handling, and the toy distillation."""
import copy, json, math
import numpy as np
import pytest
import torch
import dibregman as db
import dmd
from conftest import mode_frequencies, run, toy_runs

# Table 1, column h(r). SBA at lambda = -1 (and 0) is the limit, up to terms affine in r (h'' ignores them).
def h_fn(name, lam=5.0):
    if name == 'sba' and lam == -1: return lambda r: -torch.log(r)
    if name == 'sba' and lam == 0: return lambda r: r * torch.log(r) - r
    return {'lr': lambda r: r * torch.log(r) - (1 + r) * torch.log(1 + r), 'kl': lambda r: r * torch.log(r) - r,
            'be': lambda r: -torch.log(r), 'ls': lambda r: r ** 2 / 2,
            'sba': lambda r: (r ** (1 + lam) - r) / (lam * (lam + 1))}[name]

CASES = [('lr', 5.0), ('kl', 5.0), ('be', 5.0), ('ls', 5.0)] + [('sba', lam) for lam in (-1, 0.5, 1, 3, 5, 10)]

@pytest.mark.parametrize('h,lam', CASES)
def test_table1_weight_is_h2_r_by_autograd(h, lam):
    """log_bregman_weight(l).exp() = h''(r) r at r = e^{-l}, with h'' by double autograd of Table 1's h(r) (float64)."""
    l = torch.linspace(-6, 6, 49, dtype=torch.float64)
    r = torch.exp(-l).requires_grad_(True)
    (d1,) = torch.autograd.grad(h_fn(h, lam)(r).sum(), r, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), r)
    want = d2 * r.detach()
    got = db.log_bregman_weight(l, h, lam).exp()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)

def test_weight_normalisation_cannot_overflow_silently():
    l = torch.tensor([-20.0, -5.0, 0.0, 3.0, 1.0, 1.0, 1.0, 1.0])   # SBA lambda 10: e^{200} overflows float32
    assert torch.isinf(db.sample_weight(l, 'sba', 10.0)).any()
    w = db.sample_weight(l, 'sba', 10.0, group=4)                  # w / mean(w) over each group of 4, in log space
    assert torch.isfinite(w).all() and w.max() <= 4 and w.argmax() == 0
    torch.testing.assert_close(w.reshape(2, 4).mean(1), torch.ones(2))
    torch.testing.assert_close(w[4:], torch.ones(4))               # equal logits in a group: weight 1 each
    x, D = torch.randn(8, 2), torch.randn(8, 2)
    assert not torch.isfinite(db.dibregman_loss(x, D, D + 1, db.sample_weight(l, 'sba', 10.0)))  # -> fit stops

def test_weight_group_must_divide_the_batch():
    cfg = db.get_config(['--data', 'toy', '--batch', '64', '--weight-group', '8'])
    assert cfg.weight_group == 8
    r = run('dibregman', '--data', 'toy', '--batch', '60', '--weight-group', '8')
    assert r.returncode == 2 and 'must be multiples of --weight-group 8' in r.stderr

def tiny_image_net():
    torch.manual_seed(0)
    return db.EDMPrecond(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), dropout=0.0).eval()

@pytest.mark.parametrize('world', ['toy', 'images'])
def test_kl_gradient_equals_dmd(world, toy_teacher):
    """--h kl: the generator's gradient is dmd.dmd_loss's (same G, teacher, psi, noise, inputs); SBA's is not,
    and per sample it is w times DMD's (Eq. 4)."""
    teacher = copy.deepcopy(toy_teacher) if world == 'toy' else tiny_image_net()
    G, psi = copy.deepcopy(teacher).requires_grad_(True), copy.deepcopy(teacher)
    with torch.no_grad():                                          # a psi that differs from the teacher
        for p in psi.parameters(): p.add_(0.05 * torch.randn_like(p))
    shape, B = ((2,), 64) if world == 'toy' else ((3, 32, 32), 4)
    g = torch.Generator().manual_seed(1)
    z, n = torch.randn(B, *shape, generator=g), torch.randn(B, *shape, generator=g)
    sigma = db.as_sigma(db.karras(torch.rand(B, generator=g) * 0.96 + 0.02), n)

    def grads(loss_fn):
        x = db.generate(G, z)
        x_t = x.detach() + sigma * n
        with torch.no_grad():
            D_real = teacher(x_t, sigma)
            l, D_fake = db.disc_logit(psi, x_t, sigma, with_D=True)
        G.zero_grad(); loss_fn(x, D_real, D_fake, l).backward()
        return torch.cat([p.grad.flatten() for p in G.parameters() if p.grad is not None])

    ref = grads(lambda x, Dr, Df, l: dmd.dmd_loss(x, Dr, Df))
    for group in (0, 4):
        got = grads(lambda x, Dr, Df, l: db.dibregman_loss(x, Dr, Df, db.sample_weight(l, 'kl', group=group)))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7 * ref.abs().max().item())
    sba = grads(lambda x, Dr, Df, l: db.dibregman_loss(x, Dr, Df, db.sample_weight(l * 20, 'sba', 5.0, group=4)))
    assert (sba - ref).norm() > 1e-3 * ref.norm()
    x = torch.randn(B, *shape, requires_grad=True)                # Eq. (4) per sample: d/dx = w * DMD's d/dx
    Dr, Df, w = torch.randn(B, *shape), torch.randn(B, *shape), torch.rand(B) * 3
    (gd,) = torch.autograd.grad(dmd.dmd_loss(x, Dr, Df), x)
    (gb,) = torch.autograd.grad(db.dibregman_loss(x, Dr, Df, w), x)
    torch.testing.assert_close(gb, w.reshape(-1, *[1] * len(shape)) * gd)

def test_optimal_discriminator_gives_density_ratio():
    """Two 1-D Gaussians, p (real) = N(0, 1), q (generator) = N(0.5, 0.8^2): the analytic l* = log p/q is the
    minimiser of Eq. (5) (disc_loss), and a logit fitted with disc_loss on samples gives e^{-l} = q/p."""
    p, q = torch.distributions.Normal(0.0, 1.0), torch.distributions.Normal(0.5, 0.8)
    x = torch.linspace(-8, 8, 20001, dtype=torch.float64)
    dx, l_opt = x[1] - x[0], (p.log_prob(x) - q.log_prob(x))
    pw, qw = p.log_prob(x).exp() * dx, q.log_prob(x).exp() * dx    # quadrature weights
    pop = lambda l: (pw * torch.nn.functional.softplus(-l)).sum() + (qw * torch.nn.functional.softplus(l)).sum()
    # disc_loss with sample weights is the population loss; at l* its functional gradient vanishes.
    l = l_opt.clone().requires_grad_(True)
    (gl,) = torch.autograd.grad(pop(l), l)
    assert gl.abs().max() < 1e-10
    for s in (0.3, -0.3, 1.0):
        assert pop(l_opt + s * torch.sin(x)) > pop(l_opt) + 1e-5
    torch.testing.assert_close(db.log_bregman_weight(l_opt, 'ls').exp(), (q.log_prob(x) - p.log_prob(x)).exp())  # r = e^{-l*} = q/p
    # Fit l(x) = a x^2 + b x + c (exact family for Gaussians) with the code's disc_loss on samples.
    g = torch.Generator().manual_seed(0)
    xr, xf = torch.randn(100000, generator=g), 0.5 + 0.8 * torch.randn(100000, generator=g)
    coef = torch.zeros(3, requires_grad=True)
    logit = lambda x: coef[0] * x ** 2 + coef[1] * x + coef[2]
    opt = torch.optim.LBFGS([coef], max_iter=200, line_search_fn='strong_wolfe')
    def closure():
        opt.zero_grad(); loss = db.disc_loss(logit(xr), logit(xf)); loss.backward(); return loss
    opt.step(closure)
    xs = torch.linspace(-2, 2, 41)
    with torch.no_grad():
        r_hat, r_true = db.log_bregman_weight(logit(xs), 'ls').exp(), (q.log_prob(xs) - p.log_prob(xs)).exp()
    assert ((r_hat / r_true).log().abs().max() < 0.05), (r_hat, r_true)

def test_disc_logit_is_mean_of_encoder_features():
    net = tiny_image_net()
    x, s = torch.randn(3, 3, 32, 32), torch.tensor([0.1, 1.0, 10.0])
    D, feat = net(x, s, return_features=True)
    l, D2 = db.disc_logit(net, x, s, with_D=True)
    assert l.shape == (3,) and torch.equal(D, D2)
    torch.testing.assert_close(l, feat.flatten(1).mean(1))

def test_flags():
    r = run('dibregman', '--h', 'js')
    assert r.returncode == 2 and "invalid choice: 'js'" in r.stderr
    cfg = db.get_config(['--data', 'toy', '--lam', '-1', '--h', 'sba'])
    assert cfg.lam == -1 and cfg.h == 'sba' and cfg.w_gan == 0
    assert db.get_config([]).h == 'sba' and db.get_config([]).lam == 5

def test_toy_every_h_keeps_every_mode_and_sba_freezes_the_proportions(tmp_path, toy_teacher):
    """python dibregman.py --data toy --h lr / be / kl / sba --lam 5 (their defaults, 1200 kimg): every run finishes with
    finite losses and keeps all eight modes, each with at least 0.5% of the samples (a generator collapsed onto three
    modes fails that). lr and be come near the mixture (mode_tv < 0.08, precision > 0.7; the untrained student does
    not); SBA lambda 5 leaves much of its mass between the modes (precision < 0.55) and misweights them more (README,
    "Di-Bregman on the toy"). The other tests' 0.05 is not asserted for lr and be: their final mode_tv ranged
    0.021-0.064 over seeds and settings."""
    hs = {'lr': ['--h', 'lr'], 'be': ['--h', 'be'], 'kl': ['--h', 'kl'], 'sba': ['--h', 'sba', '--lam', '5']}
    assert toy_runs('dibregman', [(tmp_path / h, args) for h, args in hs.items()]) == [0, 0, 0, 0]
    mixture = db.GaussianMixture2D()
    samples = {h: torch.from_numpy(np.load(tmp_path / h / 'toy_samples.npy')) for h in hs}
    metrics = {h: mixture.metrics(x) for h, x in samples.items()}
    for h in hs:
        rows = [json.loads(line) for line in open(tmp_path / h / 'metrics.jsonl')]
        assert rows[-1]['final'] and all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
        assert mode_frequencies(samples[h]).min() >= 0.005, (h, mode_frequencies(samples[h]))
    for h in ('lr', 'be'):
        assert metrics[h]['mode_tv'] < 0.08 and metrics[h]['precision'] > 0.7, (h, metrics[h])
    assert metrics['sba']['precision'] < 0.55 and metrics['sba']['mode_tv'] > metrics['lr']['mode_tv'], metrics
    z = torch.randn(10000, 2, generator=torch.Generator().manual_seed(123))
    with torch.no_grad(): untrained = mixture.metrics(db.generate(toy_teacher, z))
    assert not (untrained['mode_tv'] < 0.08 and untrained['precision'] > 0.7), untrained
    nearest = ((samples['sba'][:, None].double() - mixture.means) ** 2).sum(-1).argmin(1)
    collapsed = samples['sba'][torch.isin(nearest, torch.tensor([0, 3, 6]))]       # a generator on three modes
    assert mode_frequencies(collapsed).min() < 0.005                                # fails the check

def test_cifar10_defaults_are_the_papers_and_sidas(monkeypatch, tmp_path):
    """Algorithm 1 where it speaks (no GAN term), SiDA's run_sida.sh where it is silent; --help shows them. psi's
    denoising loss is at EDM's lognormal sigma and summed over a sample, as SiDA's."""
    cfg = db.get_config([])
    assert (cfg.batch, cfg.lr, cfg.lr_fake, cfg.init_sigma, cfg.ema_kimg, cfg.precision, cfg.w_gan, cfg.h, cfg.lam) == \
        (256, 1e-5, None, 2.5, 500, 'fp32', 0, 'sba', 5)
    help_text = ' '.join(run('dibregman', '--help').stdout.split())
    assert 'CIFAR-10: 256' in help_text and 'CIFAR-10: 2.5' in help_text and 'CIFAR-10: fp32' in help_text
    sigmas, real = [], db.edm_loss
    def spy(net, x, sigma, *a):
        sigmas.append(sigma)
        return real(net, x, sigma, *a)
    monkeypatch.setattr(db, 'edm_loss', spy)
    db.train(db.get_config(['--data', 'toy', '--out', str(tmp_path), '--kimg', '4', '--eval-every', '4']))
    log_sigma = torch.cat(sigmas).log()
    assert abs(log_sigma.mean() + 1.2) < 0.05 and abs(log_sigma.std() - 1.2) < 0.05

def test_conditional_run_with_a_linear_head(tmp_path):
    """--cond with --disc-head linear: the head is sized from a labelled teacher pass (a step runs)."""
    res = db.train(db.get_config(['--cond', '--disc-head', 'linear', '--teacher', 'random', '--model-channels', '16',
                                  '--bench', '1', '--batch', '8', '--device', 'cpu']))
    assert res['ms_per_step'] > 0
