"""Compare runs: their metrics against kimg in one PNG, and a markdown table of each run's final row.

    python figures/plot_runs.py runs/dmd-toy runs/sid-toy              # writes runs/compare.png, prints the table
    python figures/plot_runs.py runs/A runs/B --png fid.png            # CIFAR-10 runs: FID (legacy, clean) vs kimg

It reads only each run's metrics.jsonl, so it works on runs still training and on copies of that one file. CIFAR-10
panels: fid_legacy and fid_clean; toy panels: mode_tv and precision. Curves are the training evaluations (kimg 0 is
the generator as it starts); the table holds each run's last final row (the end of training, or a later --eval-only).
"""
import argparse, json, os, sys

PANELS = {'cifar10': ('fid_legacy', 'fid_clean'), 'toy': ('mode_tv', 'precision')}

def read_run(folder):   # the rows of folder/metrics.jsonl, in order
    path = os.path.join(folder, 'metrics.jsonl')
    if not os.path.isfile(path): sys.exit(f'error: {path} not found; pass run folders (the --out of a run)')
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows: sys.exit(f'error: {path} holds no evaluation yet')
    return rows

def world_of(rows):   # toy rows carry mode_tv; CIFAR-10 rows carry FID (or nothing, with --fid-samples 0)
    return 'toy' if 'mode_tv' in rows[0] else 'cifar10'

def table(runs):   # markdown: one line per run, its last final row (or its last row, if it has not finished)
    metrics = PANELS[world_of(next(iter(runs.values())))]
    lines = ['| run | kimg | step | sample steps | ' + ' | '.join(metrics) + ' | final |',
             '|---|---|---|---|' + '---|' * len(metrics) + '---|']
    for name, rows in runs.items():
        finals = [r for r in rows if r.get('final')]
        r = (finals or rows)[-1]
        values = ' | '.join(f'{r[k]:.4g}' if k in r else '-' for k in metrics)
        kind = 'eval-only' if r.get('eval_only') else 'yes' if r.get('final') else 'no (still training?)'
        lines.append(f"| `{name}` | {r['kimg']:g} | {r['step']} | {r.get('sample_steps', 1)} | {values} | {kind} |")
    return '\n'.join(lines)

def plot(runs, png):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    metrics = PANELS[world_of(next(iter(runs.values())))]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6))
    for ax, k in zip(axes, metrics):
        for name, rows in runs.items():
            curve = [(r['kimg'], r[k]) for r in rows if k in r and not r.get('eval_only')]
            if curve: ax.plot(*zip(*curve), marker='.', label=name)
        ax.set(xlabel='kimg (thousands of generator images)', ylabel=k, title=k)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split('\n\n', 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('runs', nargs='+', metavar='RUN_DIR', help="run folders, each with the metrics.jsonl of a run")
    p.add_argument('--png', default=os.path.join('runs', 'compare.png'), help='the picture (default: runs/compare.png)')
    args = p.parse_args(argv)
    runs = {os.path.normpath(d): read_run(d) for d in args.runs}
    worlds = {name: world_of(rows) for name, rows in runs.items()}
    if len(set(worlds.values())) > 1: p.error(f'the runs are of different worlds (toy and CIFAR-10): {worlds}')
    os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
    plot(runs, args.png)
    print(table(runs))
    print(f'\nwrote {args.png}')

if __name__ == '__main__':
    main()
