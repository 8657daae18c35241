"""Sweep the window-process kernel's launch knobs (window_partition_fwd(..., launch=...)) at Swin's
shapes; GPU time from CUDA-graph replay, beside a plain copy of the same bytes (torch's clone:
what this card's memory system delivers for a read + write). GPU only.

    python benchmarks/tune_window_process.py
"""
import itertools

import torch

from common import environment, graph_us, write_results

from kernels import window_process as wp

SHAPES = [(128, 56, 96, torch.bfloat16), (128, 56, 96, torch.float32), (128, 28, 192, torch.bfloat16),
          (128, 14, 768, torch.bfloat16)]


def main():
    env = environment()
    rows = []
    for B, HW, C, dtype in SHAPES:
        w = 7
        s = 3 if HW > w else 0
        x = torch.randn(B, HW, HW, C, device='cuda', dtype=dtype)
        nbytes = 2 * x.numel() * x.element_size()
        copy = graph_us(lambda: x.clone())
        default = graph_us(lambda: wp.window_partition_fwd(x, w, s))
        best = None
        for block_rows, block_c, warps in itertools.product((16, 32, 64, 128), (32, 64, 128), (4, 8)):
            if block_rows * block_c > 16384:
                continue
            launch = dict(block_rows=block_rows, block_c=block_c, warps=warps)
            us = graph_us(lambda: wp.window_partition_fwd(x, w, s, launch=launch))
            if us is not None and (best is None or us < best[0]):
                best = (us, block_rows, block_c, warps)
        win = wp.window_partition_ref(x, w, s)
        merge = graph_us(lambda: wp.window_merge_fwd(win, HW, HW, s))
        rows.append({'shape': f'B{B} {HW}x{HW} C{C}', 'dtype': str(dtype)[6:], 'copy_us': copy,
                     'copy_GB/s': nbytes / copy / 1e3, 'default_us': default, 'default_GB/s': nbytes / default / 1e3,
                     'merge_us': merge, 'best_us': best[0], 'best_GB/s': nbytes / best[0] / 1e3,
                     'rows': best[1], 'block_c': best[2], 'warps': best[3]})
        print(rows[-1], flush=True)
    print(write_results('tune_window_process', rows, ['shape', 'dtype', 'copy_us', 'copy_GB/s', 'default_us',
                                                      'default_GB/s', 'merge_us', 'best_us', 'best_GB/s', 'rows', 'block_c',
                                                      'warps'], env))


if __name__ == '__main__':
    main()
