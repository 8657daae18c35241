"""Sweep the LayerNorm backward's launch knobs (layer_norm_bwd(..., launch=...)) at Swin's shapes,
plain and with the residual fusion; prints the best per shape. GPU only.

    python benchmarks/tune_layer_norm.py [--shapes 401408x96 ...]

GPU time from CUDA-graph replay (an eager timing of a ~100 us kernel can time the host instead).
"""
import argparse
import itertools

import torch
import triton

from common import environment, graph_us, write_results

from kernels import layer_norm as ln

SHAPES = [(128 * 3136, 96), (128 * 784, 192), (128 * 196, 384), (128 * 49, 768), (128 * 196, 768)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--shapes', nargs='*', default=[f'{M}x{C}' for M, C in SHAPES])
    shapes = [tuple(int(v) for v in s.split('x')) for s in p.parse_args().shapes]
    env = environment()
    rows = []
    for (M, C), fused_add in itertools.product(shapes, (False, True)):
        x = torch.randn(M, C, device='cuda', dtype=torch.bfloat16)
        dy, dres = torch.randn_like(x), torch.randn_like(x)
        w = torch.randn(C, device='cuda', dtype=torch.bfloat16)
        b = torch.randn_like(w)
        scale = torch.ones(128, device='cuda', dtype=torch.bfloat16)
        _, mean, rstd = ln.layer_norm_fwd(x, w, b, 1e-5)
        kw = dict(dres=dres, scale=scale, branch_dtype=torch.bfloat16) if fused_add else {}
        # bytes: read x, dy (+ dres), write dx (+ dbranch)
        nbytes = x.numel() * 2 * (5 if fused_add else 3)
        best = None
        for rows_, warps, per_sm in itertools.product((2, 4, 8, 16, 32), (4, 8), (4, 8, 16)):
            if rows_ * triton.next_power_of_2(C) > 16384:
                continue
            launch = dict(bwd_rows=rows_, bwd_warps=warps, bwd_programs_per_sm=per_sm)
            us = graph_us(lambda: ln.layer_norm_bwd(dy, x, w, mean, rstd, **kw, launch=launch))
            if us is None:           # e.g. out of resources
                print('skip', rows_, warps, per_sm)
                continue
            if best is None or us < best[0]:
                best = (us, rows_, warps, per_sm)
        default = graph_us(lambda: ln.layer_norm_bwd(dy, x, w, mean, rstd, **kw))
        rows.append({'shape': f'{M}x{C}', 'residual': fused_add, 'default_us': default,
                     'best_us': best[0], 'rows': best[1], 'warps': best[2], 'programs/SM': best[3],
                     'best_GB/s': nbytes / best[0] / 1e3})
        print(rows[-1], flush=True)
    print(write_results('tune_layer_norm', rows, ['shape', 'residual', 'default_us', 'best_us', 'rows', 'warps',
                                                  'programs/SM', 'best_GB/s'], env))


if __name__ == '__main__':
    main()
