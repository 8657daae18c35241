"""Convergence check: the same seed and data, flags on vs off and O1 vs O2, each twice (seeds 0
and 1) to see run-to-run noise; plus DDP on 2 GPUs vs 1 GPU at the same global batch. Every run is
a real `main.py` training run on the generated shapes dataset; curves come from its logs.

`--set pipeline`: upstream's PIL input pipeline vs `--data-pipeline gpu` on the same shapes drawn at
224 px and saved as JPEGs (with the odd files: grey, CMYK, progressive, PNG named .JPEG), the micro
model at patch 4 / window 7, upstream's default RandAugment and random erasing (mixup off, so that
the small model learns in a short run), each pipeline with seeds 0 and 1.

`--set pipeline` also runs the gpu pipeline with upstream's decode (`EXTRA.JPEG_DECODE workers`: PIL
in the workers), which tells nvJPEG's decode apart from the augmentation.

`--set fp8`: the recommended flags at O2 bf16 with and without `--fp8` (torchao; Hopper or newer) on
the same 224-px JPEGs and micro model (PIL pipeline), seeds 0 and 1.

`--set v2` / `--set mlp`: the micro model as Swin V2 / Swin-MLP (same dims, MODEL.TYPE swinv2 / swin_mlp),
flags off vs all flags (those that apply) + fused AdamW at O2 bf16, seeds 0 and 1, on the demo's shapes.

`--set recommended`: the README's two recommended configurations (the best flags + `--compile` with
CUDA graphs; the best flags + `--cuda-graph --fused_mlp --fused_dense`) beside flags off at O1 bf16, on
the 224-px JPEGs with upstream's default RandAugment and erasing, seeds 0 and 1.

    python benchmarks/convergence.py run  --out DIR [--epochs 20] [--gpus 2] \
        [--set pipeline|v2|mlp|fp8|recommended]                                                   # GPU machine
    python benchmarks/convergence.py plot --out DIR                                              # anywhere
"""
import argparse
import csv
import os
import re
import subprocess
import sys
import time

from common import RECOMMENDED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = 'configs/demo/swin_micro_shapes10.yaml'
FLAGS = ['--fused_window_process', '--unfused_mha', '--fused_layernorm', '--fused_mlp', '--fused_dense',
         '--fused_adam']
VARIANTS = {   # name: (extra main.py args, processes)
    'flags off, O1 bf16': (['--amp-opt-level', 'O1', '--amp-dtype', 'bfloat16'], 1),
    'all flags + fused_adam, O1 bf16': (['--amp-opt-level', 'O1', '--amp-dtype', 'bfloat16'] + FLAGS, 1),
    'flags off, O2 bf16': (['--amp-opt-level', 'O2', '--amp-dtype', 'bfloat16'], 1),
    'all flags + fused_adam, O2 bf16': (['--amp-opt-level', 'O2', '--amp-dtype', 'bfloat16'] + FLAGS, 1),
    'DDP 2 GPUs x 32, flags off, O1 bf16': (['--amp-opt-level', 'O1', '--amp-dtype', 'bfloat16',
                                             '--batch-size', '32'], 2),
}


JPEG224 = ['DATA.IMG_SIZE', '224', 'MODEL.SWIN.PATCH_SIZE', '4', 'MODEL.SWIN.WINDOW_SIZE', '7',
           'AUG.AUTO_AUGMENT', 'rand-m9-mstd0.5-inc1', 'AUG.REPROB', '0.25']
PIPELINE_VARIANTS = {   # name: (extra main.py args, extra --opts)
    'PIL pipeline, JPEG 224, O1 bf16': (['--data-pipeline', 'pil', '--amp-opt-level', 'O1', '--amp-dtype', 'bfloat16'],
                                        JPEG224),
    'gpu pipeline, JPEG 224, O1 bf16': (['--data-pipeline', 'gpu', '--amp-opt-level', 'O1', '--amp-dtype', 'bfloat16'],
                                        JPEG224),
    # the same with upstream's decode (PIL in the workers): separates nvJPEG's decode from the augmentation
    'gpu pipeline, PIL decode, JPEG 224, O1 bf16': (['--data-pipeline', 'gpu', '--amp-opt-level', 'O1', '--amp-dtype',
                                                     'bfloat16'], JPEG224 + ['EXTRA.JPEG_DECODE', 'workers']),
}

