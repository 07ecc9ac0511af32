"""After training: --eval-only on every script (a row of metrics.jsonl at the checkpoint's step, the same samples as the
run's own final evaluation, no training, the world taken from the checkpoint), the saved samples (toy .npy, CIFAR-10
.npz in the guided-diffusion evaluator's format) and figures/plot_runs.py on two runs."""
import importlib, json, os, shutil, subprocess, sys
import numpy as np
import pytest
import torch
from conftest import ROOT, SCRIPTS, fake_extractor, make_fake_cifar, run

SHORT = ['--data', 'toy', '--kimg', '8', '--batch', '256', '--eval-every', '4']   # 32 steps, evaluations at 0, 4, 8

def rows(out):
    with open(os.path.join(out, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]

@pytest.mark.parametrize('script', SCRIPTS)
def test_eval_only_scores_the_checkpoint_without_training(script, tmp_path, toy_teacher):
    out = tmp_path / 'run'
    mod = importlib.import_module(script)
    mod.train(mod.get_config([*SHORT, '--out', str(out)]))             # trained here; scored from the command line
    trained, ckpt = rows(out), (out / 'ckpt.pt').read_bytes()
    x_train = np.load(out / 'toy_samples.npy')
    os.remove(out / 'toy_samples.npy')
    r = run(script, '--out', out, '--eval-only')                       # no --data toy: the checkpoint knows its world
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"at step {trained[-1]['step']}" in r.stdout
    after = rows(out)
    assert after[:-1] == trained and [x['kimg'] for x in trained] == [0, 4.096, 8.192]
    new = after[-1]
    assert new['eval_only'] and new['final'] and new['step'] == trained[-1]['step'] == 32
    assert {k: new[k] for k in ('mode_tv', 'precision', 'nll')} == {k: trained[-1][k] for k in ('mode_tv', 'precision', 'nll')}
    assert (out / 'ckpt.pt').read_bytes() == ckpt                      # nothing trained, nothing written back
    x = np.load(out / 'toy_samples.npy')
    assert x.shape == (10000, 2) and np.array_equal(x, x_train)       # the same G_ema on the same noise
    assert len(os.listdir(out / 'frames')) == 6                        # no frame added by the evaluation (.npy, .png)

def test_eval_only_refuses_what_it_cannot_score(tmp_path, toy_teacher):
    """A checkpoint of another script, or none: one line (the command line's is checked once, the rest in-process)."""
    import dmd
    out = tmp_path / 'run'
    dmd.train(dmd.get_config([*SHORT, '--out', str(out)]))
    for other in [s for s in SCRIPTS if s != 'dmd']:
        for flag in ('--eval-only', '--resume'):
            with pytest.raises(SystemExit) as e:
                importlib.import_module(other).get_config(['--data', 'toy', '--out', str(out), flag])
            assert str(e.value) == f'error: {out / "ckpt.pt"} was written by dmd.py'
    r = run(SCRIPTS[-1], '--data', 'toy', '--out', out, '--eval-only')
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f'error: {out / "ckpt.pt"} was written by dmd.py']
    r = run('dmd', '--out', tmp_path / 'none', '--eval-only')
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f'error: no checkpoint {tmp_path / "none" / "ckpt.pt"} '
                                                                   'to --resume or --eval-only']
    assert not (tmp_path / 'none').exists()                            # a refused command leaves no folder

@pytest.mark.parametrize('cond', [False, True])
def test_cifar_final_samples_are_an_npz_for_the_evaluator(tmp_path, cond):
    import dmd
    out = tmp_path / 'r'
    args = ['--teacher', 'random', '--model-channels', '16', '--data-dir', str(make_fake_cifar(tmp_path / 'data')),
            '--out', str(out), '--batch', '8', '--kimg', '0.032', '--eval-every', '0.032', '--lambda-reg', '0',
            '--fid-samples', '0', '--fid-final', '24', '--device', 'cpu'] + ['--cond'] * cond
    dmd.train(dmd.get_config(args), extract=fake_extractor)
    with np.load(out / 'samples_0.032kimg.npz') as f:
        assert f['arr_0'].shape == (24, 32, 32, 3) and f['arr_0'].dtype == np.uint8
        assert sorted(f.files) == (['arr_0', 'arr_1'] if cond else ['arr_0'])
        if cond: assert f['arr_1'].shape == (24,) and f['arr_1'].max() < 10
        first = f['arr_0'].copy()
    final = rows(out)[-1]
    assert final['final'] and final['fid_legacy'] > 0
    os.remove(out / 'samples_0.032kimg.npz')
    cfg = dmd.get_config(['--out', str(out), '--eval-only', '--device', 'cpu', '--fid-final', '24'])   # its --data-dir
    assert (cfg.cond, cfg.data_dir, cfg.lambda_reg) == (cond, str(tmp_path / 'data'), 0)
    res = dmd.train(cfg, extract=fake_extractor)
    again = rows(out)[-1]
    assert again['eval_only'] and again['step'] == final['step'] == 4 and again['fid_legacy'] == final['fid_legacy']
    with np.load(out / 'samples_0.032kimg.npz') as f:
        assert np.array_equal(f['arr_0'], first)
    assert res == again                                                # evaluated (the row), not trained

def test_plot_runs_draws_both_runs_and_tabulates_their_final_rows(tmp_path, toy_teacher):
    outs = [tmp_path / 'dmd', tmp_path / 'sid']
    for script, out in zip(('dmd', 'sid'), outs):
        mod = importlib.import_module(script)
        mod.train(mod.get_config([*SHORT, '--out', str(out)]))
    png = tmp_path / 'cmp.png'
    r = subprocess.run([sys.executable, str(ROOT / 'figures' / 'plot_runs.py'), *map(str, outs), '--png', str(png)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    from PIL import Image
    assert Image.open(png).size[0] > 500
    table = [line for line in r.stdout.splitlines() if line.startswith('| `')]
    assert len(table) == 2
    for line, out in zip(table, outs):
        final = rows(out)[-1]
        assert str(out) in line and f"{final['mode_tv']:.4g}" in line and f"{final['precision']:.4g}" in line
    r = subprocess.run([sys.executable, str(ROOT / 'figures' / 'plot_runs.py'), str(tmp_path / 'nothing')],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and 'metrics.jsonl not found' in r.stderr

def test_resume_of_a_finished_run_says_so_and_changes_nothing(tmp_path, toy_teacher):
    import dmd
    out = tmp_path / 'run'
    dmd.train(dmd.get_config([*SHORT, '--out', str(out)]))
    before, ckpt = rows(out), (out / 'ckpt.pt').read_bytes()
    r = run('dmd', *SHORT, '--out', out, '--resume')
    assert r.returncode == 0 and f'{out} is finished, at step 32 of 32' in r.stdout, r.stdout + r.stderr
    assert rows(out) == before and (out / 'ckpt.pt').read_bytes() == ckpt
