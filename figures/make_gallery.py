"""The toy gallery and the class experiments: every method on the 2-D mixture, over several seeds; and the digits gallery.

    python figures/make_gallery.py                  # CPU: 25 toy commands x 3 seeds, hours on 2 cores
    python figures/make_gallery.py --jobs 2         # two runs at a time, one thread each
    python figures/make_gallery.py --only dmd,sid --seeds 0,1,2,3,4   # a subset, more seeds; tables only
    python figures/make_gallery.py --data digits --jobs 2    # 9 digits commands x 3 seeds, about 40 minutes on 2 cores

Each run is `python <script>.py --data toy --seed S --out runs/gallery/seed<S>/<name> [flags]`, exactly as a user runs
it, and its training log goes to log.txt beside it; a run whose toy_samples.npy exists is reused, an interrupted one
resumed (delete runs/gallery to start over). Runs are bit-identical on one machine with one thread count, and change
with the CPU and the thread count (the chaotic training amplifies the last bit), so the tables give the median and
the range over the seeds. Without --only it also writes, from the first seed's runs:
  figures/toy_gallery.png      the final one-step samples of every panel, 10k each (the first: the teacher's Heun sampler)
  figures/toy_training.gif     the same panels through training, one frame per evaluation (each run's frames/)
  figures/dibregman_modes.png  the mode frequencies of dibregman.py --h kl and --h sba --lam 5 against kimg
and it prints the README's tables: the gallery, the course's experiments, Di-Bregman's details per seed, its
reward-tilted runs (Appendix G) and the first-order estimator against the exact one. With --data digits the runs go
to runs/gallery-digits, the table is the judge's (fd_teacher, fd_data, class_tv, confident), and the figure
figures/digits_gallery.png shows 64 final one-step samples of each run beside the teacher's Heun samples.
"""
import argparse, concurrent.futures, json, os, re, subprocess, sys, time
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dmd   # the shared toy world (GaussianMixture2D, toy_teacher, draw_toy) and the teacher's Heun sampler

PANELS = [('dmd', []), ('sid', []), ('consistency', []), ('gan_only', []),
          ('dibregman', ['--h', 'lr']), ('dibregman', ['--h', 'kl']), ('dibregman', ['--h', 'be']),
          ('dibregman', ['--h', 'ls']), ('dibregman', ['--h', 'sba', '--lam', '5'])]
EXPERIMENTS = [('dmd', ['--lambda-reg', '0']), ('dmd', ['--lambda-reg', '0', '--fake-steps', '5']),
               ('dmd', ['--fake-score', 'generator']), ('dmd', ['--lambda-reg', '0', '--fake-score', 'generator']),
               ('dibregman', ['--h', 'sba', '--lam', '5', '--weight-group', '0']), ('sid', ['--alpha', '0']),
               ('consistency', ['--mode', 'ct']), ('gan_only', ['--h', 'lr'])]
TWO_STEP = ('consistency', ['--sample-steps', '2'])                 # experiment 7: --eval-only of the CD run
REWARD = [('dibregman', ['--h', 'kl', '--reward-beta', '1', '--reward-estimator', 'exact']),    # Appendix G
          ('dibregman', ['--h', 'kl', '--reward-beta', '1']),                    # first-order, the limits above sigma 10
          ('dibregman', ['--h', 'kl', '--reward-beta', '1', '--reward-cap', '0']),    # first-order at every sigma
          ('dibregman', ['--h', 'kl', '--reward-beta', '1', '--reward-cap', '5']),
          ('dibregman', ['--h', 'kl', '--reward-beta', '1', '--reward-cap', '3']),
          ('dibregman', ['--h', 'lr', '--reward-beta', '0.5', '--reward-estimator', 'exact']),
          ('dibregman', ['--h', 'lr', '--reward-beta', '0.5']),
          ('dibregman', ['--h', 'kl', '--reward-beta', '-1'])]   # Eq. (35) as printed, for KL and first-order

def name_of(script, flags):
    return script + ''.join('_' + (f[2:] if f.startswith('--') else f) for f in flags)   # a value keeps its sign