# the recommended flags at O2 bf16, with and without float8 GEMMs (torchao; Hopper or newer)
FP8_VARIANTS = {   # name: (extra main.py args, extra --opts)
    'best flags, O2 bf16, JPEG 224': (RECOMMENDED, JPEG224),
    '--fp8 + best flags, O2 bf16, JPEG 224': (RECOMMENDED + ['--fp8'], JPEG224),
}


V2_MICRO = ['MODEL.TYPE', 'swinv2', 'MODEL.SWINV2.PATCH_SIZE', '2', 'MODEL.SWINV2.EMBED_DIM', '48',
            'MODEL.SWINV2.DEPTHS', '[2, 2]', 'MODEL.SWINV2.NUM_HEADS', '[3, 6]', 'MODEL.SWINV2.WINDOW_SIZE', '4']
V2_VARIANTS = {   # name: (extra main.py args, extra --opts)
    'V2 flags off, O2 bf16': (['--amp-opt-level', 'O2', '--amp-dtype', 'bfloat16'], V2_MICRO),
    'V2 all flags + fused_adam, O2 bf16': (['--amp-opt-level', 'O2', '--amp-dtype', 'bfloat16'] + FLAGS, V2_MICRO),
}

# the README's recommended configurations (O2 bf16, the fused flags and AdamW) compiled with CUDA graphs
# and, without compiling, the captured step with the two GEMM-epilogue flags, beside flags off; 224-px JPEGs
RECOMMENDED_VARIANTS = {   # name: (extra main.py args, extra --opts)
    'flags off, O1 bf16, JPEG 224': (['--amp-opt-level', 'O1', '--amp-dtype', 'bfloat16'], JPEG224),
    'best flags + --compile (CUDA graphs), JPEG 224': (RECOMMENDED + ['--compile'],
                                                       JPEG224 + ['EXTRA.COMPILE_MODE', 'reduce-overhead']),
    'best flags + --cuda-graph --fused_mlp --fused_dense, JPEG 224': (
        RECOMMENDED + ['--cuda-graph', '--fused_mlp', '--fused_dense'], JPEG224),
}

MLP_MICRO = ['MODEL.TYPE', 'swin_mlp', 'MODEL.SWIN_MLP.PATCH_SIZE', '2', 'MODEL.SWIN_MLP.EMBED_DIM', '48',
             'MODEL.SWIN_MLP.DEPTHS', '[2, 2]', 'MODEL.SWIN_MLP.NUM_HEADS', '[3, 6]', 'MODEL.SWIN_MLP.WINDOW_SIZE', '4']
MLP_FLAGS = ['--fused_window_process', '--fused_layernorm', '--fused_mlp', '--fused_dense', '--fused_adam']
MLP_VARIANTS = {   # name: (extra main.py args, extra --opts)
    'MLP flags off, O2 bf16': (['--amp-opt-level', 'O2', '--amp-dtype', 'bfloat16'], MLP_MICRO),
    'MLP all flags + fused_adam, O2 bf16': (['--amp-opt-level', 'O2', '--amp-dtype', 'bfloat16'] + MLP_FLAGS,
                                            MLP_MICRO),
}


def run_set(args, variants: dict, data: str, csv_name: str) -> None:
    """Each variant with seeds 0 and 1, spread over the GPUs."""
    procs = []
    for name, (extra, opts) in variants.items():
        for seed in (0, 1):
            procs.append(_start(args, data, name, seed, extra, opts, gpus=str(len(procs) % args.gpus)))
    _finish(args, procs, csv_name)


def run_v2(args):
    data = os.path.join(args.out, 'shapes10')
    subprocess.run([sys.executable, '-m', 'data.demo_dataset', '--out', data], cwd=ROOT, check=True)
    run_set(args, V2_VARIANTS, data, 'convergence_v2.csv')


