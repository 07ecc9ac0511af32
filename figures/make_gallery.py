"""The toy gallery and the class experiments: every method on the 2-D mixture, from the same seed.

    python figures/make_gallery.py      # CPU, about 20 minutes on 2 cores: runs each toy command below (--seed 0)

Each run is `python <script>.py --data toy --seed 0 --out runs/gallery/<name> [flags]`, exactly as a user runs it; a
run whose toy_samples.npy already exists is reused (delete runs/gallery to start over). It writes
  figures/toy_gallery.png     the final one-step samples of every panel (the first: the teacher, EDM's Heun sampler)
  figures/toy_training.gif    the same panels through training, one frame per evaluation (each run's frames/)
  figures/dibregman_modes.png the mode frequencies of dibregman.py --h kl and --h sba --lam 5 against kimg
and prints the README's tables: the gallery, and the experiments for a class (wall time per run on this machine).
"""
import argparse, json, os, subprocess, sys, time
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dmd   # the shared toy world (GaussianMixture2D, toy_teacher, draw_toy); every script holds the same code

PANELS = [('dmd', []), ('sid', []), ('consistency', []), ('gan_only', []),
          ('dibregman', ['--h', 'lr']), ('dibregman', ['--h', 'kl']), ('dibregman', ['--h', 'be']),
          ('dibregman', ['--h', 'ls']), ('dibregman', ['--h', 'sba', '--lam', '5'])]
EXPERIMENTS = [('dmd', ['--lambda-reg', '0']), ('dmd', ['--lambda-reg', '0', '--fake-steps', '5']),
               ('sid', ['--alpha', '0']), ('consistency', ['--mode', 'ct']), ('gan_only', ['--h', 'lr']),
               ('dibregman', ['--h', 'sba', '--lam', '5', '--weight-group', '0'])]

def name_of(script, flags):
    return script + ''.join('_' + f.lstrip('-') for f in flags)

def toy_run(runs, script, flags):
    """Runs (or reuses) one toy command; returns its out folder, final metrics and wall time."""
    out = os.path.join(runs, name_of(script, flags))
    cmd = [sys.executable, f'{script}.py', '--data', 'toy', '--seed', '0', '--out', out, *flags]
    if not os.path.exists(os.path.join(out, 'toy_samples.npy')):
        print('running', ' '.join(['python', *cmd[1:]]), flush=True)
        cmd += ['--resume'] if os.path.exists(os.path.join(out, 'ckpt.pt')) else []      # an interrupted run
        t0 = time.time()
        r = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode: sys.exit(f'{" ".join(cmd[1:])} failed:\n{r.stderr[-3000:]}')
        with open(os.path.join(out, 'wall_s.txt'), 'w') as f:
            f.write(f'{time.time() - t0:.1f}')
    with open(os.path.join(out, 'metrics.jsonl')) as f:
        final = [json.loads(line) for line in f][-1]
    with open(os.path.join(out, 'wall_s.txt')) as f:
        return out, final, float(f.read())

def row(script, flags, final, wall):
    cmd = ' '.join(['python', f'{script}.py', '--data', 'toy', *flags])
    return f"| `{cmd}` | {final['kimg']:.0f} | {final['mode_tv']:.3f} | {final['precision']:.3f} | {wall:.0f} s |"

