"""gan_only.py: the blog's boxed equation (the discriminator-only gradient equals the Di-Bregman score-difference
gradient under the optimal discriminator, and DMD's for KL), the KL coefficient, Table 1's weights in logit form,
R1, and the toy distillation (with the check failing for the untrained student)."""
import copy, math
import pytest
import torch
import dmd
import gan_only as go
from conftest import matches_mixture, toy_metrics

HS = ['lr', 'kl', 'be', 'ls', 'sba']
LAM = 2.0

def h_fn(h, r):   # Table 1's convex functions h(r), Di-Bregman
    return {'lr': lambda: r * r.log() - (1 + r) * (1 + r).log(), 'kl': lambda: r * r.log() - r, 'be': lambda: -r.log(),
            'ls': lambda: r ** 2 / 2, 'sba': lambda: (r ** (1 + LAM) - r) / (LAM * (LAM + 1))}[h]()

def h2(h, r):     # h''(r) by autograd, independent of gan_only's closed forms
    r = r.detach().requires_grad_(True)
    d1, = torch.autograd.grad(h_fn(h, r).sum(), r, create_graph=True)
    d2, = torch.autograd.grad(d1.sum(), r)
    return d2

def gaussians(n=20000, sigma=0.7, theta0=0.4, seed=0):
    """1-D: p_0 = N(0, 1), G_theta(eps) = theta + eps, so p_t = N(0, v), q_t = N(theta, v), v = 1 + sigma^2.
    Returns theta (leaf), x = G_theta(eps) and x_t = x + sigma n (both depending on theta), v, theta0."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    eps, n = torch.randn(n, 1, generator=g, dtype=torch.float64), torch.randn(n, 1, generator=g, dtype=torch.float64)
    x = theta + eps
    return theta, x, x + sigma * n, 1 + sigma ** 2, theta0

def l_star(x_t, v, theta0):   # the optimal discriminator's logit log p_t/q_t (its parameters are not theta)
    return ((x_t - theta0) ** 2 - x_t ** 2).squeeze(1) / (2 * v)

@pytest.mark.parametrize('h', HS)
def test_boxed_equation_discriminator_gradient_equals_score_difference_gradient(h):
    """Zhu's blog post, boxed equation / Eq. (37): with D = D*, grad_x l* = s_p - s_q, so the gradient of
    L_G = -E[sg(h''(r) r) l(x_t)] equals Eq. (4)'s -E[h''(r) r (s_p - s_q) dG/dtheta] sample by sample."""
    theta, x, x_t, v, theta0 = gaussians()
    l = l_star(x_t, v, theta0)
    w = go.log_bregman_weight(l, h, LAM).exp()
    g_x, g_theta = torch.autograd.grad(go.gan_loss(l, w), [x, theta])
    # Eq. (4) in closed form with exact scores and exact r = q_t/p_t; h'' by autograd of Table 1's h.
    s_p, s_q = -x_t / v, -(x_t - theta0) / v
    r = ((x_t ** 2 - (x_t - theta0) ** 2) / (2 * v)).exp().detach()   # exact q_t/p_t from the densities
    eq4 = (-(h2(h, r) * r * (s_p - s_q)) / len(x)).detach()   # per-sample gradient w.r.t. x (dG/dtheta = 1)
    torch.testing.assert_close(g_x, eq4, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(g_theta, eq4.sum(), rtol=1e-10, atol=1e-14)
    assert g_theta > 0                                          # theta0 > 0: descent moves q_t toward p_t

@pytest.mark.parametrize('h', HS)
def test_gradient_is_that_of_the_bregman_divergence(h):
    """The sign and scale against ground truth: E[grad_theta L_G] = d/dtheta D_h(r_t || 1), the latter by
    quadrature of E_p_t[h(r_t)] and a central difference (Eq. 37 as printed would give the opposite sign)."""
    v, theta0, N = 1.49, 0.4, 200000
    u = torch.distributions.Normal(0., 1.).icdf((torch.arange(N, dtype=torch.float64) + 0.5) / N)
    theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    x_t = (theta + v ** 0.5 * u)[:, None]                       # x_t ~ q_t = N(theta, v), stratified
    l = l_star(x_t, v, theta0)
    g, = torch.autograd.grad(go.gan_loss(l, go.log_bregman_weight(l, h, LAM).exp()), theta)
    xs = torch.linspace(-14, 14, 400001, dtype=torch.float64)
    def D_h(th):                                                # int p_t (h(r) - h(1) - h'(1)(r - 1)), the last term integrates to 0
        logp, logq = -xs ** 2 / (2 * v), -(xs - th) ** 2 / (2 * v)
        return torch.trapezoid(logp.exp() / math.sqrt(2 * math.pi * v) * h_fn(h, (logq - logp).exp()), xs)
    e = 1e-4
    ref = (D_h(theta0 + e) - D_h(theta0 - e)) / (2 * e)
    assert abs(g.item() - ref.item()) < 2e-3 * abs(ref.item()), (g.item(), ref.item())

def test_kl_equals_dmd_gradient():
    """h = KL (w = 1, L_G = -E[l]): per sample, DMD's gradient (the DMD post, dmd.dmd_loss with exact Gaussian
    denoisers D = x_t + sigma^2 s) is the discriminator-only gradient times DMD's positive per-sample time
    weight w(t) = sigma^2 / mean|x - D_real|; with that weight on the GAN side the theta-gradients are equal."""
    sigma = 0.7
    theta, x, x_t, v, theta0 = gaussians(sigma=sigma)
    l = l_star(x_t, v, theta0)
    g_gan, = torch.autograd.grad(go.gan_loss(l, go.log_bregman_weight(l, 'kl', LAM).exp()), x)
    xt = x_t.detach()
    D_real, D_fake = xt + sigma ** 2 * (-xt / v), xt + sigma ** 2 * (-(xt - theta0) / v)
    g_dmd, g1 = torch.autograd.grad(dmd.dmd_loss(x, D_real, D_fake), [x, theta])
    w_t = sigma ** 2 / (x - D_real).abs().detach()
    torch.testing.assert_close(g_dmd, g_gan * w_t, rtol=1e-10, atol=1e-14)
    l = l_star(x_t, v, theta0)
    g2, = torch.autograd.grad(go.gan_loss(w_t.squeeze(1) * l, go.log_bregman_weight(l, 'kl', LAM).exp()), theta)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-14)

