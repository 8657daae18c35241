"""Where a training step's time goes: wall time vs GPU busy time per step, and the top kernels.

    python benchmarks/profile_step.py --model tiny --flags all --level O1 --dtype bfloat16 [--compile]
        [--fp8 tensorwise|rowwise [--fp8-layers fc1 fc2]]   (--fp8: torchao, O2 bf16)
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench_train import ALL, MODELS, build
from common import train_step

from amp import FP8_LAYERS, Precision, enable_fp8
from config import FP8_RECIPES
from kernels.optimizers import FusedAdamW
from optimizer import param_groups

FLAG_SETS = {'none': {}, 'all': ALL, 'attn': dict(fused_attention=True), 'all5': dict(ALL, fused_mlp=True, fused_dense=True)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--model', default='tiny', choices=list(MODELS))
    p.add_argument('--flags', default='all', choices=list(FLAG_SETS))
    p.add_argument('--level', default='O1')
    p.add_argument('--dtype', default='bfloat16')
    p.add_argument('--compile', action='store_true')
    p.add_argument('--top', type=int, default=15)
    p.add_argument('--fused_adam', action='store_true')
    p.add_argument('--fp8', choices=FP8_RECIPES, default=None)
    p.add_argument('--fp8-layers', nargs='+', default=list(FP8_LAYERS), choices=list(FP8_LAYERS))
    a = p.parse_args()
    precision = Precision(a.level, a.dtype, torch.device('cuda'))
    net = build(a.model, FLAG_SETS[a.flags])
    if a.fp8:
        enable_fp8(net, a.fp8, layers=tuple(a.fp8_layers))
    model, master = precision.prepare(net.cuda())
    opt = (FusedAdamW if a.fused_adam else torch.optim.AdamW)(param_groups(master, 0.05), lr=1e-4)
    run = torch.compile(model) if a.compile else model
    x = precision.cast_input(torch.randn(128, 3, 224, 224, device='cuda'))
    y = torch.randint(0, 1000, (128,), device='cuda')

    step = train_step(precision, run, model, master, opt, x, y)
    for _ in range(8):
        step()
    torch.cuda.synchronize()
    steps = 5
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.time()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = (time.time() - t0) / steps * 1e3
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_total = sum(e.self_device_time_total for e in events) / steps / 1e3
    fp8 = f' fp8={a.fp8}:{",".join(a.fp8_layers)}' if a.fp8 else ''
    print(f'{a.model} flags={a.flags} {a.level} {a.dtype} compile={a.compile}{fp8}: '
          f'wall {wall:.1f} ms/step (profiled), GPU busy {gpu_total:.1f} ms/step, '
          f'{sum(e.count for e in events) / steps:.0f} kernels/step')
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:a.top]:
        print(f'  {e.self_device_time_total / steps / 1e3:7.2f} ms  {e.count // steps:5d}x  {e.key[:110]}')


if __name__ == '__main__':
    main()
