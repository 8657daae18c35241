"""Bar chart of training and inference img/s from the measured results (results/train_*.json, as
bench_train.py writes them), one panel per model and mode.

    python benchmarks/plot_speed.py [--results benchmarks/results] [--png benchmarks/results/speed.png]
"""
import argparse
import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def load_rows(results: str) -> dict:
    """{(model, mode, config): img/s}, later files overriding earlier ones."""
    rows = {}
    for path in sorted(glob.glob(os.path.join(results, 'train_*.json'))):
        model = os.path.basename(path).split('_')[1]
        for r in json.load(open(path))['rows']:
            if 'img/s' in r:
                rows[(model, r['mode'], r['config'])] = r['img/s']
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--results', default=os.path.join(HERE, 'results'))
    p.add_argument('--png', default=os.path.join(HERE, 'results', 'speed.png'))
    a = p.parse_args()
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = load_rows(a.results)
    panels = sorted({(m, mode) for m, mode, _ in rows}, key=lambda k: (k[0] != 'tiny', k[1]))
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)))
    for ax, (model, mode) in zip(axes, panels):
        items = sorted(((c, v) for (m, md, c), v in rows.items() if m == model and md == mode), key=lambda x: x[1])
        ax.barh([c for c, _ in items], [v for _, v in items],
                color=['tab:orange' if ('flag' in c or 'fused' in c or 'unfused' in c) else 'tab:gray' for c, _ in items])
        for i, (_, v) in enumerate(items):
            ax.text(v, i, f' {v:.0f}', va='center', fontsize=7)
        ax.set_title(f"Swin-{'T' if model == 'tiny' else 'L'} {mode}, batch 128, H100 (img/s; orange: our flags)", fontsize=9)
        ax.tick_params(axis='y', labelsize=7)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.text(0.01, 0.005, 'Latest measurement of each configuration; eager rows of different runs ran on hosts '
             'of different speed (compare within one run: benchmarks/results/train_*.md).', fontsize=7)
    fig.savefig(a.png, dpi=110)
    print(a.png)


if __name__ == '__main__':
    main()
