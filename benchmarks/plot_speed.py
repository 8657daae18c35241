"""Bar chart of training and inference img/s from the measured results (results/train_*.json, as
bench_train.py writes them): one panel per model, mode and GPU; within a panel a later date's row
replaces an earlier one of the same configuration, and on one date a file named for its machine or
date (a rerun, e.g. train_tiny_h100c_2026-11-26.json) replaces the plain train_<model>_<set>.json.

    python benchmarks/plot_speed.py [--results benchmarks/results] [--png benchmarks/results/speed.png]
"""
import argparse
import glob
import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
# bench_train.py's --model names, in the chart's order
MODELS = {'tiny': 'Swin-T', 'large': 'Swin-L', 'v2tiny': 'SwinV2-T/256 w8', 'v2base': 'SwinV2-B/192 w12',
          'v2base16': 'SwinV2-B/256 w16 (fine-tuning)', 'v2base24': 'SwinV2-B/384 w24 (fine-tuning)',
          'mlptiny': 'Swin-MLP-T/256'}
THEIRS = ('upstream', 'reference', 'timm')       # rows of upstream's code or math: grey


def load_panels(results: str) -> dict:
    """{(model, mode, gpu): {'rows': {config: img/s}, 'dates': set, 'batch': int}}."""
    files = []
    for path in glob.glob(os.path.join(results, 'train_*.json')):
        d = json.load(open(path))
        env = d.get('env', {})
        files.append((env.get('date', ''), os.path.basename(path), env, d['rows']))
    panels = {}
    for date, _, name, env, rows in sorted((f[0], f[1].count('_') > 2) + f[1:] for f in files):
        model = name.split('_')[1]
        batch = re.search(r'--batch (\d+)', env.get('command', ''))
        for r in rows:
            if 'img/s' not in r or model not in MODELS:
                continue
            p = panels.setdefault((model, r['mode'], env.get('gpu', '?')),
                                  {'rows': {}, 'dates': set(), 'batch': int(batch.group(1)) if batch else 128})
            p['rows'][r['config']] = r['img/s']
            p['dates'].add(date)
    return panels


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--results', default=os.path.join(HERE, 'results'))
    p.add_argument('--png', default=os.path.join(HERE, 'results', 'speed.png'))
    a = p.parse_args()
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    panels = load_panels(a.results)
    order = sorted(panels, key=lambda k: (list(MODELS).index(k[0]), k[1], k[2]))
    heights = [1.0 + 0.22 * len(panels[k]['rows']) for k in order]
    fig, axes = plt.subplots(len(order), 1, figsize=(10, sum(heights) + 0.4), gridspec_kw={'height_ratios': heights})
    for ax, key in zip(axes, order):
        model, mode, gpu = key
        panel = panels[key]
        items = sorted(panel['rows'].items(), key=lambda x: x[1])
        ax.barh([c for c, _ in items], [v for _, v in items],
                color=['tab:gray' if any(w in c.lower() for w in THEIRS) else 'tab:orange' for c, _ in items])
        for i, (_, v) in enumerate(items):
            ax.text(v, i, f' {v:.0f}', va='center', fontsize=7)
        dates = sorted(panel['dates'])
        when = dates[0] if len(dates) == 1 else f'{dates[0]} to {dates[-1]}'
        ax.set_title(f'{MODELS[model]} {mode}, batch {panel["batch"]}, {gpu}, {when} (img/s)', fontsize=9)
        ax.tick_params(axis='y', labelsize=7)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.text(0.01, 0.002, "Grey: upstream's code or math. Latest measurement of each configuration on that GPU kind;\n"
             'rows of one panel may come from different runs and hosts (compare within one run: '
             'benchmarks/results/train_*.md).', fontsize=7)
    fig.savefig(a.png, dpi=100)
    print(a.png)


if __name__ == '__main__':
    main()
