"""DMD: the loss identity, the toy distillation, a tiny CIFAR-shaped run through FID and exact resume, DMD2's
optimiser and noise levels, the LPIPS anchor, and --bench."""
import json, os
import numpy as np
import pytest
import torch
import dmd
from conftest import ROOT, fake_extractor, make_fake_cifar, matches_mixture, run, toy_metrics

def test_dm_loss_gradient_is_the_normalised_score_difference():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    D_real, D_fake = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    dmd.dmd_loss(x, D_real, D_fake).backward()
    norm = (x - D_real).abs().mean((1, 2, 3), keepdim=True)
    expect = (D_fake - D_real) / norm / x.numel()            # the DMD post: w (s_fake - s_real), mean over elements
    assert torch.allclose(x.grad, expect, atol=1e-6)
    sigma = 0.7                                               # the same in score form: s = (D(x_t) - x_t) / sigma^2
    x_t = x.detach() + sigma * torch.randn_like(x)
    s_fake, s_real = (D_fake - x_t) / sigma ** 2, (D_real - x_t) / sigma ** 2
    assert torch.allclose(x.grad, sigma ** 2 * (s_fake - s_real) / norm / x.numel(), atol=1e-5)

def test_toy_distillation_matches_the_mixture(tmp_path, toy_teacher):
    z = torch.randn(10000, 2, generator=torch.Generator().manual_seed(123))
    untrained = dmd.GaussianMixture2D().metrics(dmd.generate(toy_teacher, z))   # the student before training
    assert not matches_mixture(untrained)
    m = toy_metrics('dmd', tmp_path / 'toy')                 # python dmd.py --data toy, as in the README
    assert matches_mixture(m), m
    assert (tmp_path / 'toy' / 'toy_samples.png').exists()

def test_toy_run_writes_the_training_animation(tmp_path, toy_teacher):
    """training.gif: one frame per evaluation (21 over the default run, kimg 0 first), frames/kimg<kimg>.npy and .png
    each, the same noise in every frame (so early and late frames differ only through training), kimg and the metrics
    in each title."""
    from PIL import Image
    r = run('dmd', '--data', 'toy', '--out', tmp_path / 'a', '--kimg', '60', '--eval-every', '6')
    assert r.returncode == 0, r.stderr[-2000:]
    frames = sorted(f for f in os.listdir(tmp_path / 'a' / 'frames') if f.endswith('.npy'))
    pngs = sorted(f for f in os.listdir(tmp_path / 'a' / 'frames') if f.endswith('.png'))
    assert pngs == [f[:-4] + '.png' for f in frames] and not (tmp_path / 'a' / 'toy_training.gif').exists()
    assert len(frames) == 11 and frames[0] == 'kimg000000.000.npy' and frames[1] == 'kimg000006.144.npy'
    xs = [np.load(tmp_path / 'a' / 'frames' / f) for f in frames]
    assert all(x.shape == (4000, 2) for x in xs) and np.abs(xs[0] - xs[-1]).mean() > 1e-3
    gif = Image.open(tmp_path / 'a' / 'training.gif')
    assert gif.n_frames == 11
    gif.seek(0)
    first = np.asarray(gif.convert('RGB')).copy()
    gif.seek(10)
    assert np.abs(first.astype(int) - np.asarray(gif.convert('RGB')).astype(int)).mean() > 0.1
    z = torch.randn(10000, 2, generator=torch.Generator().manual_seed(123))[:4000]   # the frames' noise: the same
    ck = torch.load(tmp_path / 'a' / 'ckpt.pt', weights_only=False)                   # in every frame
    G = dmd.toy_teacher()
    G.load_state_dict(ck['nets']['G_ema'])
    np.testing.assert_allclose(dmd.generate(G, z).detach().numpy(), xs[-1], atol=1e-5)

def tiny_cifar_cfg(tmp_path, out, kimg, *extra):
    return dmd.get_config(['--teacher', 'random', '--model-channels', '16', '--data-dir', str(make_fake_cifar(tmp_path / 'data')),
                           '--out', str(out), '--batch', '8', '--kimg', str(kimg), '--eval-every', '0.032', '--reg-pairs', '16',
                           '--fid-samples', '32', '--fid-final', '48', '--device', 'cpu', '--reg-loss', 'l2', *extra])

