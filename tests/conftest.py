"""Shared test fixtures: one cache per session (so the toy teacher trains once), helpers to run
a script as a user would, and the toy thresholds every method's distillation test uses.

Under `pytest -n N` (pytest-xdist; the README's command has -n auto) each worker computes on one thread, and so do the
scripts it starts: two workers with a thread per core each would fight over the cores, and tiny networks run many times
slower then. Each test file goes to one worker whole. The workers share one cache, and the first to need the toy
teacher trains it with torch's default thread count while the others wait."""
import os, pathlib, subprocess, sys
import numpy as np
import pytest
import torch
from filelock import FileLock

THREADS = torch.get_num_threads()              # the default: the toy teacher is trained with it, as a user's is

# The slowest files early, so that the workers end together: xdist would order the files by their number of tests,
# which left the digits' few long runs to the end, on one worker (2 cores: 925 s, 1,416 s of CPU: a core idle 430 s).
# The first two both wait for the toy teacher, trained with every core's thread: with the digits teacher trained
# beside it, the first toy test waited 380 s for it, not 25.
# After them, longest first (seconds on one worker, 2-core Xeon: 166, 90, 68, 66, 61, 41, 26, 20), so that the last
# file to start is a short one: the workers ended 72 s apart with test_shared.py last.
SLOWEST_FIRST = ['test_dibregman.py', 'test_dmd.py', 'test_digits.py', 'test_distributed.py', 'test_faults.py',
                 'test_shared.py', 'test_gan_only.py', 'test_after_training.py', 'test_sid.py', 'test_consistency.py',
                 'test_edm.py']

def pytest_configure(config):   # pytest -n: whole files to a worker (a module's toy runs are made once)
    if getattr(config.option, 'dist', 'no') == 'load': config.option.dist = 'loadfile'
    config.option.loadscopereorder = False                  # the files in the order below

def pytest_collection_modifyitems(items):   # a stable sort: the tests of a file keep their order
    items.sort(key=lambda item: SLOWEST_FIRST.index(item.path.name) if item.path.name in SLOWEST_FIRST else 99)

if os.environ.get('PYTEST_XDIST_WORKER'):
    os.environ['OMP_NUM_THREADS'] = '1'         # for the scripts the tests start
    torch.set_num_threads(1)

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ALL_SCRIPTS = ['dmd', 'dibregman', 'gan_only', 'sid', 'consistency']
SCRIPTS = [s for s in ALL_SCRIPTS if (ROOT / f'{s}.py').exists()]

# A one-step student "matches the mixture" when both hold on 10k samples (exact metrics of
# GaussianMixture2D.metrics); the teacher's own 35-step Heun samples reach mode_tv 0.02, precision 0.97.
MODE_TV_MAX, PRECISION_MIN = 0.05, 0.7

@pytest.fixture(scope='session', autouse=True)
def cache(tmp_path_factory):
    shared = tmp_path_factory.getbasetemp().parent if os.environ.get('PYTEST_XDIST_WORKER') else \
        tmp_path_factory.getbasetemp()
    d = os.environ.get('DISTILL_TEST_CACHE') or str(shared / 'cache')
    os.makedirs(d, exist_ok=True)              # DISTILL_TEST_CACHE may name a folder that is not there yet
    os.environ['DISTILL_CACHE'] = d            # inherited by the scripts the tests start
    return d

@pytest.fixture(scope='session')
def toy_teacher(cache):
    import dmd
    with FileLock(os.path.join(cache, 'toy_teacher.lock')):   # trained once (about 35 s on 2 cores), then cached
        threads = torch.get_num_threads()
        torch.set_num_threads(THREADS)
        try:
            return dmd.toy_teacher()
        finally:
            torch.set_num_threads(threads)

def run(script, *args, timeout=900, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / f'{script}.py'), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd or ROOT)

def toy_runs(script, jobs, width=2):
    """Runs `script.py --data toy --out <out> <args>` for each (out, args) in jobs, `width` at a time on one thread
    each; returns their exit codes."""
    env, codes, running = dict(os.environ, OMP_NUM_THREADS='1'), [], []
    for out, args in jobs:
        running.append(subprocess.Popen([sys.executable, str(ROOT / f'{script}.py'), '--data', 'toy', '--out', str(out),
                                         *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL))
        if len(running) == width: codes.append(running.pop(0).wait())
    return codes + [p.wait() for p in running]

@torch.no_grad()
def perturb(net, scale=0.02):
    """Moves net's weights by a fixed random amount (the same every time), so that copies of it no longer agree."""
    g = torch.Generator().manual_seed(7)
    for p in net.parameters():
        p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g).to(p.device))