@pytest.mark.parametrize('h', HS)
def test_equals_dibregman_loss(h):
    """Same as the boxed-equation test, against dibregman.py's own Eq. (4) loss: with exact denoisers,
    its gradient is the discriminator-only gradient times the same DMD time weight."""
    db = pytest.importorskip('dibregman')
    sigma = 0.7
    theta, x, x_t, v, theta0 = gaussians(sigma=sigma)
    l = l_star(x_t, v, theta0)
    w = go.log_bregman_weight(l, h, LAM).exp()
    torch.testing.assert_close(db.log_bregman_weight(l, h, LAM).exp(), w)
    g_gan, = torch.autograd.grad(go.gan_loss(l, w), x)
    xt = x_t.detach()
    D_real, D_fake = xt + sigma ** 2 * (-xt / v), xt + sigma ** 2 * (-(xt - theta0) / v)
    g_db, = torch.autograd.grad(db.dibregman_loss(x, D_real, D_fake, w), x)
    torch.testing.assert_close(g_db, g_gan * sigma ** 2 / (x - D_real).abs().detach(), rtol=1e-10, atol=1e-14)

def test_kl_coefficient_of_the_boxed_equation():
    """Blog: for h = r log r - r, h''((1-D)/D) / D^2 = 1/(D(1-D)), with h'' by autograd."""
    D = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    torch.testing.assert_close(h2('kl', (1 - D) / D) / D ** 2, 1 / (D * (1 - D)))

@pytest.mark.parametrize('h', HS)
def test_boxed_coefficient_in_logits_is_table1_weight(h):
    """h''((1-D)/D)/D^2 grad D = h''(r) r grad l with D = sigmoid(l), r = e^{-l}: the boxed equation in logits
    gives bregman_weight (Table 1, last column); dD/dl by autograd."""
    l = torch.linspace(-4, 4, 81, dtype=torch.float64, requires_grad=True)
    D = torch.sigmoid(l)
    dD, = torch.autograd.grad(D.sum(), l)
    coef = h2(h, ((1 - D) / D).detach()) / D.detach() ** 2 * dD
    torch.testing.assert_close(coef, go.log_bregman_weight(l.detach(), h, LAM).exp())

def test_r1_penalty_and_disc_loss(toy_teacher):
    """R1 = E||grad_x l||^2 matches finite differences on the toy discriminator; Eq. (5) is minimised by the
    Bayes logit: for p = N(0, 1), q = N(1, 1), l* = 1/2 - x beats l* + 0.3 and l* - 0.3 x."""
    disc = copy.deepcopy(toy_teacher).requires_grad_(True)
    x, sigma = torch.randn(16, 2), torch.full((16,), 0.5)
    r1 = go.r1_penalty(disc, x, sigma)
    e, fd = 1e-3, torch.zeros(16, 2)
    for i in range(2):
        d = torch.zeros(1, 2); d[0, i] = e
        fd[:, i] = (go.disc_logit(disc, x + d, sigma) - go.disc_logit(disc, x - d, sigma)) / (2 * e)
    torch.testing.assert_close(r1, fd.pow(2).sum(1).mean(), rtol=1e-2, atol=1e-6)
    r1.backward()                                               # differentiable in the discriminator's weights
    assert next(disc.parameters()).grad is not None
    g = torch.Generator().manual_seed(0)
    xp, xq = torch.randn(200000, generator=g), torch.randn(200000, generator=g) + 1
    best = go.disc_loss(0.5 - xp, 0.5 - xq)
    assert best < go.disc_loss(0.8 - xp, 0.8 - xq) and best < go.disc_loss(0.5 - 1.3 * xp, 0.5 - 1.3 * xq)

def test_toy_distillation_matches_mixture(tmp_path, toy_teacher):
    """python gan_only.py --data toy: the one-step student matches the mixture; the untrained student does not."""
    m = toy_metrics('gan_only', tmp_path / 'run')
    assert matches_mixture(m), m
    z = torch.randn(10000, 2, generator=torch.Generator().manual_seed(123))
    with torch.no_grad(): m0 = dmd.GaussianMixture2D().metrics(dmd.generate(toy_teacher, z))
    assert not matches_mixture(m0), m0
