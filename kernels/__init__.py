"""The registry of fused ops: which implementation each flag gets, decided once at model build.

Each op file exports its implementations by backend, ``IMPLS = {'torch': ..., 'triton': ... or
None, 'apex': ... or None}`` (None: not available here); ``OPS`` below lists every op with the flags
it needs (layer_norm.py holds four: the plain, residual-add and two window-layout forms of one
kernel). ``get_impl(op, backend)`` resolves one, ``build_ops`` resolves all of a model's flags into
an ``Ops`` bundle that the model calls; the model never imports triton or apex itself.

Backends (config ``KERNEL_BACKEND``):
  auto    the Triton kernels on CUDA (apex's op instead where apex is importable and measured
          faster: --fused_dense), the PyTorch reference on CPU;
  triton  the Triton kernels (on CPU only under TRITON_INTERPRET=1: that is how CI tests them);
  apex    apex's op where apex has one (fails at start if apex is not importable), ours otherwise;
  torch   the pure-PyTorch reference.
"""
import functools
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import dense, layer_norm, mlp, spatial_mlp, window_attention, window_process
from ._utils import apex_available, triton_available, triton_interpret
from .dense import dense_ref
from .layer_norm import (add_layer_norm_partition_ref, add_layer_norm_ref, layer_norm_partition_ref, layer_norm_ref,
                         merge_add_layer_norm_ref, merge_post_norm_add_ref)
from .spatial_mlp import spatial_mlp_ref
from .window_process import window_merge_ref, window_partition_ref

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """One fused op of the registry: its implementations by backend (None: not available here),
    the flags that must all be on for it, and the apex module it needs under KERNEL_BACKEND apex
    (None: ours stands in under apex, for the reason in `apex_note`, which the log repeats)."""
    impls: dict
    flags: tuple
    apex_module: Optional[str] = None
    apex_note: str = 'apex has no such op'
    auto_prefers_apex: bool = False     # measured faster than ours: KERNEL_BACKEND auto takes apex's


# The window-layout LayerNorms are `window_process` and `layer_norm` in one kernel: they need both
# flags, and run only where both resolve to our Triton kernels (else the two ops are composed).
OPS = {
    'window_process': Entry(window_process.IMPLS, ('--fused_window_process',),
                            apex_note='apex has no window shift/partition op'),
    'window_attention': Entry(window_attention.IMPLS, ('--unfused_mha',),
                              apex_note="apex has no window attention with Swin's bias table and mask"),
    'layer_norm': Entry(layer_norm.IMPLS, ('--fused_layernorm',), layer_norm.APEX_MODULE),
    'add_layer_norm': Entry(layer_norm.ADD_IMPLS, ('--fused_layernorm',),
                            apex_note='apex has no residual add + drop-path + LayerNorm op'),
    'norm_partition': Entry(layer_norm.PARTITION_IMPLS, ('--fused_layernorm', '--fused_window_process')),
    'merge_add_norm': Entry(layer_norm.MERGE_ADD_IMPLS, ('--fused_layernorm', '--fused_window_process')),
    'add_norm_partition': Entry(layer_norm.ADD_PARTITION_IMPLS, ('--fused_layernorm', '--fused_window_process')),
    # Swin V2's post-norm residuals (resolved only for models that ask: build_ops(post_norm=True))
    'post_norm_add': Entry(layer_norm.POST_IMPLS, ('--fused_layernorm',),
                           apex_note='apex has no LayerNorm + drop-path + residual add op'),
    'merge_post_norm_add': Entry(layer_norm.MERGE_POST_IMPLS, ('--fused_layernorm', '--fused_window_process')),
    'post_norm_add_partition': Entry(layer_norm.POST_PARTITION_IMPLS, ('--fused_layernorm', '--fused_window_process')),
    'mlp': Entry(mlp.IMPLS, ('--fused_mlp',),
                 apex_note="apex's fused MLP (FusedDenseGeluDense) uses the tanh GELU, not upstream's exact GELU"),
    'dense': Entry(dense.IMPLS, ('--fused_dense',), dense.APEX_MODULE, auto_prefers_apex=True),
    # Swin-MLP's pad + partition + spatial MLP + merge + crop (resolved only for models that ask:
    # build_ops(spatial_mlp=True))
    'spatial_mlp': Entry(spatial_mlp.IMPLS, ('--fused_window_process',),
                         apex_note="apex has no window spatial MLP"),
}
BACKENDS = ('auto', 'triton', 'apex', 'torch')


class KernelUnavailable(RuntimeError):
    """The implementation a flag and backend ask for cannot run here."""


