"""Whole-model training and inference speed, side by side in one process (the protocol of docs/benchmarks.md).

    python benchmarks/bench_train.py --model tiny|base|large|v2tiny|v2base|v2base16|v2base24|mlptiny [--only NAME ...]

Training: batch 128, 224x224 synthetic inputs already on the GPU, full steps (forward, loss,
backward, clip 5.0 with the loss scaler, AdamW step, zero_grad) through the same `Precision`
class main.py uses; 10 warm-up steps, then 30 timed between CUDA events. Inference: eval,
no_grad, 50 warm-up and 30 timed forwards (upstream's --throughput protocol).
"""
import argparse
import functools
import gc
import math
import os
import time
import types

import torch

from common import cuda_time_ms, environment, train_step, write_results

from amp import FP8_LAYERS, Precision, enable_fp8
from cuda_graph import GraphedTrainStep
from kernels._utils import apex_available, importable
from kernels.optimizers import FusedAdamW, build_apex_optimizer
from models.swin_transformer import SwinTransformer
from models.swin_transformer_v2 import SwinTransformerV2
from optimizer import param_groups

MODELS = {
    'tiny': dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2),
    'large': dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), drop_path_rate=0.2),
    'base': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
    # Swin V2 (configs/swinv2/swinv2_tiny_patch4_window8_256.yaml, ..._base_patch4_window12_192_22k.yaml
    # with a 1000-class head)
    'v2tiny': dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2,
                   img_size=256, window_size=8),
    'v2base': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.2,
                   img_size=192, window_size=12),
    # SwinV2-B fine-tuning from the 22k window-12 model (configs/swinv2/swinv2_base_patch4_window12to16_192to256_
    # 22kto1k_ft.yaml and ..._window12to24_192to384_...; at 384 px pass a smaller --batch)
    'v2base16': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.2,
                     img_size=256, window_size=16, pretrained_window_sizes=(12, 12, 12, 6)),
    'v2base24': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.2,
                     img_size=384, window_size=24, pretrained_window_sizes=(12, 12, 12, 6)),
    # Swin-MLP (configs/swinmlp/swin_mlp_tiny_c24_patch4_window8_256.yaml)
    'mlptiny': dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.2,
                    img_size=256, window_size=8),
}
# a checkout of microsoft/Swin-Transformer (default: .upstream in this repository, git-ignored)
UPSTREAM_DIR = os.environ.get('SWIN_UPSTREAM',
                              os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.upstream'))
ALL = dict(fused_window_process=True, fused_attention=True, fused_layernorm=True)
ALL5 = dict(ALL, fused_mlp=True, fused_dense=True)      # ALL plus the two GEMM-epilogue flags
TIMM = {'tiny': 'swin_tiny_patch4_window7_224', 'large': 'swin_large_patch4_window7_224'}

ATTN = dict(fused_attention=True)
ADAM = dict(optim='fused_adam')            # not a model flag: the optimizer (--fused_adam)
ALL_ADAM = dict(ALL, **ADAM)
WP_LN = dict(fused_window_process=True, fused_layernorm=True)
UNFOLDED = dict(fold=False)   # not a flag: keep the window shuffles out of the LayerNorm kernels
UNDEFERRED = dict(defer=False)   # not a flag: each block adds its own MLP residual (torch's ops)
UNCARRIED = dict(carry=False)    # not a flag: each V2 block partitions its own input (a kernel of its own)
CG = 'reduce-overhead'      # torch.compile with CUDA graphs
MAT = 'max-autotune'        # torch.compile with CUDA graphs and inductor's GEMM templates (bias / GELU inside)
GRAPH = 'graph'             # not torch.compile: the whole eager step captured (--cuda-graph, cuda_graph.py)
# KERNEL_BACKEND apex (apex's LayerNorm, dense and FusedAdam; ours where apex has no op or not
# upstream's math). The earlier fork's configuration, as close as current apex allows: every flag,
# apex's op for each that has one, O2 master weights, apex's FusedAdam.
APEX_OPS = dict(fused_layernorm=True, fused_dense=True, backend='apex', optim='apex_adam')
OURS_OPS = dict(fused_layernorm=True, fused_dense=True, optim='fused_adam')
APEX_FORK = dict(ALL5, backend='apex', optim='apex_adam')
AUTO_APEX = dict(ALL, fused_dense=True, backend='auto', optim='fused_adam')   # auto takes apex's dense

# name, flags, level, dtype, compile (False, True, or a torch.compile mode)
TRAIN = [
    ('reference eager O1 fp16 (upstream default)', {}, 'O1', 'float16', False),
    ('reference eager O1 bf16', {}, 'O1', 'bfloat16', False),
    ('--fused_window_process, O1 bf16', dict(fused_window_process=True), 'O1', 'bfloat16', False),
    ('--unfused_mha (fused attention), O1 bf16', ATTN, 'O1', 'bfloat16', False),
    ('--fused_layernorm, O1 bf16', dict(fused_layernorm=True), 'O1', 'bfloat16', False),
    ('--fused_window_process --fused_layernorm (folded), O1 bf16', WP_LN, 'O1', 'bfloat16', False),
    ('--fused_window_process --fused_layernorm unfolded, O1 bf16', dict(WP_LN, **UNFOLDED), 'O1', 'bfloat16',
     False),
    ('--fused_mlp, O1 bf16', dict(fused_mlp=True), 'O1', 'bfloat16', False),
    ('--fused_dense, O1 bf16', dict(fused_dense=True), 'O1', 'bfloat16', False),
    ('--fused_adam, O1 fp16', ADAM, 'O1', 'float16', False),
    ('all flags eager, O1 bf16', ALL, 'O1', 'bfloat16', False),
    ('all flags + --fused_adam eager, O1 fp16', ALL_ADAM, 'O1', 'float16', False),
    ('all flags + --fused_adam eager, O2 fp16', ALL_ADAM, 'O2', 'float16', False),
    ('all flags + --fused_adam eager, O2 bf16', ALL_ADAM, 'O2', 'bfloat16', False),
    ('all flags + --fused_adam eager unfolded, O2 bf16', dict(ALL_ADAM, **UNFOLDED), 'O2', 'bfloat16', False),
    ('all five flags + --fused_adam eager, O2 bf16', dict(ALL5, **ADAM), 'O2', 'bfloat16', False),
    ('reference eager O3 bf16 (pure bf16)', {}, 'O3', 'bfloat16', False),
    ('reference + compile, O1 bf16', {}, 'O1', 'bfloat16', True),
    ('timm + compile, O1 bf16', 'timm', 'O1', 'bfloat16', True),
    ('all flags + --fused_adam + compile (CUDA graphs), O2 bf16', ALL_ADAM, 'O2', 'bfloat16', CG),
    ('all flags + --fused_adam + compile (CUDA graphs) unfolded, O2 bf16', dict(ALL_ADAM, **UNFOLDED), 'O2',
     'bfloat16', CG),
    ('--unfused_mha + --fused_adam + compile (CUDA graphs), O2 bf16', dict(ATTN, **ADAM), 'O2', 'bfloat16', CG),
    ('reference + --fused_adam + --cuda-graph (whole step, no compile), O2 bf16', ADAM, 'O2', 'bfloat16', GRAPH),
    ('all flags + --fused_adam + --cuda-graph (whole step, no compile), O2 bf16', ALL_ADAM, 'O2', 'bfloat16', GRAPH),
    ('all five flags + --fused_adam + --cuda-graph (whole step, no compile), O2 bf16', dict(ALL5, **ADAM), 'O2',
     'bfloat16', GRAPH),
    ('all five flags + --fused_adam + compile (CUDA graphs), O2 bf16', dict(ALL5, **ADAM), 'O2', 'bfloat16', CG),
    ('all five flags + --fused_adam + --cuda-graph, MLP residual not deferred, O2 bf16',
     dict(ALL5, **ADAM, **UNDEFERRED), 'O2', 'bfloat16', GRAPH),
    ('all five flags + --fused_adam + compile (CUDA graphs), MLP residual not deferred, O2 bf16',
     dict(ALL5, **ADAM, **UNDEFERRED), 'O2', 'bfloat16', CG),
    ('--fp8 (tensorwise) + all flags + --fused_adam + compile (CUDA graphs), O2 bf16', dict(ALL_ADAM, fp8='tensorwise'),
     'O2', 'bfloat16', CG),
    ('--fp8 (rowwise) + all flags + --fused_adam + compile (CUDA graphs), O2 bf16', dict(ALL_ADAM, fp8='rowwise'),
     'O2', 'bfloat16', CG),
    ('--fp8 (tensorwise) + all flags + --fused_adam eager, O2 bf16', dict(ALL_ADAM, fp8='tensorwise'), 'O2',
     'bfloat16', False),
    # where FP8 pays: the MLP alone (the largest GEMMs, fed and read by inductor's own GELU kernel), and
    # upstream's ops under compile, where inductor may fuse the float8 casts into LayerNorm and friends
    ('--fp8 fc1/fc2 only (tensorwise) + all flags + --fused_adam + compile (CUDA graphs), O2 bf16',
     dict(ALL_ADAM, fp8='tensorwise', fp8_layers=('fc1', 'fc2')), 'O2', 'bfloat16', CG),
    ('reference + --fused_adam + compile (CUDA graphs), O2 bf16', ADAM, 'O2', 'bfloat16', CG),
    ('all flags + --fused_adam + compile max-autotune, O2 bf16', ALL_ADAM, 'O2', 'bfloat16', MAT),
    ('reference + --fused_adam + compile max-autotune, O2 bf16', ADAM, 'O2', 'bfloat16', MAT),
    ('--fp8 (tensorwise) + reference + --fused_adam + compile (CUDA graphs), O2 bf16',
     dict(ADAM, fp8='tensorwise'), 'O2', 'bfloat16', CG),
    ('apex: --fused_layernorm --fused_dense --fused_adam, O2 bf16', APEX_OPS, 'O2', 'bfloat16', False),
    ('ours: --fused_layernorm --fused_dense --fused_adam, O2 bf16', OURS_OPS, 'O2', 'bfloat16', False),
    ('apex: earlier fork config (all flags, apex ops where apex has one), O2 fp16', APEX_FORK, 'O2', 'float16',
     False),
    ('apex: earlier fork config (all flags, apex ops where apex has one), O2 bf16', APEX_FORK, 'O2', 'bfloat16',
     False),
    ('apex: all flags + --fused_dense (apex LayerNorm, dense, FusedAdam) + compile (CUDA graphs), O2 bf16',
     dict(ALL, fused_dense=True, backend='apex', optim='apex_adam'), 'O2', 'bfloat16', CG),
    ('apex: auto = our kernels + apex dense: all flags + --fused_dense + --fused_adam eager, O2 bf16',
     AUTO_APEX, 'O2', 'bfloat16', False),
    ('apex: auto = our kernels + apex dense: all flags + --fused_dense + --fused_adam + compile (CUDA graphs), '
     'O2 bf16', AUTO_APEX, 'O2', 'bfloat16', CG),
]
# Swin V2 (--model v2tiny / v2base): upstream's own module (clamp fixed) beside ours, one process
TRAIN_V2 = [
    ('upstream V2 eager O1 fp16 (its code, clamp fixed)', 'upstream', 'O1', 'float16', False),
    ('upstream V2 + compile, O1 bf16', 'upstream', 'O1', 'bfloat16', True),
    ('reference eager O1 fp16 (upstream default)', {}, 'O1', 'float16', False),
    ('all flags + --fused_adam eager, O2 bf16', ALL_ADAM, 'O2', 'bfloat16', False),
    ('all flags + --fused_adam + --cuda-graph (whole step, no compile), O2 bf16', ALL_ADAM, 'O2', 'bfloat16', GRAPH),
    ('all flags + --fused_adam + compile (CUDA graphs), O2 bf16', ALL_ADAM, 'O2', 'bfloat16', CG),
    ('all five flags + --fused_adam + compile (CUDA graphs), O2 bf16', dict(ALL5, **ADAM), 'O2', 'bfloat16', CG),
    # each block partitioning its own input (what the MLP residual kernel's window-layout copy replaces)
    ('all flags + --fused_adam + compile (CUDA graphs), next partition not folded, O2 bf16',
     dict(ALL_ADAM, **UNCARRIED), 'O2', 'bfloat16', CG),
    ('all flags + --fused_adam + --cuda-graph, next partition not folded, O2 bf16', dict(ALL_ADAM, **UNCARRIED), 'O2',
     'bfloat16', GRAPH),
]
# Swin-MLP (--model mlptiny): upstream's own module beside ours; --unfused_mha does not apply (no attention)
MLP_FLAGS = dict(fused_window_process=True, fused_layernorm=True)
TRAIN_MLP = [
    ('upstream MLP eager O1 fp16 (its code)', 'upstream', 'O1', 'float16', False),
    ('reference eager O1 fp16 (upstream default)', {}, 'O1', 'float16', False),
    ('all flags + --fused_adam eager, O2 bf16', dict(MLP_FLAGS, **ADAM), 'O2', 'bfloat16', False),
    ('all flags + --fused_adam + compile (CUDA graphs), O2 bf16', dict(MLP_FLAGS, **ADAM), 'O2', 'bfloat16', CG),
    # the spatial MLP as upstream's ops (what --fused_window_process's kernel replaces), eager and compiled
    ('--fused_layernorm + --fused_adam eager, O2 bf16', dict(fused_layernorm=True, **ADAM), 'O2', 'bfloat16', False),
    ('--fused_layernorm + --fused_adam + compile (CUDA graphs), O2 bf16', dict(fused_layernorm=True, **ADAM), 'O2',
     'bfloat16', CG),
    ('all four flags + --fused_adam + compile (CUDA graphs), O2 bf16',
     dict(MLP_FLAGS, fused_mlp=True, fused_dense=True, **ADAM), 'O2', 'bfloat16', CG),
    ('upstream MLP + compile, O1 bf16', 'upstream', 'O1', 'bfloat16', True),
]
INFER_MLP = [
    ('upstream MLP fp32 (its --throughput)', 'upstream', 'O0', 'float32', False),
    ('all flags O3 bf16', MLP_FLAGS, 'O3', 'bfloat16', False),
]
INFER_V2 = [
    ('upstream V2 fp32 (its --throughput)', 'upstream', 'O0', 'float32', False),
    ('all flags O3 bf16', ALL, 'O3', 'bfloat16', False),
]
INFER = [
    ('reference fp32 (upstream --throughput)', {}, 'O0', 'float32', False),
    ('reference O1 fp16', {}, 'O1', 'float16', False),
    ('all flags O1 fp16', ALL, 'O1', 'float16', False),
    ('all flags O3 bf16', ALL, 'O3', 'bfloat16', False),
    ('reference + compile (CUDA graphs), O3 bf16', {}, 'O3', 'bfloat16', CG),
    ('--unfused_mha + compile (CUDA graphs), O3 bf16', ATTN, 'O3', 'bfloat16', CG),
    ('all flags + compile (CUDA graphs), O3 bf16', ALL, 'O3', 'bfloat16', CG),
    ('all flags + compile max-autotune, O3 bf16', ALL, 'O3', 'bfloat16', MAT),
    ('--unfused_mha + compile max-autotune, O3 bf16', ATTN, 'O3', 'bfloat16', MAT),
    ('reference + compile max-autotune, O3 bf16', {}, 'O3', 'bfloat16', MAT),
]


# Rows left out of the Swin-L matrix so that it stays within 10 minutes on one H100 (measured: 220 s
# eager + 388 s compiled without these two).
TINY_ONLY = {'reference eager O3 bf16 (pure bf16)', 'reference + compile (CUDA graphs), O3 bf16'} | {
    name for name, flags, *_ in TRAIN if isinstance(flags, dict) and (flags.get('fold') is False or flags == WP_LN)}


def _upstream(size: str):
    """Upstream's own model class for a V2 or MLP size, loaded from its checkout at UPSTREAM_DIR. V2
    with the one fix it needs to run on a GPU: its logit-scale clamp passes a CPU tensor as the bound."""
    name, cls = ('swin_mlp', 'SwinMLP') if size.startswith('mlp') else ('swin_transformer_v2', 'SwinTransformerV2')
    path = os.path.join(UPSTREAM_DIR, 'models', f'{name}.py')
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path}: set SWIN_UPSTREAM to a checkout of microsoft/Swin-Transformer')
    source = open(path).read()
    if cls == 'SwinTransformerV2':
        bug = 'max=torch.log(torch.tensor(1. / 0.01))'
        assert source.count(bug) == 1, 'upstream changed: the clamp fix no longer applies'
        # the bound as a Python float (log 100): a tensor's .item() here would break torch.compile's graph
        # in every attention call and slow upstream's compiled row down
        source = source.replace(bug, 'max=math.log(1. / 0.01)')
    module = types.ModuleType(f'upstream_{name}')
    module.math = math
    exec(compile(source, path, 'exec'), module.__dict__)
    return getattr(module, cls)


