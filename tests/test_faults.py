"""Faults a long run on a rented GPU meets, tried on every script in the toy world: SIGKILL and resume, a crash
while writing a checkpoint, NaN weights, a used or mismatched --out, offline downloads. FAULTS below is the table in
the README ("What happens when things go wrong"): `python tests/test_faults.py` prints it, and a test checks that
the README holds it and that every test it names exists, so each row is an outcome a test asserts."""
import copy, importlib, os, signal, subprocess, sys, time
import numpy as np
import pytest
import torch
from conftest import ROOT, SCRIPTS, make_fake_cifar, run

FAULTS = [  # (fault, outcome, test that asserts it)
    ('SIGKILL during training, then `--resume`', 'finishes bit-identical (weights, samples, step) to an uninterrupted run',
     'test_faults.py::test_sigkill_then_resume_is_bit_identical'),
    ('crash while a checkpoint is being written', 'the previous checkpoint stays loadable; `--resume` continues from it',
     'test_faults.py::test_crash_while_writing_a_checkpoint_keeps_the_previous_one'),
    ('NaN in the weights (injected at step 20)', 'stops with "loss_... is nan at step 20" and the path of the last good checkpoint, whose weights are finite',
     'test_faults.py::test_nan_weights_stop_the_run_with_step_and_checkpoint'),
    ('weights turned NaN by the update of a checkpoint step', 'stops before writing them ("G has weights that are not finite at step 12"); the checkpoint on disk is the previous one',
     'test_faults.py::test_nan_weights_from_an_update_are_never_checkpointed'),
    ('new run into an `--out` that holds a run', 'refused, one line: pass `--resume` or choose another `--out`', 'test_faults.py::test_sigkill_then_resume_is_bit_identical'),
    ('`--resume` with other settings than the checkpoint (`--h`, `--ema-kimg`, ...; `--lr`, `--precision`, `--kimg` may change)',
     'refused, one line naming the flags that differ', 'test_faults.py::test_sigkill_then_resume_is_bit_identical'),
    ('`--resume` with a new `--lr` (or `--lr-fake`, ...)', 'each optimiser\'s saved state (Adam\'s moments and step) comes back, with the new learning rate',
     'test_faults.py::test_resume_keeps_the_optimiser_state_and_takes_this_runs_learning_rates'),
    ('`--resume` or `--eval-only` with no checkpoint in `--out`', 'one-line error; no folder is left behind',
     'test_after_training.py::test_eval_only_refuses_what_it_cannot_score'),
    ('`--resume` or `--eval-only` on a checkpoint of another script', 'one-line error: "ckpt.pt was written by dmd.py"',
     'test_after_training.py::test_eval_only_refuses_what_it_cannot_score'),
    ('`--resume` of a finished run', 'says "<out> is finished, at step N of N" and changes nothing (a larger `--kimg` goes on)',
     'test_after_training.py::test_resume_of_a_finished_run_says_so_and_changes_nothing'),
    ('CIFAR-10 training on a machine without a GPU, no `--device cpu`', 'refused before anything is written, one line with the estimated time and memory; `--device cpu` and `--bench` go ahead',
     'test_shared.py::test_cifar_training_on_a_cpu_needs_device_cpu'),
    ('bad flag values (`--data nope`, `--batch -4`, `--kimg -1`, `--lr nan`, `--device gpu`, `--device cuda` without CUDA, `--out` naming a file, an unknown `--h`, `--mu 1`, ...)',
     'argparse error, exit code 2, no traceback', 'test_shared.py::test_bad_flags_are_one_line_errors'),
    ('teacher: missing file, truncated file, a pickle that is no EDM network, unknown embedded classes, a pickle that would run code',
     'one-line error naming the file and what to do; nothing in the pickle is executed', 'test_edm.py::test_load_edm_errors_name_the_file'),
    ('offline: EDM checkpoint, Inception weights, CIFAR-10', 'one-line error naming the URL and where to put the file',
     'test_faults.py::test_offline_downloads_name_the_url_and_the_place'),
    ('a checkpoint (`--resume`, `--eval-only`) or a CIFAR-10 batch file that holds a pickled program (someone else\'s run folder or data folder)',
     'refused, one line naming the file; nothing in it runs: checkpoints load with `torch.load(weights_only=True)` (tensors, numbers, strings, lists, dicts), CIFAR-10 batches through the restricted unpickler (numpy arrays, lists, dicts, strings)',
     'test_faults.py::test_files_that_would_run_code_are_refused'),
]

