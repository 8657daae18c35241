"""Fine-tuning from the same weights with and without --fp8: the train loss at about step 200.

The GPU machines reach no network, so released Swin-L weights are not at hand there; the start weights
come from a short bf16 pre-training of the same model on the demo's shapes drawn at 224 px (JPEGs,
data/jpeg_folder.py --demo-shapes). From its last checkpoint (`--pretrained`), fine-tuning runs with the
config's recipe (by default upstream's Swin-L 22k->1k fine-tuning: lr 2e-5, weight decay 1e-8, drop path
0.2) and the recommended flags at O2 bf16: seeds 0 and 1 in bf16 (their difference is the seed spread:
data order, augmentation, drop path) and seed 0 with --fp8 (same data order as bf16's seed 0). Runs are
eager: --fp8 computes the same with --compile, which only its speed needs. Every run is a real main.py.

The check: the mean train loss of the last epoch (the steps up to about --steps) of the --fp8 run lies
within max(the bf16 seed spread, 2% of the bf16 loss) of bf16's seed 0. Needs float8 (Hopper or newer)
and torchao; elsewhere run it with --runs bf16:0 bf16:1 (the rest of the procedure, e.g. on the CPU with
--cfg configs/demo/swin_micro_shapes10.yaml --flags none).

    python benchmarks/fp8_finetune.py --out DIR [--steps 200] [--batch 64] [--runs bf16:0 bf16:1 fp8:0]
"""
import argparse
import glob
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RECOMMENDED  # noqa: E402
from convergence import parse_log  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = 'configs/swin/swin_large_patch4_window7_224_22kto1k_finetune.yaml'
TOLERANCE = 0.02          # relative, when the seed spread is smaller


def main_py(args, tag: str, data: str, epochs: int, seed: int, extra: list, opts: list) -> str:
    """Runs main.py to the end; returns its run folder (holding log_rank0.txt and the checkpoints)."""
    flags = RECOMMENDED if args.flags == 'recommended' else []
    out = os.path.join(args.out, 'runs')
    cmd = [sys.executable, 'main.py', '--cfg', args.cfg, '--data-path', data, '--output', out, '--tag', tag,
           '--batch-size', str(args.batch)] + flags + extra + [
        '--opts', 'TRAIN.EPOCHS', str(epochs), 'SEED', str(seed), 'DATA.NUM_WORKERS', str(args.workers),
        'SAVE_FREQ', '1000', 'PRINT_FREQ', '10'] + opts
    with open(os.path.join(args.out, f'{tag}.out'), 'w') as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED='1'), stdout=log,
                            stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f'{tag}: main.py exited {rc}; see {os.path.join(args.out, tag + ".out")}')
    runs = glob.glob(os.path.join(out, '*', tag))
    assert len(runs) == 1, runs
    return runs[0]


def verdict(bf16: dict, fp8: dict) -> dict:
    """bf16: {seed: final loss} (seeds 0 and 1); fp8: {0: final loss}. The check described above."""
    spread = abs(bf16[1] - bf16[0]) if 1 in bf16 else 0.0
    allowed = max(spread, TOLERANCE * bf16[0])
    diff = abs(fp8[0] - bf16[0]) if 0 in fp8 else None
    return {'bf16_seed_spread': spread, 'allowed': allowed, 'fp8_minus_bf16': None if diff is None else
            fp8[0] - bf16[0], 'within': None if diff is None else diff <= allowed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', required=True)
    p.add_argument('--cfg', default=CFG)
    p.add_argument('--steps', type=int, default=200, help='fine-tuning steps (whole epochs, at least this many)')
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--train-per-class', type=int, default=200, help='10 classes: the epoch is 10x this / batch steps')
    p.add_argument('--pretrain-epochs', type=int, default=4)
    p.add_argument('--pretrain-lr', default='1e-3', help="TRAIN.BASE_LR of the pre-training (scaled by batch / 512)")
    p.add_argument('--workers', type=int, default=8)
    p.add_argument('--flags', choices=['recommended', 'none'], default='recommended')
    p.add_argument('--runs', nargs='+', default=['bf16:0', 'bf16:1', 'fp8:0'], help='PRECISION:SEED fine-tuning runs')
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    data = os.path.join(args.out, 'shapes224')
    if not os.path.isdir(data):
        subprocess.run([sys.executable, '-m', 'data.jpeg_folder', '--out', data, '--demo-shapes', '--size', '224',
                        '--train-per-class', str(args.train_per_class), '--val-per-class', '20'], cwd=ROOT, check=True)
    steps_per_epoch = 10 * args.train_per_class // args.batch        # drop_last, one process
    epochs = -(-args.steps // steps_per_epoch)
    # the start weights: the model pre-trained in bf16 from scratch (warm-up one epoch, then cosine)
    start = main_py(args, 'pretrain', data, args.pretrain_epochs, 0, [],
                    ['TRAIN.BASE_LR', args.pretrain_lr, 'TRAIN.WARMUP_EPOCHS', '1', 'TRAIN.WEIGHT_DECAY', '0.05'])
    ckpt = os.path.join(start, f'ckpt_epoch_{args.pretrain_epochs - 1}.pth')
    final = {'bf16': {}, 'fp8': {}}
    rows = []
    for run in args.runs:
        precision, seed = run.split(':')
        extra = ['--pretrained', ckpt] + (['--fp8'] if precision == 'fp8' else [])
        folder = main_py(args, f'finetune_{precision}_seed{seed}', data, epochs, int(seed), extra,
                         ['TRAIN.WARMUP_EPOCHS', '0'])
        curve = parse_log(os.path.join(folder, 'log_rank0.txt'), run, int(seed))
        rows += [dict(r, steps=(r['epoch'] + 1) * steps_per_epoch) for r in curve]
        final[precision][int(seed)] = curve[-1]['train_loss']
        print(json.dumps(rows[-1]), flush=True)
    result = {'cfg': args.cfg, 'batch': args.batch, 'steps': epochs * steps_per_epoch, 'start': ckpt,
              'final_train_loss': final, **(verdict(final['bf16'], final['fp8']) if 0 in final['bf16'] else {}),
              'curves': rows}
    json.dump(result, open(os.path.join(args.out, 'fp8_finetune.json'), 'w'), indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != 'curves'}), flush=True)


if __name__ == '__main__':
    main()