def build(size, flags):
    if flags == 'upstream':
        return _upstream(size)(**MODELS[size])
    if size.startswith('mlp'):
        from models.swin_mlp import SwinMLP
        return SwinMLP(**MODELS[size], **{k: v for k, v in flags.items() if k != 'optim'})
    if size.startswith('v2'):
        model_flags = {k: v for k, v in flags.items() if k not in ('optim', 'fold', 'backend', 'carry')}
        model = SwinTransformerV2(**MODELS[size], **model_flags, kernel_backend=flags.get('backend', 'triton'))
        if not flags.get('carry', True):
            model.ops.post_norm_add_partition = None         # one Ops bundle, shared by every block
        return model
    if flags == 'timm':
        import timm
        return timm.create_model(TIMM[size], pretrained=False, drop_path_rate=MODELS[size]['drop_path_rate'])
    model_flags = {k: v for k, v in flags.items()
                   if k not in ('optim', 'fold', 'defer', 'backend', 'fp8', 'fp8_layers')}
    model = SwinTransformer(**MODELS[size], **model_flags, kernel_backend=flags.get('backend', 'triton'),
                            fold_window_norm=flags.get('fold', True))
    model.ops.defer_mlp_residual &= flags.get('defer', True)      # one Ops bundle, shared by every block
    if flags.get('fp8'):
        enable_fp8(model, flags['fp8'], layers=flags.get('fp8_layers', FP8_LAYERS))
    return model