def fault_table():
    return '\n'.join(['| fault | outcome | test |', '|---|---|---|'] + [f'| {f} | {o} | `{t}` |' for f, o, t in FAULTS])

def test_readme_fault_table_is_the_tests():
    for _, _, name in FAULTS:
        module, fn = name.split('::')
        assert hasattr(importlib.import_module(module[:-3]), fn), name
    assert fault_table() in (ROOT / 'README.md').read_text(), 'README fault table is stale: python tests/test_faults.py'

SHORT = ['--data', 'toy', '--kimg', '16', '--batch', '256', '--eval-every', '8']   # 63 steps, checkpoint every 1.6 kimg

def final_state(out):
    ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)
    return ck['step'], ck['nets'], np.load(os.path.join(out, 'toy_samples.npy'))

def start(script, *args, log):   # the script in the background, on one thread (bit-identity needs one thread count)
    return subprocess.Popen([sys.executable, str(ROOT / f'{script}.py'), *map(str, args)], cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS='1'), stdout=subprocess.DEVNULL, stderr=open(log, 'w'))

@pytest.mark.parametrize('script', SCRIPTS)
def test_sigkill_then_resume_is_bit_identical(script, tmp_path, toy_teacher):
    a = start(script, *SHORT, '--out', tmp_path / 'a', log=tmp_path / 'a.log')       # side by side with ...
    p = start(script, *SHORT, '--out', tmp_path / 'b', log=tmp_path / 'b.log')       # ... the run to kill
    ckpt = tmp_path / 'b' / 'ckpt.pt'
    while not ckpt.exists() and p.poll() is None: time.sleep(0.05)
    mtime = ckpt.stat().st_mtime_ns
    while ckpt.stat().st_mtime_ns == mtime and p.poll() is None: time.sleep(0.02)   # a second checkpoint is written ...
    p.send_signal(signal.SIGKILL); p.wait()                                           # ... and the run is killed
    assert p.returncode == -signal.SIGKILL, 'the run finished before it could be killed'
    assert a.wait() == 0, (tmp_path / 'a.log').read_text()[-2000:]
    r = start(script, *SHORT, '--out', tmp_path / 'b', '--resume', log=tmp_path / 'r.log')
    assert r.wait() == 0, (tmp_path / 'r.log').read_text()[-2000:]
    step_a, nets_a, x_a = final_state(tmp_path / 'a')
    step_b, nets_b, x_b = final_state(tmp_path / 'b')
    assert step_a == step_b and np.array_equal(x_a, x_b)
    for name in nets_a:
        assert all(torch.equal(nets_a[name][k], nets_b[name][k]) for k in nets_a[name]), name
    mod = importlib.import_module(script)
    with pytest.raises(SystemExit, match='already holds a run; pass --resume'):           # a new run into a used --out
        mod.train(mod.get_config([*SHORT, '--out', str(tmp_path / 'a')]))
    with pytest.raises(SystemExit, match=r'was trained with --ema-kimg \d+(\.\d+)?; pass the same'):  # other settings
        mod.train(mod.get_config([*SHORT, '--out', str(tmp_path / 'a'), '--resume', '--ema-kimg', '7']))

