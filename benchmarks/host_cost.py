"""Host time of an eager training step around our kernels, on any machine: every Triton kernel is
replaced by a stand-in that launches nothing, so what is timed is the Python and torch dispatch of the
step (our launchers, autograd, the model's own ops on tiny tensors), not the kernels. Eager steps are
bound by host time on a GPU (launch_overhead.py has the per-op picture there); this measures changes to
that host work without a GPU. The model has Swin's layer structure (depths, heads, windows, shifts) at a
tiny width and image, so torch's own ops cost little (not nothing: on a CPU its bf16 GEMMs still take
tens of microseconds a call, where a GPU launch takes a few); outputs are garbage (nothing is computed by
the stand-ins), only the time means anything. Compare runs of one machine only.

    python benchmarks/host_cost.py [--model tiny|large] [--flags none|all|all5] [--level O2] [--steps 30]
        [--profile]                       (--profile: the top Python functions by own time, cProfile)
"""
import argparse
import cProfile
import importlib
import os
import pstats
import sys
import time

os.environ.setdefault('TRITON_INTERPRET', '1')     # launchers accept CPU tensors; nothing is interpreted

import torch  # noqa: E402

from common import environment, train_step, write_results  # noqa: E402

from amp import Precision  # noqa: E402
from kernels.optimizers import FusedAdamW  # noqa: E402
from models.swin_transformer import SwinTransformer  # noqa: E402
from optimizer import param_groups  # noqa: E402

KERNEL_MODULES = ('layer_norm', 'window_attention', 'window_process', 'mlp', 'dense', 'bias_grad', 'optimizers',
                  'spatial_mlp')
FLAGS = {'none': {}, 'all': dict(fused_window_process=True, fused_attention=True, fused_layernorm=True)}
FLAGS['all5'] = dict(FLAGS['all'], fused_mlp=True, fused_dense=True)
DEPTHS = {'tiny': (2, 2, 6, 2), 'large': (2, 2, 18, 2)}


class _NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_kernels() -> int:
    """Replace every Triton kernel of the kernel modules by _NoLaunch; -> how many."""
    import triton
    n = 0
    for name in KERNEL_MODULES:
        module = importlib.import_module(f'kernels.{name}')
        for attr, value in list(vars(module).items()):
            if isinstance(value, triton.runtime.jit.KernelInterface):
                setattr(module, attr, _NoLaunch())
                n += 1
    return n


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--model', default='tiny', choices=list(DEPTHS))
    p.add_argument('--flags', default='all5', choices=list(FLAGS))
    p.add_argument('--level', default='O2')
    p.add_argument('--steps', type=int, default=30)
    p.add_argument('--profile', action='store_true')
    a = p.parse_args()
    torch.set_num_threads(1)
    stubbed = stub_kernels()
    flags = FLAGS[a.flags]
    # width 16, one head a stage, 64-px images with window 2: Swin's structure (shifted and unshifted
    # blocks, masks, merges) at a size where torch's own ops cost little
    net = SwinTransformer(img_size=64, window_size=2, embed_dim=16, depths=DEPTHS[a.model], num_heads=(1, 1, 1, 1),
                          drop_path_rate=0.2, kernel_backend='triton' if flags else 'torch', **flags)
    precision = Precision(a.level, 'bfloat16', torch.device('cpu'))
    model, master = precision.prepare(net)
    opt = (FusedAdamW if flags else torch.optim.AdamW)(param_groups(master, 0.05), lr=1e-4)
    x = precision.cast_input(torch.randn(2, 3, 64, 64))
    y = torch.randint(0, 1000, (2,))

    step = train_step(precision, model, model, master, opt, x, y)
    for _ in range(5):
        step()
    t = time.perf_counter()
    for _ in range(a.steps):
        step()
    ms = (time.perf_counter() - t) / a.steps * 1e3
    row = {'model': a.model, 'flags': a.flags, 'level': a.level, 'kernels_stubbed': stubbed, 'host_ms_per_step': ms}
    print(row, flush=True)
    if a.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5):
            step()
        prof.disable()
        pstats.Stats(prof, stream=sys.stdout).sort_stats('tottime').print_stats(25)
    print(write_results(f'host_cost_{a.model}_{a.flags}', [row], list(row), environment()))


if __name__ == '__main__':
    main()