def _compiled(model, compile_):
    """compile_: False, True (default mode) or a torch.compile mode name (GRAPH: not compiled)."""
    if not compile_ or compile_ == GRAPH:
        return model
    return torch.compile(model) if compile_ is True else torch.compile(model, mode=compile_)


def train_row(size, name, flags, level, dtype, compile_, batch):
    torch.manual_seed(0)
    precision = Precision(level, dtype if level != 'O0' else 'float16', torch.device('cuda'))
    model, master = precision.prepare(build(size, flags).cuda())
    optim = flags.get('optim') if isinstance(flags, dict) else None
    if optim == 'fused_adam':
        optimizer = FusedAdamW(param_groups(master, 0.05), lr=1e-4)
    elif optim == 'apex_adam':
        optimizer = build_apex_optimizer('fused_adam', param_groups(master, 0.05), lr=1e-4, betas=(0.9, 0.999),
                                         eps=1e-8, weight_decay=0.05)
    else:
        optimizer = torch.optim.AdamW(param_groups(master, 0.05), lr=1e-4)
    step_model = _compiled(model, compile_)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    side = MODELS[size].get('img_size', 224)
    x = precision.cast_input(torch.randn(batch, 3, side, side, device='cuda'))
    y = torch.randint(0, 1000, (batch,), device='cuda')
    model.train()

    step = train_step(precision, step_model, model, master, optimizer, x, y, criterion)
    if compile_ == GRAPH:                    # 3 eager warm-up calls, then replays of one captured step
        graphed = GraphedTrainStep(model, criterion, optimizer, precision, 5.0)
        run = functools.partial(graphed, x, y)
    else:
        run = step
    t0 = time.time()
    run()                                    # compilation / autotune stays out of the timing
    torch.cuda.synchronize()
    first = time.time() - t0
    torch.cuda.reset_peak_memory_stats()
    ms = cuda_time_ms(run, warmup=10, iters=30)
    return {'mode': 'train', 'config': name, 'img/s': batch / ms * 1e3, 'ms/step': ms,
            'peak_GiB': torch.cuda.max_memory_allocated() / 2 ** 30, 'first_step_s': first}