def resolve_backend(backend: str) -> str:
    """'auto' -> 'triton' where Triton kernels can run (CUDA, or the interpreter), else 'torch'."""
    if backend not in BACKENDS:
        raise KernelUnavailable(f"KERNEL_BACKEND {backend!r} is not one of {list(BACKENDS)}")
    if backend != 'auto':
        return backend
    return 'triton' if triton_available() and torch.cuda.is_available() else 'torch'


def get_impl(op: str, backend: str = 'auto'):
    """(backend, implementation) of `op` for `backend`, or a KernelUnavailable naming flag and fix."""
    entry = OPS[op]
    flag = ' + '.join(entry.flags)
    chosen = resolve_backend(backend)
    if backend == 'auto' and chosen == 'triton' and entry.auto_prefers_apex and entry.impls.get('apex'):
        chosen = 'apex'
        logger.info(f"{flag}: apex is importable and its op measured faster than ours: auto uses apex's")
    if chosen == 'apex':
        if entry.apex_module is None:      # apex has no such op, or not upstream's math: ours stands in
            chosen = 'triton' if torch.cuda.is_available() or triton_interpret() else 'torch'
            if op in ('window_process', 'window_attention', 'add_layer_norm', 'mlp'):    # the folds: composed
                logger.info(f'{flag} under KERNEL_BACKEND apex: {entry.apex_note}; ours ({chosen}) stands in')
        elif not apex_available(entry.apex_module):
            raise KernelUnavailable(
                f"{flag} with KERNEL_BACKEND apex needs {entry.apex_module}, which is not importable here: "
                f"build NVIDIA apex with `python build_apex.py /path/to/apex`, or use KERNEL_BACKEND auto")
    impl = entry.impls.get(chosen)
    if impl is None:
        why = ('triton is not importable' if chosen == 'triton' and not triton_available()
               else f'no {chosen} implementation exists yet')
        raise KernelUnavailable(f"{flag}: {why}. Use KERNEL_BACKEND torch, or turn {flag} off.")
    if chosen == 'triton' and not torch.cuda.is_available() and not triton_interpret():
        raise KernelUnavailable(
            f"{flag} with KERNEL_BACKEND triton needs a CUDA GPU, or TRITON_INTERPRET=1 to run the "
            f"kernels on the CPU (slow; for tests). Use KERNEL_BACKEND auto or torch on the CPU.")
    return chosen, impl


@dataclass
class Ops:
    """What a Swin model calls for each op; the defaults are upstream's PyTorch ops."""
    window_partition: Callable = window_partition_ref
    window_merge: Callable = window_merge_ref
    window_attention: Optional[Callable] = None   # None: the model's inline upstream math
    layer_norm: Callable = layer_norm_ref
    add_layer_norm: Callable = add_layer_norm_ref   # (shortcut, branch, drop-path scale, w, b, eps) -> (h, y)
    linear: Callable = dense_ref
    mlp: Optional[Callable] = None                # None: fc1 -> GELU -> fc2 through `linear`
    # norm1 + roll + partition, and merge + roll + residual + norm2: the ops above composed, or one
    # kernel each where --fused_layernorm and --fused_window_process both run on Triton
    norm_partition: Callable = layer_norm_partition_ref
    merge_add_norm: Callable = merge_add_layer_norm_ref
    # the previous block's MLP residual + norm1 + roll + partition: (shortcut, branch, drop-path scale,
    # w, b, eps, H, W, window, shift) -> (h, windows); V1 blocks defer their MLP residual to it
    add_norm_partition: Callable = add_layer_norm_partition_ref
    defer_mlp_residual: bool = False              # True where add_norm_partition is one kernel
    add_norm_fused: bool = False                  # True where add_layer_norm is our kernel (Swin-MLP defers then)
    # V2's `shortcut + drop_path(norm(branch))` as one kernel (and with the window merge folded in):
    # None where --fused_layernorm does not run our kernels (the model then runs upstream's ops)
    post_norm_add: Optional[Callable] = None
    merge_post_norm_add: Optional[Callable] = None
    # V2's MLP residual with the next block's roll + partition, (shortcut, branch, drop-path scale, w, b,
    # eps, H, W, window, next shift) -> (h, windows): one kernel where the folds run, else None (the
    # next block partitions its input itself)
    post_norm_add_partition: Optional[Callable] = None
    # Swin-MLP's window spatial MLP, x [B, H, W, C] -> [B, H, W, C]: upstream's ops through the chosen
    # partition and merge, or one kernel each way where --fused_window_process runs on Triton
    spatial_mlp: Callable = spatial_mlp_ref
    chosen: tuple = ()                            # (op, backend) pairs, for the log