def frames(out):   # [(kimg, samples (4000, 2))] of a run, in order
    files = sorted(f for f in os.listdir(os.path.join(out, 'frames')) if f.endswith('.npy'))
    return [(float(f[4:-4]), np.load(os.path.join(out, 'frames', f))) for f in files]

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--runs', default=os.path.join(ROOT, 'runs', 'gallery'), help='where the toy runs go (reused)')
    p.add_argument('--figures', default=os.path.join(ROOT, 'figures'), help='where the figures go')
    args = p.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    mixture = dmd.GaussianMixture2D()
    z = torch.randn(10000, 2, generator=torch.Generator().manual_seed(123))       # the scripts' evaluation noise
    teacher = dmd.heun_sample(dmd.toy_teacher(), z)
    runs = [(script, flags, *toy_run(args.runs, script, flags)) for script, flags in PANELS]
    # the static gallery
    fig, axes = plt.subplots(2, 5, figsize=(17, 7.4))
    m = mixture.metrics(teacher)
    dmd.draw_toy(axes.flat[0], mixture, teacher[:4000], f"teacher, Heun 35 NFE\nmode_tv {m['mode_tv']:.3f}  "
                 f"precision {m['precision']:.2f}")
    for ax, (script, flags, out, final, wall) in zip(axes.flat[1:], runs):
        x = torch.from_numpy(np.load(os.path.join(out, 'toy_samples.npy')))[:4000]
        dmd.draw_toy(ax, mixture, x, f"{script} {' '.join(flags)}\nmode_tv {final['mode_tv']:.3f}  "
                     f"precision {final['precision']:.2f}")
    fig.suptitle('one-step samples on the 2-D mixture (weights 1:2:...:8), --seed 0; contours: the exact log density')
    fig.savefig(os.path.join(args.figures, 'toy_gallery.png'), dpi=80, bbox_inches='tight')
    # the animated gallery: frame i of every run (each run has one frame per evaluation)
    from matplotlib.animation import FuncAnimation, PillowWriter
    movies = [frames(out) for _, _, out, _, _ in runs]
    n = min(len(f) for f in movies)
    def draw(i):
        dmd.draw_toy(axes.flat[0], mixture, teacher[:2000], 'teacher, Heun 35 NFE')
        for ax, (script, flags, *_), movie in zip(axes.flat[1:], runs, movies):
            kimg, x = movie[min(round(i * (len(movie) - 1) / (n - 1)), len(movie) - 1)]
            m = mixture.metrics(torch.from_numpy(x))
            dmd.draw_toy(ax, mixture, x[:2000], f"{script} {' '.join(flags)}, kimg {kimg:.0f}\n"
                         f"mode_tv {m['mode_tv']:.3f}  precision {m['precision']:.2f}")
    FuncAnimation(fig, draw, frames=n).save(os.path.join(args.figures, 'toy_training.gif'), PillowWriter(fps=3), dpi=45)
    plt.close(fig)
    # Di-Bregman's mode frequencies against kimg, kl and sba 5
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    colors = plt.get_cmap('viridis')(np.linspace(0, 0.9, 8))
    for ax, h in zip(axes, (['--h', 'kl'], ['--h', 'sba', '--lam', '5'])):
        out = next(o for s, f, o, *_ in runs if s == 'dibregman' and f == h)
        movie = frames(out)
        freq = np.stack([np.bincount(((x[:, None] - mixture.means.numpy()) ** 2).sum(-1).argmin(1), minlength=8)
                         for _, x in movie]) / 4000
        for k in range(8):
            ax.plot([kimg for kimg, _ in movie], freq[:, k], color=colors[k], marker='.')
            ax.axhline(mixture.weights[k].item(), color=colors[k], ls='--', lw=0.8)
        ax.set(title=f"dibregman.py --data toy {' '.join(h)}", xlabel='kimg', yscale='log')
    axes[0].set_ylabel('mode frequency (dashed: the mixture weight k/36)')
    fig.savefig(os.path.join(args.figures, 'dibregman_modes.png'), dpi=80, bbox_inches='tight')
    plt.close(fig)
    # the tables
    head = '| command | kimg | mode_tv | precision | wall |\n|---|---|---|---|---|'
    print(f'\n{head}\n| teacher, Heun 35 NFE (reference) | | {m["mode_tv"]:.3f} | {m["precision"]:.3f} | |')
    print('\n'.join(row(s, f, final, wall) for s, f, _, final, wall in runs))
    print(f'\n{head}')
    for script, flags in EXPERIMENTS:
        print(row(script, flags, *toy_run(args.runs, script, flags)[1:]))
    out = os.path.join(args.runs, 'consistency')                                 # the same G_ema, 2 steps
    t0 = time.time()
    r = subprocess.run([sys.executable, 'consistency.py', '--data', 'toy', '--out', out, '--eval-only',
                        '--sample-steps', '2'], cwd=ROOT, capture_output=True, text=True)
    m2 = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"| `python consistency.py --data toy --out runs/gallery/consistency --eval-only --sample-steps 2` | | "
          f"{m2['mode_tv']:.3f} | {m2['precision']:.3f} | {time.time() - t0:.0f} s |")

if __name__ == '__main__':
    main()