def mode_frequencies(x):
    """The fraction of samples x (N, 2) nearest to each of the mixture's eight means."""
    import dmd
    d = ((torch.as_tensor(x).double()[:, None] - dmd.GaussianMixture2D().means) ** 2).sum(-1)
    return torch.bincount(d.argmin(1), minlength=8).double() / len(x)

def toy_metrics(script, out, *args, samples='toy_samples.npy'):
    """Run `script.py --data toy`, as the README says, and score the samples it saved in out (as samples)."""
    import dmd
    r = run(script, '--data', 'toy', '--out', out, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return dmd.GaussianMixture2D().metrics(torch.from_numpy(np.load(os.path.join(out, samples))))

def exact_denoiser(mixture):
    """The exact E[x_0 | x_0 + sigma n = x] of a GaussianMixture2D by Tweedie's formula, x + sigma^2 grad log p_sigma(x),
    with autograd of its exact noisy density; the call signature of a denoiser network."""
    def denoise(x, sigma, class_labels=None):
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        xd = x.detach().double().requires_grad_(True)
        with torch.enable_grad():
            (score,) = torch.autograd.grad(mixture.log_prob(xd, s.flatten() if s.numel() > 1 else s.item()).sum(), xd)
        return (xd + s ** 2 * score).detach().to(x.dtype)
    return denoise

def matches_mixture(m):
    return m['mode_tv'] < MODE_TV_MAX and m['precision'] > PRECISION_MIN

def make_fake_cifar(root, n_per_batch=40, seed=0):
    """A folder in CIFAR-10's python format with smooth synthetic images (the real one can't be downloaded here)."""
    import pickle
    g = np.random.default_rng(seed)
    folder = os.path.join(root, 'cifar-10-batches-py'); os.makedirs(folder, exist_ok=True)
    for i in range(1, 6):
        base = g.uniform(0, 255, (n_per_batch, 3, 4, 4))
        imgs = np.repeat(np.repeat(base, 8, 2), 8, 3).clip(0, 255).astype(np.uint8).reshape(n_per_batch, -1)
        with open(os.path.join(folder, f'data_batch_{i}'), 'wb') as f:
            pickle.dump({'data': imgs, 'labels': list(g.integers(0, 10, n_per_batch))}, f)
    return root

def fake_extractor(x, mode):
    """Stands in for Inception: 48 pooled colour features (another transform in 'clean' mode)."""
    f = x.float().reshape(len(x), 3, 4, 8, 4, 8).mean((3, 5)).reshape(len(x), 48) / 255
    return (f.sqrt() if mode == 'clean' else f).numpy()

@pytest.fixture(scope='session')
def vgg_weights(cache):
    """torchvision's VGG-16 file in the cache, as lpips_vgg downloads it, but with random weights (offline): only the
    `features` part, which LPIPS uses."""
    import dmd, torchvision
    path = os.path.join(cache, os.path.basename(dmd.VGG_URL))
    with FileLock(path + '.lock'):
        if not os.path.exists(path):
            torch.manual_seed(0)
            torch.save({'features.' + k: v for k, v in torchvision.models.vgg16().features.state_dict().items()}, path)
    return path

DIGITS_TEACHER_STEPS = 300     # the tests' digits teacher: a short schedule (about a minute on one thread); users' has 2000

@pytest.fixture(scope='session')
def digits_teacher(cache):
    """dmd.digits_teacher on the tests' short schedule, trained once under a file lock and cached."""
    import dmd
    with FileLock(os.path.join(cache, 'digits_teacher.lock')):
        return dmd.digits_teacher(steps=DIGITS_TEACHER_STEPS)

def digits_rows(script, out, monkeypatch, *args):
    """Runs `script` on the digits in this process with the tests' teacher (`--data digits` and args, one thread) and
    returns the rows of its metrics.jsonl."""
    import functools, importlib, json
    mod = importlib.import_module(script)
    monkeypatch.setattr(mod, 'digits_teacher', functools.partial(mod.digits_teacher, steps=DIGITS_TEACHER_STEPS))
    mod.train(mod.get_config(['--data', 'digits', '--out', str(out), '--device', 'cpu', *map(str, args)]))
    return [json.loads(line) for line in open(os.path.join(out, 'metrics.jsonl'))]