def test_tiny_cifar_run_resume_equals_uninterrupted(tmp_path):
    """A tiny CIFAR-shaped run through FID, stopped after 4 steps and resumed, ends equal to the uninterrupted run
    (without the anchor, whose teacher pairs cost the time here; the toy's resume tests run it)."""
    full = dmd.train(tiny_cifar_cfg(tmp_path, tmp_path / 'full', 0.064, '--lambda-reg', '0'), extract=fake_extractor)
    assert full['step'] == 8
    rows = [json.loads(l) for l in open(tmp_path / 'full' / 'metrics.jsonl')]
    assert [r['step'] for r in rows] == [0, 4, 8] and all(r['fid_legacy'] > 0 and r['fid_clean'] > 0 for r in rows)
    assert (tmp_path / 'full' / 'samples.png').exists()
    dmd.train(tiny_cifar_cfg(tmp_path, tmp_path / 'split', 0.032, '--lambda-reg', '0'), extract=fake_extractor)  # 4 steps
    split = dmd.train(tiny_cifar_cfg(tmp_path, tmp_path / 'split', 0.064, '--lambda-reg', '0', '--resume'),
                      extract=fake_extractor)                                                             # ... then on
    for name in ('G', 'fake', 'G_ema'):
        a, b = full['nets'][name].state_dict(), split['nets'][name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert not all(torch.equal(v, w) for v, w in zip(full['nets']['G'].state_dict().values(), dmd.EDMPrecond(model_channels=16).state_dict().values()))

def test_the_random_teacher_leaves_the_noise_stream_alone(tmp_path):
    """Building a random CIFAR teacher (seeded with --seed, so the same teacher every time) leaves the training noise
    stream as --seed alone would make it."""
    cfg = tiny_cifar_cfg(tmp_path, tmp_path / 'w', 0.032, '--seed', '3')
    a, b = dmd.World(cfg), dmd.World(cfg)
    assert all(torch.equal(v, b.teacher.state_dict()[k]) for k, v in a.teacher.state_dict().items())
    z = a.noise(4)[0]
    torch.manual_seed(3)                                                # --seed's stream, as if nothing was built
    assert torch.equal(z, torch.randn(4, 3, 32, 32))

def test_bench_reports_step_time_and_flops():
    r = run('dmd', '--bench', '1', '--batch', '1', '--device', 'cpu', timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    line = [l for l in r.stdout.splitlines() if l.startswith('bench')][-1]
    for key in ('ms_per_step', 'img_per_s', 'peak_mem_gib', 'tflops', 'gflop_per_img', 'mfu'):
        assert key in line
    gflop = float(line.split('gflop_per_img ')[1].split()[0])
    assert 300 < gflop < 700       # full-size network: about 12 SongUNet passes of 42 GFLOP per image (README)

def test_each_loss_draws_its_own_noise_range(tmp_path, monkeypatch, toy_teacher):
    """L_DM at u ~ U[0.02, 0.98] of the Karras ramp (DMD's t range), the fake denoiser on the whole ramp, sigma 0.002..80
    (DMD2's edm_guidance), both clipped AdamW (0.9, 0.999, weight decay 0.01) as DMD2's EDM code."""
    calls, real = [], dmd.sample_sigma
    def spy(n, device, u_min=0.02, u_max=0.98):
        calls.append((u_min, u_max))
        return real(n, device, u_min, u_max)
    monkeypatch.setattr(dmd, 'sample_sigma', spy)
    clips = []
    monkeypatch.setattr(dmd.torch.nn.utils, 'clip_grad_norm_', lambda params, c: clips.append(c))
    res = dmd.train(dmd.get_config(['--data', 'toy', '--out', str(tmp_path / 'r'), '--kimg', '1', '--batch', '256',
                                    '--lambda-reg', '0', '--eval-every', '1']))
    assert calls[:2] == [dmd.DM_U, dmd.FAKE_U] and set(calls) == {(0.02, 0.98), (0.0, 1.0)}
    assert set(clips) == {10} and len(clips) == 2 * res['step']
    assert dmd.karras(torch.tensor(dmd.FAKE_U)).tolist() == pytest.approx([80.0, 0.002])
    ck = torch.load(tmp_path / 'r' / 'ckpt.pt', weights_only=False)
    for name in ('G', 'fake'):
        group = ck['opts'][name]['param_groups'][0]
        assert group['betas'] == (0.9, 0.999) and group['weight_decay'] == 0.01

def test_lpips_distance(vgg_weights, monkeypatch):
    """LPIPS-VGG on a random backbone (no download): 0 for equal inputs, positive otherwise, gradients reach the input,
    and the images are resized to 224 x 224 (bilinear) before VGG."""
    d = dmd.lpips_vgg(torch.device('cpu'))
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert d(a, a).abs().max() < 1e-6 and (d(a, b) > 0).all() and d(a, b).shape == (2,)
    x = a.clone().requires_grad_(True)
    d(x, b).sum().backward()
    assert x.grad.abs().sum() > 0
    calls, interpolate = [], dmd.F.interpolate
    def spy(x, **kw):
        calls.append((tuple(x.shape[-2:]), kw))
        return interpolate(x, **kw)
    monkeypatch.setattr(dmd.F, 'interpolate', spy)
    d(a, b)
    assert calls[:2] == [((32, 32), dict(size=224, mode='bilinear'))] * 2

def test_lpips_offline_error_names_url_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv('DISTILL_CACHE', str(tmp_path))
    monkeypatch.setattr(dmd.torch.hub, 'download_url_to_file', lambda *a, **k: (_ for _ in ()).throw(OSError('offline')))
    with pytest.raises(SystemExit, match=rf'could not download {dmd.VGG_URL}.*put it at {tmp_path}.*vgg16-397923af.pth'):
        dmd.lpips_vgg(torch.device('cpu'))

def test_tiny_cifar_run_with_the_lpips_anchor(tmp_path, vgg_weights):
    """The paper's anchor (--reg-loss lpips, the CIFAR-10 default) through the loop: its loss is LPIPS of G's pairs."""
    res = dmd.train(tiny_cifar_cfg(tmp_path, tmp_path / 'lp', 0.004, '--reg-loss', 'lpips', '--fid-final', '0',
                                   '--batch', '2', '--reg-pairs', '4'), extract=fake_extractor)
    assert res['step'] == 2
    rows = [json.loads(l) for l in open(tmp_path / 'lp' / 'metrics.jsonl')]
    assert rows[-1]['final'] and os.path.exists(tmp_path / 'lp' / 'samples.png')

def test_fake_score_generator_is_adds_score_distillation(tmp_path, monkeypatch, toy_teacher):
    """--fake-score generator (ADD, the notes' Eq. 67-70): in a training step the fake denoiser's output is G(z) itself,
    so the gradient on each sample x = G(z) is along Eq. (68)'s 2 (G(z) - x_psi(x_t)), x_psi the teacher, with a
    positive per-sample factor; nothing learns a fake score (no network, no optimizer, one update per step); and the
    learned run's gradient is not along it."""
    calls, real = [], dmd.dmd_loss
    def spy(x, D_real, D_fake):
        calls.append((x, D_real, D_fake))
        x.register_hook(lambda g: calls.append(g))
        return real(x, D_real, D_fake)
    monkeypatch.setattr(dmd, 'dmd_loss', spy)
    steps = []
    real_step = dmd.World.step
    def count(self, opt, *a, **k):
        steps.append(opt)
        return real_step(self, opt, *a, **k)
    monkeypatch.setattr(dmd.World, 'step', count)
    args = ['--data', 'toy', '--kimg', '0.256', '--batch', '128', '--eval-every', '1', '--lambda-reg', '0']
    res = dmd.train(dmd.get_config([*args, '--out', str(tmp_path / 'add'), '--fake-score', 'generator']))
    assert res['step'] == 2 and set(res['nets']) == {'G', 'G_ema'} and len(steps) == 2
    for (x, D_real, D_fake), g in zip(calls[0::2], calls[1::2]):
        assert torch.equal(D_fake, x.detach())                           # x_phi(x_t) = G(z), Eq. (69)
        direction = 2 * (x.detach() - D_real)                            # Eq. (68)
        factor = (g * direction).sum(1) / direction.pow(2).sum(1)
        torch.testing.assert_close(g, factor[:, None] * direction, rtol=1e-5, atol=1e-9)
        assert (factor > 0).all()
    calls.clear()
    dmd.train(dmd.get_config([*args, '--out', str(tmp_path / 'dmd')]))
    x, D_real, D_fake = calls[-2]                                        # the second step: the fake network moved
    g = calls[-1]
    direction = x.detach() - D_real
    cos = (g * direction).sum(1) / (g.norm(dim=1) * direction.norm(dim=1))
    assert (cos < 0.99).float().mean() > 0.5                             # DMD's learned fake score: another direction
