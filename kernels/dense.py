"""Linear with the bias in the GEMM epilogue and a fast bias gradient (--fused_dense): y = x @ W^T + b.

Forward: F.linear, whose cuBLASLt call already adds the bias in its epilogue. Backward:
  dx = dy @ W,  dW = dy^T @ x        cuBLAS, as torch's
  db = sum_rows dy                   kernels/bias_grad.py, where torch's column sum runs at about a
                                     quarter of the card's bandwidth at Swin's tall, narrow shapes
(Before 2026-12-07 dW and db came from one Triton GEMM reading dy once; at 35-90% of cuBLAS's speed
it lost more than the shared read saved.) fp32 GEMMs follow torch's TF32 setting, as F.linear's do.
apex: apex.fused_dense's CUDA kernels where apex is importable (KERNEL_BACKEND apex, and auto: see below).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from ._utils import apex_available, autocast_inputs, triton_available

if triton_available():
    from .bias_grad import bias_grad

APEX_MODULE = 'apex.fused_dense'


def dense_ref(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def dense_bwd(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, has_bias: bool):
    """-> dx [M, in], dW like weight, db [out] (None without a bias)."""
    return dy2 @ weight, dy2.t() @ x2, bias_grad(dy2) if has_bias else None


# ----------------------------------------------------------------------------- custom ops + autograd
# Compiled code calls the custom ops; eager code calls _Dense (custom-op dispatch costs more than
# the launches in an eager step). Both save the same tensors and run the same `_grads`.
@torch.library.custom_op('swin::dense_bwd', mutates_args=())
def _bwd_op(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor,
            has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = dense_bwd(dy2, x2, weight, has_bias)
    return dx, dw, db if db is not None else weight.new_zeros(0)


@_bwd_op.register_fake
def _(dy2, x2, weight, has_bias):
    return torch.empty_like(x2), torch.empty_like(weight), weight.new_empty(weight.shape[0] if has_bias else 0)


@torch.library.custom_op('swin::dense_fwd', mutates_args=())
def _fwd_op(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.linear(x2, weight, bias)


@_fwd_op.register_fake
def _(x2, weight, bias):
    return x2.new_empty((x2.shape[0], weight.shape[0]))


def _save(ctx, x2, weight, bias):
    ctx.save_for_backward(x2, weight)
    ctx.has_bias = bias is not None


def _grads(ctx, dy2, bwd):
    """The one backward of both paths; `bwd` is the custom op or the launcher it wraps."""
    x2, weight = ctx.saved_tensors
    dx, dw, db = bwd(dy2.contiguous(), x2, weight, ctx.has_bias)
    return dx, dw, db if ctx.has_bias else None


_fwd_op.register_autograd(lambda ctx, dy2: _grads(ctx, dy2, _bwd_op),
                          setup_context=lambda ctx, inputs, output: _save(ctx, *inputs))


class _Dense(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias):
        _save(ctx, x2, weight, bias)
        return F.linear(x2, weight, bias)

    @staticmethod
    def backward(ctx, dy2):
        return _grads(ctx, dy2, dense_bwd)


def fused_dense(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Differentiable F.linear with the fused backward; autocast as F.linear."""
    x, weight, bias = autocast_inputs(x, weight, bias)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    with torch.autocast(x.device.type, enabled=False):
        if torch.compiler.is_compiling():
            y = _fwd_op(x2, weight, bias)
        else:
            y = _Dense.apply(x2, weight, bias)
    return y.view(*shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------- apex
# apex.fused_dense's CUDA extension (cuBLASLt: the bias in the forward's epilogue, the bias
# gradient from the weight-gradient GEMM), registered as our custom ops so that torch.compile sees
# one node (apex's own autograd.Function would break the graph), with the same two-path shape as
# above. Measured faster than our Triton backward at every Swin shape (docs/benchmarks.md), so
# KERNEL_BACKEND auto uses it for --fused_dense where apex is importable.
def _apex_ext():
    import fused_dense_cuda
    return fused_dense_cuda


@torch.library.custom_op('swin::apex_dense_fwd', mutates_args=())
def _apex_fwd_op(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _apex_ext().linear_bias_forward(x2, weight, bias)


@_apex_fwd_op.register_fake
def _(x2, weight, bias):
    return x2.new_empty((x2.shape[0], weight.shape[0]))


def apex_dense_bwd(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor):
    """-> dx, dW, db from apex's one backward call."""
    return tuple(_apex_ext().linear_bias_backward(x2, weight, dy2))


@torch.library.custom_op('swin::apex_dense_bwd', mutates_args=())
def _apex_bwd_op(dy2: torch.Tensor, x2: torch.Tensor,
                 weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return apex_dense_bwd(dy2, x2, weight)


@_apex_bwd_op.register_fake
def _(dy2, x2, weight):
    return torch.empty_like(x2), torch.empty_like(weight), weight.new_empty(weight.shape[0])


def _apex_grads(ctx, dy2, bwd):
    x2, weight = ctx.saved_tensors
    return bwd(dy2.contiguous(), x2, weight)


def _apex_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])


_apex_fwd_op.register_autograd(lambda ctx, dy2: _apex_grads(ctx, dy2, _apex_bwd_op), setup_context=_apex_setup)


class _ApexDense(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias):
        ctx.save_for_backward(x2, weight)
        return _apex_ext().linear_bias_forward(x2, weight, bias)

    @staticmethod
    def backward(ctx, dy2):
        return _apex_grads(ctx, dy2, apex_dense_bwd)


def _apex_dense(x, weight, bias=None):
    """F.linear through apex's fused dense kernels; autocast as F.linear."""
    if bias is None:
        return F.linear(x, weight)
    x, weight, bias = autocast_inputs(x, weight, bias)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    with torch.autocast(x.device.type, enabled=False):
        y = _apex_fwd_op(x2, weight, bias) if torch.compiler.is_compiling() else _ApexDense.apply(x2, weight, bias)
    return y.view(*shape[:-1], weight.shape[0])


IMPLS = {
    'torch': dense_ref,
    'triton': fused_dense if triton_available() else None,
    'apex': _apex_dense if apex_available(APEX_MODULE) else None,
}