def out_of(runs, seed, script, flags):
    return os.path.join(runs, f'seed{seed}', name_of(script, flags))

def finished(out):   # a finished run has saved its final samples (the toy's .npy, the digits' .npz)
    return os.path.isdir(out) and any(f == 'toy_samples.npy' or f.endswith('kimg.npz') for f in os.listdir(out))

def toy_run(runs, seed, script, flags, threads, data='toy'):
    """Runs (or reuses) one command; returns (final row of metrics.jsonl, wall seconds)."""
    out = out_of(runs, seed, script, flags)
    cmd = [sys.executable, f'{script}.py', '--data', data, '--seed', str(seed), '--out', out, *flags]
    if not finished(out):
        cmd += ['--resume'] if os.path.exists(os.path.join(out, 'ckpt.pt')) else []      # an interrupted run
        print('running', ' '.join(['python', *cmd[1:]]), flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
        os.makedirs(out, exist_ok=True)
        t0 = time.time()
        with open(os.path.join(out, 'log.txt'), 'a') as log:
            r = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.PIPE, text=True, env=env)
        if r.returncode: raise RuntimeError(f'{" ".join(cmd[1:])} failed:\n{r.stderr[-3000:]}')
        with open(os.path.join(out, 'wall_s.txt'), 'w') as f:
            f.write(f'{time.time() - t0:.1f}')
    with open(os.path.join(out, 'metrics.jsonl')) as f:
        final = [json.loads(line) for line in f if '"final": true' in line and '"eval_only": false' in line][-1]
    with open(os.path.join(out, 'wall_s.txt')) as f:
        return final, float(f.read())

def two_step(runs, seed):
    """consistency.py --eval-only --sample-steps 2 on the CD run of this seed (once); returns its row and wall time."""
    out = out_of(runs, seed, 'consistency', [])
    if not os.path.exists(os.path.join(out, 'toy_samples_2step.npy')):
        t0 = time.time()
        r = subprocess.run([sys.executable, 'consistency.py', '--out', out, '--eval-only', '--sample-steps', '2'],
                           cwd=ROOT, capture_output=True, text=True)
        if r.returncode: raise RuntimeError(f'the 2-step evaluation of {out} failed:\n{r.stderr[-3000:]}')
        with open(os.path.join(out, 'wall_2step_s.txt'), 'w') as f:
            f.write(f'{time.time() - t0:.1f}')
    with open(os.path.join(out, 'metrics.jsonl')) as f:
        row = [json.loads(line) for line in f if '"eval_only": true' in line and '"sample_steps": 2' in line][-1]
    with open(os.path.join(out, 'wall_2step_s.txt')) as f:
        return row, float(f.read())

def spread(values, fmt='.3f'):   # "median [min-max]" over seeds
    v = np.asarray(values, dtype=float)
    return f'{np.median(v):{fmt}} [{v.min():{fmt}}-{v.max():{fmt}}]' if len(v) > 1 else f'{v[0]:{fmt}}'

def row(script, flags, results):   # results: [(final, wall)] over seeds
    cmd = ' '.join(['python', f'{script}.py', '--data', 'toy', *flags])
    if (script, flags) == TWO_STEP:
        cmd = 'python consistency.py --out <its CD run> --eval-only --sample-steps 2'
    finals, walls = [f for f, _ in results], [w for _, w in results]
    return (f"| `{cmd}` | {finals[0]['kimg']:.0f} | {spread([f['mode_tv'] for f in finals])} | "
            f"{spread([f['precision'] for f in finals])} | {np.median(walls):.0f} s |")