def test_resume_keeps_the_optimiser_state_and_takes_this_runs_learning_rates(tmp_path, toy_teacher, monkeypatch):
    """--resume --lr --lr-fake: each optimiser's saved state (Adam's moments, step) comes back with the new rates."""
    import dibregman as db
    out = tmp_path / 'run [1]*'                                       # a folder name with glob's special characters
    short = ['--data', 'toy', '--kimg', '1', '--batch', '256', '--eval-every', '1']   # 4 steps, each checkpointed
    db.train(db.get_config([*short, '--out', str(out)]))
    saved, loaded = torch.load(out / 'ckpt.pt', weights_only=True)['opts'], {}
    def spy(cfg, world, nets, opts, path):
        step = load(cfg, world, nets, opts, path)
        loaded.update({k: copy.deepcopy(o.state_dict()) for k, o in opts.items()})   # before training goes on
        return step
    load = db.load_checkpoint
    monkeypatch.setattr(db, 'load_checkpoint', spy)
    db.train(db.get_config([*short, '--out', str(out), '--resume', '--kimg', '2', '--lr', '1e-5', '--lr-fake', '2e-5']))
    assert [g['lr'] for g in saved['G']['param_groups']] == [3e-4]                   # the toy's default, saved
    assert [g['lr'] for g in loaded['G']['param_groups']] == [1e-5]
    assert [g['lr'] for g in loaded['fake']['param_groups']] == [2e-5]
    for k in saved:
        assert saved[k]['state'].keys() == loaded[k]['state'].keys()
        assert all(torch.equal(saved[k]['state'][i][m], loaded[k]['state'][i][m]) for i in saved[k]['state']
                   for m in ('step', 'exp_avg', 'exp_avg_sq')), k
    assert (out / 'training.gif').is_file()

@pytest.mark.parametrize('script', SCRIPTS)
def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(script, tmp_path, toy_teacher, monkeypatch):
    mod = importlib.import_module(script)
    out, saves, real_save = tmp_path / 'run', [], torch.save
    def flaky_save(obj, path, *a, **k):
        saves.append(path)
        if len(saves) == 3:                                  # the third checkpoint: half a file, then the machine dies
            open(path, 'wb').write(b'\x80\x02partial'); raise KeyboardInterrupt
        return real_save(obj, path, *a, **k)
    monkeypatch.setattr(mod.torch, 'save', flaky_save)
    with pytest.raises(SystemExit, match='interrupted'):
        mod.train(mod.get_config([*SHORT, '--out', str(out)]))
    monkeypatch.setattr(mod.torch, 'save', real_save)
    ck = torch.load(out / 'ckpt.pt', weights_only=False)      # the second checkpoint, intact
    assert ck['step'] > 0
    assert run(script, *SHORT, '--out', out, '--resume').returncode == 0

@pytest.mark.parametrize('script', SCRIPTS)
def test_nan_weights_stop_the_run_with_step_and_checkpoint(script, tmp_path, toy_teacher, monkeypatch):
    mod = importlib.import_module(script)
    real_fit = mod.fit
    def fit(cfg, world, nets, opts, step_fn, sampler):
        count = 0
        def poisoned_step():
            nonlocal count
            count += 1
            if count == 20: next(nets['G'].parameters()).data.fill_(float('nan'))
            return step_fn()
        return real_fit(cfg, world, nets, opts, poisoned_step, sampler)
    monkeypatch.setattr(mod, 'fit', fit)
    out = tmp_path / 'run'
    with pytest.raises(SystemExit) as e:
        mod.train(mod.get_config([*SHORT, '--out', str(out), '--log-every', '50']))
    msg = str(e.value)
    assert 'is nan at step 20' in msg and str(out / 'ckpt.pt') in msg
    ck = torch.load(out / 'ckpt.pt', weights_only=False)
    assert ck['step'] < 20
    assert all(torch.isfinite(v).all() for net in ck['nets'].values() for v in net.values() if v.is_floating_point())