def _shapes224(args) -> str:
    """The demo's shapes drawn at 224 px as JPEGs (with the odd files), made once under --out."""
    data = os.path.join(args.out, 'shapes224')
    if not os.path.isdir(data):
        subprocess.run([sys.executable, '-m', 'data.jpeg_folder', '--out', data, '--demo-shapes', '--size', '224',
                        '--train-per-class', '200', '--val-per-class', '50'], cwd=ROOT, check=True)
    return data


def run_mlp(args):
    data = os.path.join(args.out, 'shapes10')
    subprocess.run([sys.executable, '-m', 'data.demo_dataset', '--out', data], cwd=ROOT, check=True)
    run_set(args, MLP_VARIANTS, data, 'convergence_mlp.csv')


def run_recommended(args):
    run_set(args, RECOMMENDED_VARIANTS, _shapes224(args), 'convergence_recommended.csv')


def run_pipelines(args):
    run_set(args, PIPELINE_VARIANTS, _shapes224(args), 'convergence_pipeline.csv')


def run_fp8(args):
    run_set(args, FP8_VARIANTS, _shapes224(args), 'convergence_fp8.csv')


def _slug(name: str) -> str:
    return re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')


def run(args):
    data = os.path.join(args.out, 'shapes10')
    subprocess.run([sys.executable, '-m', 'data.demo_dataset', '--out', data], cwd=ROOT, check=True)
    jobs = [(name, seed) for seed in (0, 1) for name in VARIANTS]
    jobs = [j for j in jobs if not (VARIANTS[j[0]][1] > 1 and j[1] == 1)]   # DDP once
    jobs = [j for j in jobs if not args.only or j[0] in args.only]
    procs = []
    for i, (name, seed) in enumerate(jobs):
        extra, nproc = VARIANTS[name]
        if nproc > 1:
            launcher = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc),
                        '--master_port', str(29600 + i)]
            procs.append(_start(args, data, name, seed, extra, launcher=launcher,
                                gpus=','.join(str(g) for g in range(nproc))))
        else:
            procs.append(_start(args, data, name, seed, extra, gpus=str(i % args.gpus)))
    _finish(args, procs, 'convergence.csv')


def _start(args, data, name, seed, extra, opts=(), launcher=None, gpus='0'):
    """One main.py run of variant `name` in the background, logged to <out>/<tag>.out."""
    tag = f'{_slug(name)}_seed{seed}'
    cmd = (launcher or [sys.executable]) + ['main.py', '--cfg', CFG, '--data-path', data, '--output', args.out,
                                            '--tag', tag] + extra + \
        ['--opts', 'TRAIN.EPOCHS', str(args.epochs), 'SEED', str(seed), 'DATA.NUM_WORKERS', '3',
         'EXTRA.TENSORBOARD', str(_has_tensorboard())] + list(opts)
    env = dict(os.environ, PYTHONUNBUFFERED='1', CUDA_VISIBLE_DEVICES=gpus)
    log = open(os.path.join(args.out, f'{tag}.out'), 'w')
    return name, seed, tag, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(args, procs, csv_name: str) -> None:
    """Wait for the runs, then write every curve to <out>/<csv_name> and print the summary."""
    t0 = time.time()
    rows = []
    for name, seed, tag, p in procs:
        p.wait()
        print(f'{name} seed {seed}: exit {p.returncode} ({time.time() - t0:.0f} s)', flush=True)
        rows += read_curves(os.path.join(args.out, 'swin_micro_shapes10', tag), name, seed)
    with open(os.path.join(args.out, csv_name), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=['variant', 'seed', 'epoch', 'train_loss', 'val_acc1'])
        w.writeheader()
        w.writerows(rows)
    summarize(rows)


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def read_curves(run_dir: str, name: str, seed: int) -> list:
    """Per-epoch train loss and val acc@1 of one run: from its TensorBoard scalars (EXTRA.TENSORBOARD)
    where they exist, else from its text log."""
    tb = read_tensorboard(run_dir)
    if tb:
        return [{'variant': name, 'seed': seed, 'epoch': e, 'train_loss': loss, 'val_acc1': acc}
                for e, (loss, acc) in sorted(tb.items())]
    return parse_log(os.path.join(run_dir, 'log_rank0.txt'), name, seed)


