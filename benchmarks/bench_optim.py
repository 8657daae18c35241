"""Optimizer step time on the Swin-T and Swin-L parameter sets (28M, 197M), ours against torch's
AdamW (foreach and fused) and timm's Lamb, with achieved memory bandwidth. GPU only.

    python benchmarks/bench_optim.py

Rows:
  plain step      optimizer.step() on fp32 parameters with fp32 gradients (no scale, no clip);
                  ours still makes its grad-norm pass (it reads the gradients twice).
  O1 fp16 step    what main.py does after backward at O1 fp16: unscale, clip 5.0, step, scale update.
                  torch: GradScaler.unscale_ + clip_grad_norm_ + GradScaler.step (a host sync) + update.
  O2 bf16 step    half model + fp32 master: torch copies the bf16 grads into fp32 master grads,
                  clips, steps and copies the masters back into the bf16 model; ours reads the bf16
                  grads and writes master, moments and bf16 weights in one pass.
GB/s counts the bytes our kernels move (AdamW fp32: grads twice + p, m, v read and written = 32
B/param; O2: bf16 grads twice + p, m, v r/w + bf16 weight = 30 B/param; LAMB fp32: 44 B/param) over the row's time, so torch's rows
read as 'effective' bandwidth for the same update. H100 SXM peak: 3352 GB/s.
"""
import functools

import torch

from common import cuda_time_ms, environment, write_results

from amp import Precision
from kernels.optimizers import FusedAdamW, FusedLAMB
from models.swin_transformer import SwinTransformer
from optimizer import param_groups

MODELS = {
    'Swin-T': dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    'Swin-L': dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
}
PEAK_GBS = 3352.


def _fill_grads(params, dtype=None, scale=1.0):
    g = torch.Generator(device='cuda').manual_seed(0)
    for p in params:
        p.grad = (torch.randn(p.shape, device='cuda', generator=g) * 1e-3 * scale).to(dtype or p.dtype)


def _optimizers(kind, groups):
    if kind == 'adamw':
        return {'torch AdamW (foreach)': lambda: torch.optim.AdamW(groups(), lr=1e-4, foreach=True),
                'torch AdamW (fused=True)': lambda: torch.optim.AdamW(groups(), lr=1e-4, fused=True),
                'ours FusedAdamW (triton)': lambda: FusedAdamW(groups(), lr=1e-4)}
    from timm.optim import Lamb
    return {'timm Lamb (foreach)': lambda: Lamb(groups(), lr=1e-4),
            'ours FusedLAMB (triton)': lambda: FusedLAMB(groups(), lr=1e-4)}


def bench_model(name, cfg, rows):
    torch.manual_seed(0)
    base = SwinTransformer(**cfg).cuda()
    n = sum(p.numel() for p in base.parameters())
    print(f'{name}: {n / 1e6:.1f}M parameters in {len(list(base.parameters()))} tensors', flush=True)

    def row(case, impl, ms, bytes_per_param):
        rows.append({'params': f'{name} ({n / 1e6:.0f}M)', 'case': case, 'impl': impl, 'ms': ms,
                     'GB/s': bytes_per_param * n / ms / 1e6,
                     '% of peak': 100 * bytes_per_param * n / ms / 1e6 / PEAK_GBS})
        print(rows[-1], flush=True)

    # plain step, fp32
    for kind in ('adamw', 'lamb'):
        for impl, make in _optimizers(kind, lambda: param_groups(base, 0.05)).items():
            _fill_grads(base.parameters())
            opt = make()
            row(f'plain step ({kind}, fp32)', impl, cuda_time_ms(opt.step, warmup=5, iters=20),
                32 if kind == 'adamw' else 44)
            del opt

    # O1 fp16: the full main.py step after backward
    for impl, make in _optimizers('adamw', lambda: param_groups(base, 0.05)).items():
        precision = Precision('O1', 'float16', torch.device('cuda'))
        precision._scaler.scale(torch.ones((), device='cuda'))     # what backward() does first
        opt = make()

        _fill_grads(base.parameters(), scale=1024.)     # torch's unscale_ shrinks them in place: harmless here
        step = functools.partial(precision.step, opt, list(base.parameters()), 5.0)
        row('O1 fp16 step (unscale, clip, step)', impl, cuda_time_ms(step, warmup=5, iters=20), 32)

    # O2 bf16: master update then copy (torch) vs one pass (ours)
    for impl, ctor in (('torch AdamW (fused=True) + grad/weight copies', lambda g: torch.optim.AdamW(g, lr=1e-4, fused=True)),
                       ('torch AdamW (foreach) + grad/weight copies', lambda g: torch.optim.AdamW(g, lr=1e-4, foreach=True)),
                       ('ours FusedAdamW, one pass', lambda g: FusedAdamW(g, lr=1e-4))):
        precision = Precision('O2', 'bfloat16', torch.device('cuda'))
        half, master = precision.prepare(SwinTransformer(**cfg).cuda())
        opt = ctor(param_groups(master, 0.05))
        _fill_grads(half.parameters())
        step = functools.partial(precision.step, opt, list(master.parameters()), 5.0)
        row('O2 bf16 step (clip, step, bf16 weights)', impl, cuda_time_ms(step, warmup=5, iters=20), 30)
        torch.cuda.empty_cache()


def main():
    env = environment()
    rows = []
    for name, cfg in MODELS.items():
        bench_model(name, cfg, rows)
        torch.cuda.empty_cache()
    print(write_results('optim', rows, ['params', 'case', 'impl', 'ms', 'GB/s', '% of peak'], env))


if __name__ == '__main__':
    main()