def build_ops(window_process: bool = False, layer_norm: bool = False, mlp: bool = False,
              dense: bool = False, window_attention: bool = False, backend: str = 'auto',
              fold_window_norm: bool = True, post_norm: bool = False, spatial_mlp: bool = False) -> Ops:
    """Resolve every requested fused op once; log the choice; fail early and clearly.

    fold_window_norm: where --fused_window_process and --fused_layernorm both run on Triton, fold
    the window shuffles into the LayerNorm kernels (the math is the same either way; only the
    benchmarks turn it off, to measure what the fold buys).
    post_norm: the model has res-post-norm blocks (Swin V2): resolve the post-norm forms too.
    spatial_mlp: the model has window spatial MLPs (Swin-MLP): resolve that op too."""
    on = {'--fused_window_process': window_process, '--unfused_mha': window_attention,
          '--fused_layernorm': layer_norm, '--fused_mlp': mlp, '--fused_dense': dense}
    post_ops = ('post_norm_add', 'merge_post_norm_add', 'post_norm_add_partition')
    found = {op: get_impl(op, backend) for op, entry in OPS.items()
             if all(on[f] for f in entry.flags) and (post_norm or op not in post_ops)
             and (spatial_mlp or op != 'spatial_mlp')}
    ops = Ops()
    for op, (b, impl) in found.items():
        if op == 'window_process':
            ops.window_partition, ops.window_merge = impl
        elif op not in ('norm_partition', 'merge_add_norm', 'add_norm_partition', 'spatial_mlp') + post_ops:
            setattr(ops, 'linear' if op == 'dense' else op, impl)
    # the window-layout LayerNorms run where both of their flags run our kernels (and the
    # benchmarks have not turned the fold off); otherwise the two chosen ops are composed
    fold = fold_window_norm and all(found.get(op, ('',))[0] == 'triton'
                                    for op in ('window_process', 'layer_norm', 'norm_partition'))
    if fold:
        ops.norm_partition, ops.merge_add_norm = found['norm_partition'][1], found['merge_add_norm'][1]
        ops.add_norm_partition, ops.defer_mlp_residual = found['add_norm_partition'][1], True
    else:
        found.pop('norm_partition', None), found.pop('merge_add_norm', None), found.pop('add_norm_partition', None)
        ops.norm_partition = functools.partial(layer_norm_partition_ref, layer_norm=ops.layer_norm,
                                               window_partition=ops.window_partition)
        ops.merge_add_norm = functools.partial(merge_add_layer_norm_ref, add_layer_norm=ops.add_layer_norm,
                                               window_merge=ops.window_merge)
        ops.add_norm_partition = functools.partial(add_layer_norm_partition_ref, add_layer_norm=ops.add_layer_norm,
                                                   window_partition=ops.window_partition)
    # the post-norm forms: ours where --fused_layernorm runs our kernels; the merge folded in where
    # --fused_window_process does too
    if found.get('post_norm_add', ('',))[0] == 'triton' and found.get('layer_norm', ('',))[0] == 'triton':
        ops.post_norm_add = found['post_norm_add'][1]
        if fold and 'merge_post_norm_add' in found:
            ops.merge_post_norm_add = found['merge_post_norm_add'][1]
            ops.post_norm_add_partition = found['post_norm_add_partition'][1]
        else:
            found.pop('merge_post_norm_add', None), found.pop('post_norm_add_partition', None)
            ops.merge_post_norm_add = functools.partial(merge_post_norm_add_ref, post_norm_add=ops.post_norm_add,
                                                        window_merge=ops.window_merge)
    else:
        found.pop('post_norm_add', None), found.pop('merge_post_norm_add', None)
        found.pop('post_norm_add_partition', None)
    # the spatial MLP: one kernel where --fused_window_process runs ours, else upstream's ops composed
    # with the chosen partition and merge
    if found.get('spatial_mlp', ('',))[0] == 'triton':
        ops.spatial_mlp = found['spatial_mlp'][1]
    else:
        found.pop('spatial_mlp', None)
        ops.spatial_mlp = functools.partial(spatial_mlp_ref, window_partition=ops.window_partition,
                                            window_merge=ops.window_merge)
    ops.add_norm_fused = found.get('add_layer_norm', ('',))[0] == 'triton'
    ops.chosen = tuple((op, b) for op, (b, _) in found.items())
    if ops.chosen:
        logger.info('fused ops: ' + ', '.join(f'{op}={b}' for op, b in ops.chosen))
    return ops


__all__ = ['Ops', 'build_ops', 'get_impl', 'resolve_backend', 'KernelUnavailable',
           'window_partition_ref', 'window_merge_ref', 'OPS', 'Entry']