def read_tensorboard(run_dir: str) -> dict:
    """{epoch: (train/loss, val/acc1)} from the event files main.py writes, or {} if there are none."""
    dirs = [d for d, _, fs in os.walk(run_dir) if any(f.startswith('events.out') for f in fs)]
    if not dirs or not _has_tensorboard():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(dirs[0])
    acc.Reload()
    tags = acc.Tags().get('scalars', [])
    if 'train/loss' not in tags or 'val/acc1' not in tags:
        return {}
    loss = {e.step: e.value for e in acc.Scalars('train/loss')}
    top1 = {e.step: e.value for e in acc.Scalars('val/acc1')}
    return {e: (loss[e], top1[e]) for e in loss if e in top1}


def parse_log(path: str, name: str, seed: int) -> list:
    losses, accs = {}, []
    with open(path) as f:
        for line in f:
            m = re.search(r'EPOCH (\d+) training takes .* train_loss ([\d.]+)', line)
            if m:
                losses[int(m.group(1))] = float(m.group(2))
            m = re.search(r'\* Acc@1 ([\d.]+)', line)
            if m:
                accs.append(float(m.group(1)))
    return [{'variant': name, 'seed': seed, 'epoch': e, 'train_loss': losses[e], 'val_acc1': accs[i]}
            for i, e in enumerate(sorted(losses)) if i < len(accs)]


def summarize(rows):
    last = {}
    for r in rows:
        last[(r['variant'], r['seed'])] = r
    print('| variant | seed | final train loss | final val acc@1 |\n|---|---|---|---|')
    for (v, s), r in sorted(last.items()):
        print(f"| {v} | {s} | {float(r['train_loss']):.4f} | {float(r['val_acc1']):.1f} |")


def plot(args):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    with open(os.path.join(args.out, 'convergence.csv')) as f:
        rows = list(csv.DictReader(f))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (variant, seed) in sorted({(r['variant'], r['seed']) for r in rows}):
        rs = [r for r in rows if r['variant'] == variant and r['seed'] == seed]
        ep = [int(r['epoch']) for r in rs]
        style = '-' if seed == '0' else '--'
        ax1.plot(ep, [float(r['train_loss']) for r in rs], style, label=f'{variant} (seed {seed})')
        ax2.plot(ep, [float(r['val_acc1']) for r in rs], style, label=f'{variant} (seed {seed})')
    ax1.set(xlabel='epoch', ylabel='train loss', title='train loss')
    ax2.set(xlabel='epoch', ylabel='val acc@1 (%)', title='validation accuracy (chance 10%)')
    ax2.legend(fontsize=7)
    fig.tight_layout()
    out = os.path.join(args.png or os.path.join(args.out, 'convergence.png'))
    fig.savefig(out, dpi=110)
    print(out)
    summarize(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('action', choices=['run', 'plot'])
    p.add_argument('--out', required=True)
    p.add_argument('--epochs', type=int, default=20)
    p.add_argument('--gpus', type=int, default=2)
    p.add_argument('--png', default=None)
    p.add_argument('--only', nargs='*', default=None, help='variant names to run (default: all)')
    p.add_argument('--set', choices=list(SETS), default='model',
                   help='model: flags / precision / DDP variants; pipeline: PIL vs gpu input pipeline on JPEGs; '
                        'v2 / mlp: the micro model as Swin V2 / Swin-MLP, flags off vs on; fp8: --fp8 on vs off '
                        'on JPEGs; recommended: the README\'s two recommended configurations vs flags off on JPEGs')
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if a.action == 'plot':
        plot(a)
    else:
        SETS[a.set](a)


SETS = {'model': run, 'pipeline': run_pipelines, 'v2': run_v2, 'mlp': run_mlp, 'fp8': run_fp8,
        'recommended': run_recommended}

if __name__ == '__main__':
    main()
