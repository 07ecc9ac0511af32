"""DMD: the loss identity, the toy distillation, a tiny CIFAR-shaped run through FID and exact
resume, DDP with two gloo ranks, and --bench."""
import json, os, subprocess, sys, types
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
    expect = (D_fake - D_real) / norm / x.numel()            # seed 002: w (s_fake - s_real), mean over elements
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
    assert (tmp_path / 'toy' / 'toy_samples.png').exists() and (tmp_path / 'toy' / 'metrics.png').exists()

def tiny_cifar_cfg(tmp_path, out, kimg, *extra):
    return dmd.get_config(['--teacher', 'random', '--model-channels', '16', '--data-dir', str(make_fake_cifar(tmp_path / 'data')),
                           '--out', str(out), '--batch', '8', '--kimg', str(kimg), '--eval-every', '0.032', '--reg-pairs', '16',
                           '--fid-samples', '32', '--fid-final', '48', '--device', 'cpu', *extra])

def test_tiny_cifar_run_resume_equals_uninterrupted(tmp_path):
    full = dmd.train(tiny_cifar_cfg(tmp_path, tmp_path / 'full', 0.064), extract=fake_extractor)
    assert full['step'] == 8
    rows = [json.loads(l) for l in open(tmp_path / 'full' / 'metrics.jsonl')]
    assert [r['step'] for r in rows] == [4, 8] and all(r['fid_legacy'] > 0 and r['is'] >= 1 for r in rows)
    assert (tmp_path / 'full' / 'samples.png').exists() and (tmp_path / 'full' / 'metrics.png').exists()
    dmd.train(tiny_cifar_cfg(tmp_path, tmp_path / 'split', 0.032), extract=fake_extractor)       # stop after 4 steps ...
    split = dmd.train(tiny_cifar_cfg(tmp_path, tmp_path / 'split', 0.064, '--resume'), extract=fake_extractor)  # ... go on
    for name in ('G', 'fake', 'G_ema'):
        a, b = full['nets'][name].state_dict(), split['nets'][name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert not all(torch.equal(v, w) for v, w in zip(full['nets']['G'].state_dict().values(), dmd.EDMPrecond(model_channels=16).state_dict().values()))

def test_ranks_share_the_random_teacher_but_draw_their_own_noise(tmp_path):
    """Ctx seeds each rank with seed * 1000 + rank; building the CIFAR world must not reseed that away."""
    cfg, draws = tiny_cifar_cfg(tmp_path, tmp_path / 'w', 0.032), []
    for rank in (0, 1):
        torch.manual_seed(cfg.seed * 1000 + rank)
        world = dmd.World(cfg, types.SimpleNamespace(device=torch.device('cpu')))
        draws.append((world.teacher.state_dict(), world.noise(4)[0], world.real(4)[0]))
    (t0, z0, x0), (t1, z1, x1) = draws
    assert all(torch.equal(t0[k], t1[k]) for k in t0)                  # the same teacher (so the same G) on every rank
    assert not torch.equal(z0, z1) and not torch.equal(x0, x1)          # but different noise and real images

@pytest.mark.parametrize('script, args', [('dmd', ['--reg-pairs', '256']), ('gan_only', [])])   # gan_only: its discriminator's
def test_ddp_two_gloo_ranks_stay_in_sync(script, args, tmp_path, toy_teacher):                   # unused layers get no gradient
    driver = tmp_path / 'driver.py'
    driver.write_text(f"import os, sys, torch; sys.path.insert(0, {str(ROOT)!r}); import {script} as m\n"
                      f"res = m.train(m.get_config(['--data', 'toy', '--out', {str(tmp_path / 'ddp')!r}, '--kimg', '2', '--batch', '128', '--eval-every', '2', *{args!r}]))\n"
                      f"torch.save({{k: n.state_dict() for k, n in res['nets'].items()}}, os.path.join({str(tmp_path)!r}, 'G_rank' + os.environ['RANK'] + '.pt'))\n")
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(driver)],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = torch.load(tmp_path / 'G_rank0.pt'), torch.load(tmp_path / 'G_rank1.pt')
    assert all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])                  # every network, every tensor
    assert not all(torch.equal(a['G'][k], v) for k, v in toy_teacher.state_dict().items())   # and they did train

def test_ddp_nan_on_one_rank_stops_every_rank(tmp_path, toy_teacher):
    """A NaN loss on rank 1 alone, at a logging step: the logged losses are averaged over ranks, so both ranks see it
    and stop with the same error (before, rank 0 logged a finite loss and went on while rank 1 stopped)."""
    driver = tmp_path / 'driver.py'
    driver.write_text(f"import os, sys; sys.path.insert(0, {str(ROOT)!r}); import dmd\n"
                      "orig, calls = dmd.dmd_loss, [0]\n"
                      "def loss(*a):\n"
                      "    calls[0] += 1\n"
                      "    return orig(*a) * (float('nan') if os.environ['RANK'] == '1' and calls[0] == 5 else 1.0)\n"
                      "dmd.dmd_loss = loss\n"
                      f"dmd.main(['--data', 'toy', '--out', {str(tmp_path / 'ddp')!r}, '--kimg', '2', '--batch', '128', '--log-every', '5', '--lambda-reg', '0'])\n")
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(driver)],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode != 0 and (r.stdout + r.stderr).count('error: loss_dm is nan at step 5') == 2, r.stderr[-3000:]

def test_bench_reports_step_time_and_flops():
    r = run('dmd', '--bench', '1', '--batch', '2', '--device', 'cpu', timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    line = [l for l in r.stdout.splitlines() if l.startswith('bench')][-1]
    for key in ('ms_per_step', 'img_per_s', 'peak_mem_gib', 'tflops', 'gflop_per_img', 'mfu'):
        assert key in line
    gflop = float(line.split('gflop_per_img ')[1].split()[0])
    assert 300 < gflop < 700       # full-size network: about 12 SongUNet passes of 42 GFLOP per image (README)
