"""The GPU check: every script's full-size training step timed on a CUDA device, and a short full-size run through the
loop, a checkpoint, --resume and the sample grid. Skipped where no CUDA device is present (CI, laptops).

    python -m pytest -q -s tests/test_gpu.py     # on a GPU machine: about 6 minutes on one H100 or H200

It prints one markdown table (script, batch, batch-gpu, precision, compile, ms/step, img/s, TFLOP/s, MFU, peak GiB,
device, torch)
and writes it to $GPU_TABLE (default gpu_table.md in the pytest temporary folder). Offline by design: the teacher is
random (--teacher random), the data synthetic (--bench, or a synthetic CIFAR-10 folder), LPIPS uses a random VGG and
FID is off, because neither the EDM pickle nor the Inception and VGG weights are on such a machine. Budget: --bench 20
in bf16 and --bench 10 in tf32 for each script, --compile for dmd.py only (compilation takes a minute or more).
"""
import json, os, re, subprocess, sys, time
import pytest
import torch
from conftest import ROOT, SCRIPTS, make_fake_cifar

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
BENCH = [(s, 'bf16', False, 20) for s in SCRIPTS] + [(s, 'tf32', False, 10) for s in SCRIPTS] + [('dmd', 'bf16', True, 10)]
ROWS = []

def run(script, *args, timeout=600):
    r = subprocess.run([sys.executable, str(ROOT / f'{script}.py'), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED='1'))
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout

@pytest.mark.parametrize('script, precision, compile_, steps', BENCH)
def test_bench(script, precision, compile_, steps, vgg_weights):
    out = run(script, '--bench', steps, '--precision', precision, *(['--compile'] if compile_ else []))
    line = [l for l in out.splitlines() if l.startswith('bench ')][-1]
    v = dict(re.findall(r'(\w+) (\S+)', line[len('bench '):]))
    ROWS.append(f"| `{script}.py` | {v['batch']} | {v['batch_gpu']} | {v['precision']} | {'yes' if compile_ else 'no'} | "
                f"{float(v['ms_per_step']):.0f} | {float(v['img_per_s']):.0f} | {float(v['tflops']):.1f} | "
                f"{100 * float(v['mfu']):.1f}% | {float(v['peak_mem_gib']):.1f} | {v['device']} | {torch.__version__} |")
    assert float(v['ms_per_step']) > 0

@pytest.mark.parametrize('script', SCRIPTS)
def test_short_full_size_run_with_resume(script, tmp_path, vgg_weights):
    """Four steps at the default CIFAR-10 batch, a checkpoint after two, --resume to the end, and the sample grid."""
    data = make_fake_cifar(tmp_path / 'data', n_per_batch=200)
    args = ['--teacher', 'random', '--data-dir', data, '--out', tmp_path / 'run', '--fid-samples', '0', '--fid-final', '0', '--batch', 64,
            '--eval-every', 1000, *(['--reg-pairs', 256] if script == 'dmd' else [])]
    t0 = time.time()
    run(script, *args, '--kimg', 0.128)                        # 2 steps
    run(script, *args, '--kimg', 0.256, '--resume')            # 2 more
    ck = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=False)
    rows = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl')]
    assert ck['step'] == 4 and [r['step'] for r in rows] == [0, 2, 4] and (tmp_path / 'run' / 'samples.png').exists()
    print(f'{script}: short run with resume in {time.time() - t0:.0f} s')

@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two CUDA devices')
def test_two_gpus_with_torchrun(tmp_path, vgg_weights):
    """Two steps of dmd.py on two GPUs (NCCL), at the default batch split over them, with a checkpoint."""
    data = make_fake_cifar(tmp_path / 'data', n_per_batch=200)
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'dmd.py',
                        '--teacher', 'random', '--data-dir', str(data), '--out', str(tmp_path / 'run'), '--fid-final', '0',
                        '--fid-samples', '0', '--kimg', '0.128', '--reg-pairs', '256'], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=False)['step'] == 2

def test_print_the_table(tmp_path_factory):
    if not ROWS: pytest.skip('no bench rows')
    table = '\n'.join(['| script | batch | batch-gpu | precision | compile | ms/step | img/s | TFLOP/s | '
                       'MFU (of 989 bf16) | peak GiB | device | torch |', '|---|---|---|---|---|---|---|---|---|---|---|---|']
                      + ROWS)
    path = os.environ.get('GPU_TABLE') or str(tmp_path_factory.mktemp('gpu') / 'gpu_table.md')
    with open(path, 'w') as f:
        f.write(table + '\n')
    print('\n' + table)
