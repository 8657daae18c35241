"""The registry of fused ops: which implementation each flag gets, decided once at model build.

Each op file exports ``IMPLS = {'torch': ..., 'triton': ... or None, 'apex': ... or None}``
(None: not available here). ``get_impl(op, backend)`` resolves one, ``build_ops`` resolves all
of a model's flags into an ``Ops`` bundle that the model calls; the model never imports triton
or apex itself.

Backends (config ``KERNEL_BACKEND``):
  auto    the Triton kernels on CUDA, the PyTorch reference on CPU;
  triton  the Triton kernels (on CPU only under TRITON_INTERPRET=1: that is how CI tests them);
  apex    apex's op where apex has one (fails at start if apex is not importable), ours otherwise;
  torch   the pure-PyTorch reference.
"""
import functools
import logging
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Optional

import torch

from . import dense, layer_norm, mlp, window_attention, window_process
from ._utils import apex_available, triton_available, triton_interpret
from .dense import dense_ref
from .layer_norm import (add_layer_norm_ref, layer_norm_partition, layer_norm_partition_ref, layer_norm_ref,
                         merge_add_layer_norm, merge_add_layer_norm_ref)
from .window_process import window_merge_ref, window_partition_ref

logger = logging.getLogger(__name__)

OPS = {
    'window_process': window_process,
    'window_attention': window_attention,
    'layer_norm': layer_norm,
    'add_layer_norm': SimpleNamespace(IMPLS=layer_norm.ADD_IMPLS),   # residual add + norm, same flag
    'mlp': mlp,
    'dense': dense,
}
# The user's flag for each op, for error messages.
FLAGS = {
    'window_process': '--fused_window_process',
    'window_attention': '--unfused_mha',
    'layer_norm': '--fused_layernorm',
    'add_layer_norm': '--fused_layernorm',
    'mlp': '--fused_mlp',
    'dense': '--fused_dense',
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
    """The implementation of `op` for `backend`, or a KernelUnavailable naming flag and fix."""
    module = OPS[op]
    flag = FLAGS[op]
    chosen = resolve_backend(backend)
    if chosen == 'apex':
        apex_module = getattr(module, 'APEX_MODULE', None)
        if apex_module is None:      # apex has no such op: ours stands in
            chosen = 'triton' if torch.cuda.is_available() or triton_interpret() else 'torch'
        elif not apex_available(apex_module):
            raise KernelUnavailable(
                f"{flag} with KERNEL_BACKEND apex needs {apex_module}, which is not importable here: "
                f"install NVIDIA apex with its CUDA extensions, or use KERNEL_BACKEND auto")
    impl = module.IMPLS.get(chosen)
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
    chosen: tuple = ()                            # (op, backend) pairs, for the log


def build_ops(window_process: bool = False, layer_norm: bool = False, mlp: bool = False,
              dense: bool = False, window_attention: bool = False, backend: str = 'auto',
              fold_window_norm: bool = True) -> Ops:
    """Resolve every requested fused op once; log the choice; fail early and clearly.

    fold_window_norm: where --fused_window_process and --fused_layernorm both run on Triton, fold
    the window shuffles into the LayerNorm kernels (the math is the same either way; only the
    benchmarks turn it off, to measure what the fold buys)."""
    ops = Ops()
    chosen = []
    if window_process:
        b, (ops.window_partition, ops.window_merge) = get_impl('window_process', backend)
        chosen.append(('window_process', b))
    if window_attention:
        b, ops.window_attention = get_impl('window_attention', backend)
        chosen.append(('window_attention', b))
    if layer_norm:
        b, ops.layer_norm = get_impl('layer_norm', backend)
        chosen.append(('layer_norm', b))
        b, ops.add_layer_norm = get_impl('add_layer_norm', backend)
        chosen.append(('add_layer_norm', b))
    if dense:
        b, ops.linear = get_impl('dense', backend)
        chosen.append(('dense', b))
    if mlp:
        b, ops.mlp = get_impl('mlp', backend)
        chosen.append(('mlp', b))
    backends = dict(chosen)
    if fold_window_norm and backends.get('window_process') == backends.get('layer_norm') == 'triton':
        # both flags own this fusion: the partition's gather and the merge's scatter ride inside
        # the LayerNorm kernels (one pass over the activation instead of two, each way)
        ops.norm_partition = layer_norm_partition
        ops.merge_add_norm = merge_add_layer_norm
    else:
        ops.norm_partition = functools.partial(layer_norm_partition_ref, layer_norm=ops.layer_norm,
                                               window_partition=ops.window_partition)
        ops.merge_add_norm = functools.partial(merge_add_layer_norm_ref, add_layer_norm=ops.add_layer_norm,
                                               window_merge=ops.window_merge)
    ops.chosen = tuple(chosen)
    if chosen:
        logger.info('fused ops: ' + ', '.join(f'{op}={b}' for op, b in chosen))
    return ops


__all__ = ['Ops', 'build_ops', 'get_impl', 'resolve_backend', 'KernelUnavailable',
           'window_partition_ref', 'window_merge_ref', 'OPS', 'FLAGS']