def reward_details(runs, seeds, results):
    """Appendix G's runs: mode_tv against the tilted mixture, precision, mode_tv against the untilted one; then the runs
    without a reward against the tilted mixtures (what the reward moved), and the printed sign's run against beta 1's."""
    print('\n| command | mode_tv (tilted mixture) | precision | mode_tv (untilted mixture) | wall |\n|---|---|---|---|---|')
    for script, flags in REWARD:
        finals, walls = zip(*[results[script, tuple(flags), seed] for seed in seeds])
        print(f"| `python {script}.py --data toy {' '.join(flags)}` | {spread([f['mode_tv'] for f in finals])} | "
              f"{spread([f['precision'] for f in finals])} | {spread([f['mode_tv_untilted'] for f in finals])} | "
              f'{np.median(walls):.0f} s |')
    for h, beta in (['kl', 1.0], ['lr', 0.5], ['kl', -1.0]):
        flags = ['--h', h, '--reward-beta', '-1'] if beta < 0 else ['--h', h]
        tv = [dmd.GaussianMixture2D(tilt=abs(beta)).metrics(torch.from_numpy(np.load(os.path.join(
            out_of(runs, seed, 'dibregman', flags), 'toy_samples.npy'))))['mode_tv'] for seed in seeds]
        print(f"| `python dibregman.py --data toy {' '.join(flags)}`, against the beta {abs(beta):g} tilted mixture | "
              f'{spread(tv)} | | | |')

def first_order_table():
    """Why Eq. (25) needs a cap on the toy (beta 1, 4000 noised data points x_t ~ p_t per sigma): the mean shift sigma^2
    grad log R_t (first coordinate), exact and first-order; the median over the points of each estimate's relative
    error, |estimate - exact| / |exact|, for the first-order shift and for the sigma -> infinity limit that replaces it
    above --reward-cap; and the mean of r* = R_t / Z0 over p_t, which is 1 exactly (Eq. 27), by the first-order R_t."""
    import dibregman
    mixture = dmd.GaussianMixture2D()
    def estimator(*flags):
        cfg = dibregman.get_config(['--data', 'toy', '--h', 'kl', '--reward-beta', '1', *flags])
        return dibregman.reward_tilt(cfg, dibregman.World(cfg))
    exact, first, limit = estimator('--reward-estimator', 'exact'), estimator('--reward-cap', '0'), \
        estimator('--reward-cap', '1e-9')
    print('\n| sigma | mean shift, exact | mean shift, first-order | median error, first-order | median error, limit | '
          'E[r*], first-order |\n|---|---|---|---|---|---|')
    for sigma in (0.1, 0.5, 1, 2, 3, 5, 10, 14, 20, 40, 80):
        g = torch.Generator().manual_seed(3)
        x_t = mixture.sample(4000, g) + sigma * torch.randn(4000, 2, generator=g)
        (_, e), (log_r, f), (_, m) = [tilt(x_t, torch.full((4000, 1), float(sigma))) for tilt in (exact, first, limit)]
        err = [((v - e).norm(dim=1) / e.norm(dim=1)).median().item() for v in (f, m)]
        print(f'| {sigma:g} | {e[:, 0].mean():.3f} | {f[:, 0].mean():.3f} | {err[0]:.2f} | {err[1]:.2f} | '
              f'{log_r.exp().mean():.2f} |')

def frames(out):   # [(kimg, samples (4000, 2))] of a run, in order
    files = sorted(f for f in os.listdir(os.path.join(out, 'frames')) if f.endswith('.npy'))
    return [(float(f[4:-4]), np.load(os.path.join(out, 'frames', f))) for f in files]

def shares(mixture, x):   # each mode's frequency among samples x (N, 2) over its weight, lightest mode first
    k = torch.cdist(torch.as_tensor(x, dtype=torch.float64), mixture.means).argmin(1)
    return torch.bincount(k, minlength=8).double() / len(x) / mixture.weights

def ess_curve(out):   # [(kimg, ess)] from a dibregman run's training log
    with open(os.path.join(out, 'log.txt')) as f:
        return [(float(m[1]), float(m[2])) for m in re.finditer(r'kimg +([\d.]+) .*? ess ([\d.]+)', f.read())]

