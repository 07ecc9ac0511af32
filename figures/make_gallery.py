"""The toy gallery: one-step samples of every method, and of Di-Bregman's five h of Table 1, on the 2-D mixture.

    python figures/make_gallery.py      # CPU, about 10 minutes: runs each toy distillation with its defaults and --seed 0,
                                        # writes figures/toy_gallery.png and prints the README's toy table

Each panel is `python <script>.py --data toy --out runs/gallery/<name> [flags]`, exactly as a user runs it; a run whose
toy_samples.npy already exists is reused (delete runs/gallery to start over). The first panel is the teacher itself:
EDM's Heun sampler, 35 network evaluations, from the same 10k noise vectors the scripts evaluate with.
"""
import argparse, json, os, subprocess, sys, time
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dmd   # the shared toy world (GaussianMixture2D, toy_teacher, heun_sample); every script holds the same code

PANELS = [('dmd', []), ('sid', []), ('consistency', []), ('gan_only', []),
          ('dibregman', ['--h', 'lr']), ('dibregman', ['--h', 'kl']), ('dibregman', ['--h', 'be']),
          ('dibregman', ['--h', 'ls']), ('dibregman', ['--h', 'sba', '--lam', '5'])]

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--runs', default=os.path.join(ROOT, 'runs', 'gallery'), help='where the toy runs go (reused if present)')
    p.add_argument('--png', default=os.path.join(ROOT, 'figures', 'toy_gallery.png'), help='the figure')
    args = p.parse_args()
    world = dmd.GaussianMixture2D()
    z = torch.randn(10000, 2, generator=torch.Generator().manual_seed(123))       # the scripts' evaluation noise
    panels = [('teacher, Heun 35 NFE', dmd.heun_sample(dmd.toy_teacher(), z), None)]
    rows = []
    for script, flags in PANELS:
        name = script + ''.join('_' + f.lstrip('-') for f in flags)
        out = os.path.join(args.runs, name)
        cmd = [sys.executable, f'{script}.py', '--data', 'toy', '--seed', '0', '--out', out, *flags]
        if not os.path.exists(os.path.join(out, 'toy_samples.npy')):
            print('running', ' '.join(['python', *cmd[1:]]), flush=True)
            cmd += ['--resume'] if os.path.exists(os.path.join(out, 'ckpt.pt')) else []      # an interrupted gallery run
            t0 = time.time(); r = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if r.returncode: sys.exit(f'{" ".join(cmd[1:])} failed:\n{r.stderr[-3000:]}')
            open(os.path.join(out, 'wall_s.txt'), 'w').write(f'{time.time() - t0:.1f}')
        wall = float(open(os.path.join(out, 'wall_s.txt')).read())
        x = torch.from_numpy(np.load(os.path.join(out, 'toy_samples.npy')))
        final = [json.loads(l) for l in open(os.path.join(out, 'metrics.jsonl'))][-1]
        label = f"{script} {' '.join(flags)}".strip()
        panels.append((label, x, final))
        rows.append(f"| `{' '.join(['python', f'{script}.py', '--data', 'toy', *flags])}`" +
                    f" | {final['kimg']:.0f} | {final['mode_tv']:.3f} | {final['precision']:.3f} | {final['nll']:.2f} | {wall:.0f} s |")
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    xx, yy = torch.meshgrid(torch.linspace(-3, 3, 200), torch.linspace(-3, 3, 200), indexing='xy')
    lp = world.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).reshape(200, 200).clamp_min(-12)
    fig, axes = plt.subplots(2, 5, figsize=(17, 7.4))
    for ax, (label, x, final) in zip(axes.flat, panels):
        m = final or world.metrics(x)
        ax.contour(xx, yy, lp, levels=12, cmap='Blues', linewidths=0.6)
        ax.scatter(x[:4000, 0], x[:4000, 1], s=1, c='tab:red', alpha=0.35)
        ax.set(xlim=(-3, 3), ylim=(-3, 3), aspect='equal', xticks=[], yticks=[])
        ax.set_title(f"{label}\nmode_tv {m['mode_tv']:.3f}  precision {m['precision']:.2f}  nll {m['nll']:.2f}", fontsize=9)
    fig.suptitle('one-step samples on the 2-D mixture (weights 1:2:...:8), same seed; contours: exact log density', fontsize=11)
    fig.tight_layout(); fig.savefig(args.png, dpi=90); plt.close(fig)
    print(f'wrote {args.png}\n\n| command | kimg | mode_tv | precision | nll | wall (this run) |\n|---|---|---|---|---|---|')
    t = panels[0][1]; m0 = world.metrics(t)
    print(f"| teacher, Heun 35 NFE (reference) | | {m0['mode_tv']:.3f} | {m0['precision']:.3f} | {m0['nll']:.2f} | |")
    print('\n'.join(rows))

if __name__ == '__main__':
    main()