@torch.no_grad()
def infer_row(size, name, flags, level, dtype, compile_, batch):
    precision = Precision(level, dtype if level != 'O0' else 'float16', torch.device('cuda'))
    model, _ = precision.prepare(build(size, flags).cuda())
    model.eval()
    run = _compiled(model, compile_)
    side = MODELS[size].get('img_size', 224)
    x = precision.cast_input(torch.randn(batch, 3, side, side, device='cuda'))

    def fwd():
        with precision.autocast():
            run(x)
    ms = cuda_time_ms(fwd, warmup=50, iters=30)
    return {'mode': 'inference', 'config': name, 'img/s': batch / ms * 1e3, 'ms/step': ms,
            'peak_GiB': torch.cuda.max_memory_allocated() / 2 ** 30}


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--model', choices=list(MODELS), default='tiny')
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--only', nargs='*', default=None, help='substrings of config names to run')
    p.add_argument('--exact', action='store_true', help='--only names whole config names')
    p.add_argument('--skip-infer', action='store_true')
    p.add_argument('--compiled', choices=['no', 'only', 'all'], default='all',
                   help='run the torch.compile rows: not, only them, or with the rest')
    a = p.parse_args()
    env = environment()
    rows = []
    train, infer = {'v2': (TRAIN_V2, INFER_V2), 'ml': (TRAIN_MLP, INFER_MLP)}.get(a.model[:2], (TRAIN, INFER))
    jobs = [(train_row, r) for r in train] + ([] if a.skip_infer else [(infer_row, r) for r in infer])
    for fn, (name, flags, level, dtype, compile_) in jobs:
        if a.only and not any(s == name if a.exact else s in name for s in a.only):
            continue
        if a.model == 'large' and name in TINY_ONLY and not a.only:
            continue
        compiled = compile_ not in (False, GRAPH)
        if (a.compiled == 'no' and compiled) or (a.compiled == 'only' and not compiled):
            continue
        if name.startswith('apex') and not apex_available('apex.optimizers'):
            continue          # apex not built here (python build_apex.py)
        if name.startswith('--fp8') and not importable('torchao.float8'):
            continue          # torchao not installed here (optional)
        try:
            row = fn(a.model, name, flags, level, dtype, compile_, a.batch)
        except Exception as e:   # report, keep measuring the rest
            row = {'mode': fn.__name__[:-4], 'config': name, 'error': f'{type(e).__name__}: {str(e)[:200]}'}
        rows.append(row)
        print(row, flush=True)
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
    base = next((r['img/s'] for r in rows if r['config'].startswith(('reference eager O1 fp16', 'upstream V2 eager',
                                                                     'upstream MLP eager'))
                 and 'img/s' in r), None)
    for r in rows:
        if base and r['mode'] == 'train' and 'img/s' in r:
            r['vs upstream default'] = r['img/s'] / base
    print(write_results(f'train_{a.model}_{a.compiled}', rows, ['mode', 'config', 'img/s', 'ms/step', 'peak_GiB',
                                                   'vs upstream default', 'error'], env))


if __name__ == '__main__':
    main()