def dibregman_details(runs, seeds, mixture):
    """Per seed: the final mode shares (frequency / weight) of the three lightest modes under kl and sba 5, and the
    ess of sba 5 (first, final, and the kimg where it first came within 0.05 of its final value), lr's lowest ess."""
    print('\n| seed | kl: shares of modes 1, 2, 3 | sba 5: shares of modes 1, 2, 3 | sba 5: ess first, final, '
          'settled by kimg | lr: lowest ess |\n|---|---|---|---|---|')
    for seed in seeds:
        cells = []
        for h in (['--h', 'kl'], ['--h', 'sba', '--lam', '5']):
            s = shares(mixture, np.load(os.path.join(out_of(runs, seed, 'dibregman', h), 'toy_samples.npy')))
            cells.append(', '.join(f'{v:.2f}' for v in s[:3].tolist()))
        ess = ess_curve(out_of(runs, seed, 'dibregman', ['--h', 'sba', '--lam', '5']))
        final = np.mean([e for _, e in ess[-5:]])
        settled = next((k for k, e in ess if abs(e - final) < 0.05), ess[-1][0])
        lr = min(e for _, e in ess_curve(out_of(runs, seed, 'dibregman', ['--h', 'lr'])))
        print(f'| {seed} | {cells[0]} | {cells[1]} | {ess[0][1]:.2f}, {final:.2f}, {settled:.0f} | {lr:.3f} |')

def animate(outs, titles, path, mixture, teacher):
    """The README's first picture: frame i of every run (each has one frame per evaluation, kimg 0 first) in a 2 x 5 grid
    880 pixels wide, its text at least 11 pixels high, so it reads at the README's width."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation
    plt.rcParams.update({'font.size': 10, 'font.family': 'DejaVu Sans'})
    fig, axes = plt.subplots(2, 5, figsize=(11, 6))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.045, top=0.84, wspace=0.12, hspace=0.42)
    xx, yy = torch.meshgrid(torch.linspace(-3, 3, 160), torch.linspace(-3, 3, 160), indexing='xy')
    log_p = mixture.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).reshape(160, 160).clamp_min(-12)
    movies = [frames(out) for out in outs]
    n = min(len(f) for f in movies)
    def panel(ax, x, name, kimg):
        m = mixture.metrics(torch.as_tensor(x))
        ax.clear()
        ax.contour(xx, yy, log_p, levels=10, cmap='Blues', linewidths=0.6)
        ax.scatter(x[:, 0], x[:, 1], s=1.2, c='tab:red', alpha=0.5, linewidths=0)
        ax.set(xlim=(-2.9, 2.9), ylim=(-2.9, 2.9), aspect='equal', xticks=[], yticks=[])
        ax.set_title(f'{name}\n{kimg}', fontsize=10.5, pad=3)
        ax.set_xlabel(f"tv {m['mode_tv']:.3f}   p {m['precision']:.2f}", fontsize=10.5, labelpad=2)
    def draw(i):
        panel(axes.flat[0], teacher.numpy(), 'teacher (35 steps)', 'Heun')
        for ax, title, movie in zip(axes.flat[1:], titles, movies):
            kimg, x = movie[min(round(i * (len(movie) - 1) / (n - 1)), len(movie) - 1)]
            panel(ax, x, title, f'kimg {kimg:.0f}')
    fig.suptitle('python <script>.py --data toy: one-step samples (red) through training, over the exact density (blue)\n'
                 'tv: mode_tv, the total variation of the 8 mode frequencies from the weights 1:2:...:8; p: precision',
                 fontsize=11, y=0.985)
    FuncAnimation(fig, draw, frames=n).save(path, 'pillow', fps=3, dpi=80)
    plt.close(fig)

def figures(runs, seed, folder, mixture, teacher):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation
    outs = [out_of(runs, seed, script, flags) for script, flags in PANELS]
    titles = [f"{script} {' '.join(flags)}".strip() for script, flags in PANELS]
    # the static gallery: 10k final samples of each run, as its metrics.jsonl row scores them
    fig, axes = plt.subplots(2, 5, figsize=(17, 7.6))
    dmd.draw_toy(axes.flat[0], mixture, teacher, 'teacher, Heun 35 NFE')
    for ax, out, title in zip(axes.flat[1:], outs, titles):
        dmd.draw_toy(ax, mixture, torch.from_numpy(np.load(os.path.join(out, 'toy_samples.npy'))), title)
    fig.suptitle(f'one-step samples on the 2-D mixture (weights 1:2:...:8), --seed {seed}; contours: the exact density')
    fig.savefig(os.path.join(folder, 'toy_gallery.png'), dpi=80, bbox_inches='tight')
    plt.close(fig)
    animate(outs, titles, os.path.join(folder, 'toy_training.gif'), mixture, teacher[:4000])
    # Di-Bregman's mode frequencies against kimg, kl and sba 5
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    colors = plt.get_cmap('viridis')(np.linspace(0, 0.9, 8))
    for ax, h in zip(axes, (['--h', 'kl'], ['--h', 'sba', '--lam', '5'])):
        movie = frames(out_of(runs, seed, 'dibregman', h))
        freq = np.stack([(shares(mixture, x) * mixture.weights).numpy() for _, x in movie])
        for k in range(8):
            ax.plot([kimg for kimg, _ in movie], freq[:, k], color=colors[k], marker='.')
            ax.axhline(mixture.weights[k].item(), color=colors[k], ls='--', lw=0.8)
        ax.set(title=f"dibregman.py --data toy {' '.join(h)} --seed {seed}", xlabel='kimg (4000 samples each)',
               yscale='log')
    axes[0].set_ylabel('mode frequency (dashed: the mixture weight k/36)')
    fig.savefig(os.path.join(folder, 'dibregman_modes.png'), dpi=80, bbox_inches='tight')
    plt.close(fig)

def digits_table(commands, results, seeds):
    """The judge's figures of the final one-step samples (50k each) of every digits command, over the seeds."""
    print(f'\nmedian [min-max] over seeds {seeds}; wall: the median run time (one thread, two runs at a time)')
    print('\n| command | kimg | fd_teacher | fd_data | class_tv | confident | wall |\n|---|---|---|---|---|---|---|')
    for script, flags in commands:
        finals, walls = zip(*[results[script, tuple(flags), seed] for seed in seeds])
        cells = [spread([f[k] for f in finals], '.3g' if k.startswith('fd') else '.3f')
                 for k in ('fd_teacher', 'fd_data', 'class_tv', 'confident')]
        cmd = ' '.join(['python', f'{script}.py', '--data', 'digits', *flags])
        print(f"| `{cmd}` | {finals[0]['kimg']:g} | {' | '.join(cells)} | {np.median(walls):.0f} s |")