def test_nan_weights_from_an_update_are_never_checkpointed(tmp_path, toy_teacher, monkeypatch):
    """Weights that become NaN in the update of a checkpoint step (after the losses of that step were computed and
    found finite) stop the run before they are written: the checkpoint on disk stays the last good one."""
    import dmd
    real_fit = dmd.fit
    def fit(cfg, world, nets, opts, step_fn, sampler):
        count = 0
        def poisoned_after_step():
            nonlocal count
            losses = step_fn()
            count += 1
            if count == 12: next(nets['G'].parameters()).data.fill_(float('nan'))   # 12: a checkpoint step
            return losses
        return real_fit(cfg, world, nets, opts, poisoned_after_step, sampler)
    monkeypatch.setattr(dmd, 'fit', fit)
    out = tmp_path / 'run'
    with pytest.raises(SystemExit, match='G has weights that are not finite at step 12'):
        dmd.train(dmd.get_config([*SHORT, '--out', str(out), '--log-every', '50', '--lambda-reg', '0']))
    ck = torch.load(out / 'ckpt.pt', weights_only=False)
    assert ck['step'] == 6 and all(torch.isfinite(v).all() for v in ck['nets']['G'].values() if v.is_floating_point())

def test_offline_downloads_name_the_url_and_the_place(tmp_path, monkeypatch):
    import dmd
    def offline(*a, **k): raise OSError('network unreachable')
    monkeypatch.setattr(dmd.torch.hub, 'download_url_to_file', offline)
    with pytest.raises(SystemExit, match=r'could not download https://nvlabs-fi-cdn.*edm-cifar10-32x32-uncond-vp.pkl.*put it at .*edm-cifar10'):
        dmd.load_edm(dmd.EDM_UNCOND)
    with pytest.raises(SystemExit, match='inception-2015-12-05.pt'):
        dmd.clean_fid_extractor(torch.device('cpu'))
    import torchvision.datasets.utils as tvu
    monkeypatch.setattr(tvu, 'download_and_extract_archive', offline)
    with pytest.raises(SystemExit, match=r'cifar-10-python.tar.gz into ' + str(tmp_path)):
        dmd.load_cifar10(str(tmp_path))

class Payload:   # unpickling it would create the file `path`: the test checks that it never exists
    def __init__(self, path): self.path = str(path)
    def __reduce__(self): return (open, (self.path, 'w'))

def test_files_that_would_run_code_are_refused(tmp_path):
    """A ckpt.pt whose settings hold a pickled call, read by --eval-only and --resume as a user would, and one whose
    weights do; a CIFAR-10 batch file with one: each refused in one line that names the file, and the call never runs.
    CIFAR-10's own batches (python 2 pickles naming numpy.core.multiarray) still load."""
    import pickle, dmd
    ran = tmp_path / 'the payload ran'
    out = tmp_path / 'run'
    out.mkdir()
    torch.save(dict(cfg=dict(script='dmd', data='toy', note=Payload(ran)), step=1), out / 'ckpt.pt')
    for flag in ('--eval-only', '--resume'):
        r = run('dmd', '--data', 'toy', '--out', out, flag)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 1 and last.startswith(f'error: {out / "ckpt.pt"} is refused, it names the global ') and \
            'Traceback' not in r.stderr, r.stderr[-2000:]
    torch.save(dict(nets=dict(G=Payload(ran))), tmp_path / 'weights.pt')
    with pytest.raises(SystemExit, match='weights.pt is refused, it names the global .*open: a file that runs'):
        dmd.load_data(str(tmp_path / 'weights.pt'))
    root = make_fake_cifar(tmp_path / 'data', n_per_batch=4)
    batch = os.path.join(root, 'cifar-10-batches-py', 'data_batch_1')
    with open(batch, 'rb') as f:
        good = pickle.load(f)
    with open(batch, 'wb') as f:                                        # the layout of CIFAR-10's python 2 pickles
        f.write(pickle.dumps(good, protocol=2).replace(b'numpy._core.multiarray', b'numpy.core.multiarray'))
    images, labels = dmd.load_cifar10(root)
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8 and labels[:4].tolist() == good['labels']
    with open(os.path.join(root, 'cifar-10-batches-py', 'data_batch_3'), 'wb') as f:
        pickle.dump(dict(data=good['data'], labels=[Payload(ran)]), f)
    with pytest.raises(SystemExit, match=r'data_batch_3 is refused, refusing to load global .*open: a file that runs code'):
        dmd.load_cifar10(root)
    assert not ran.exists()

if __name__ == '__main__':
    print(fault_table())