def digits_figure(runs, seed, folder):
    """figures/digits_gallery.png: the teacher's 18-step Heun samples of 64 noises, then 64 final one-step samples of
    each panel's run (its samples_<kimg>kimg.npz), each titled with the run's final fd_teacher and class_tv."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid
    z = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(123))
    panels = [('teacher: Heun, 35 NFE', dmd.to_uint8(dmd.heun_sample(dmd.digits_teacher(), z)), '')]
    for script, flags in PANELS:
        out = out_of(runs, seed, script, flags)
        npz = next(f for f in os.listdir(out) if f.endswith('kimg.npz'))
        final = [json.loads(line) for line in open(os.path.join(out, 'metrics.jsonl')) if '"final": true' in line][-1]
        images = torch.from_numpy(np.load(os.path.join(out, npz))['arr_0'][:64]).permute(0, 3, 1, 2)
        panels.append((f"{script} {' '.join(flags)}".strip(), images,
                       f"fd_teacher {final['fd_teacher']:.2f}  class_tv {final['class_tv']:.2f}"))
    fig, axes = plt.subplots(2, 5, figsize=(15, 7))
    for ax, (title, images, text) in zip(axes.flat, panels):
        ax.imshow(make_grid(images, pad_value=255).permute(1, 2, 0).numpy(), interpolation='nearest')
        ax.set(xticks=[], yticks=[], title=title, xlabel=text)
    fig.suptitle(f'python <script>.py --data digits --seed {seed}: one-step samples (8x8; 50k scored); first panel: '
                 'the teacher the methods distil')
    fig.savefig(os.path.join(folder, 'digits_gallery.png'), dpi=80, bbox_inches='tight')
    plt.close(fig)

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split('\n\n', 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--seeds', default='0,1,2', help='comma-separated seeds, at least 3 (default: 0,1,2)')
    p.add_argument('--only', help='comma-separated scripts to run, e.g. dmd,sid (default: all; figures need all)')
    p.add_argument('--jobs', type=int, default=1, help='runs at a time; above 1, each on one thread (default: 1)')
    p.add_argument('--data', choices=['toy', 'digits'], default='toy', help='the world (default: toy)')
    p.add_argument('--runs', help='where the runs go, reused (default: runs/gallery, digits: runs/gallery-digits)')
    p.add_argument('--figures', default=os.path.join(ROOT, 'figures'), help='where the figures go')
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(',')]
    args.runs = args.runs or os.path.join(ROOT, 'runs', 'gallery' + ('-digits' if args.data == 'digits' else ''))
    if len(seeds) < 3: p.error('--seeds: give at least 3, for a median and a range')
    scripts = args.only.split(',') if args.only else sorted({s for s, _ in PANELS})
    unknown = set(scripts) - {s for s, _ in PANELS}
    if unknown: p.error(f'--only: unknown scripts {sorted(unknown)}')
    panels, experiments = [c for c in PANELS if c[0] in scripts], [c for c in EXPERIMENTS if c[0] in scripts]
    commands = panels + experiments + [c for c in REWARD if c[0] in scripts]
    if args.jobs > 1: torch.set_num_threads(1)          # as each run: two threads per core slow tiny networks 100x
    if args.data == 'digits':
        dmd.digits_teacher()                            # trained once (cached) before the runs, which all load it
        panels = [c for c in PANELS if c[0] in scripts]
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            jobs = {(s, tuple(f), seed): pool.submit(toy_run, args.runs, seed, s, f, 1 if args.jobs > 1 else 0, 'digits')
                    for seed in seeds for s, f in panels}
            results = {k: v.result() for k, v in jobs.items()}
        digits_table(panels, results, seeds)
        if not args.only: digits_figure(args.runs, seeds[0], args.figures)
        return
    dmd.toy_teacher()                                   # trained once (cached) before the runs, which all load it
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        jobs = {(s, tuple(f), seed): pool.submit(toy_run, args.runs, seed, s, f, 1 if args.jobs > 1 else 0)
                for seed in seeds for s, f in commands}
        results = {k: v.result() for k, v in jobs.items()}
    if 'consistency' in scripts:
        experiments.append(TWO_STEP)
        results.update({(TWO_STEP[0], tuple(TWO_STEP[1]), seed): two_step(args.runs, seed) for seed in seeds})
    mixture = dmd.GaussianMixture2D()
    z = torch.randn(10000, 2, generator=torch.Generator().manual_seed(123))       # the scripts' evaluation noise
    teacher = dmd.heun_sample(dmd.toy_teacher(), z)
    m = mixture.metrics(teacher)
    print(f'\nmedian [min-max] over seeds {args.seeds}; 10k samples per number; wall: the median run time')
    head = '| command | kimg | mode_tv | precision | wall |\n|---|---|---|---|---|'
    print(f'\n{head}\n| teacher, Heun 35 NFE (reference) | | {m["mode_tv"]:.3f} | {m["precision"]:.3f} | |')
    print('\n'.join(row(s, f, [results[s, tuple(f), seed] for seed in seeds]) for s, f in panels))
    print(f'\n{head}')
    print('\n'.join(row(s, f, [results[s, tuple(f), seed] for seed in seeds]) for s, f in experiments))
    if 'dibregman' in scripts: dibregman_details(args.runs, seeds, mixture)
    if 'dibregman' in scripts: reward_details(args.runs, seeds, results)
    if 'dibregman' in scripts: first_order_table()
    if args.only: return
    figures(args.runs, seeds[0], args.figures, mixture, teacher)
    print(f'\nwrote the figures of seed {seeds[0]} to {args.figures}')

if __name__ == '__main__':
    main()
