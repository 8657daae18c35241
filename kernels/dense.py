"""Linear with the bias in the GEMM epilogue and its gradient folded into the weight-gradient
pass (--fused_dense): y = x @ W^T + b.

Forward: F.linear, whose cuBLASLt call already adds the bias in its epilogue (a Triton GEMM
cannot add anything there). Backward:
  dx = dy @ W                        cuBLAS
  dW = dy^T @ x,  db = sum_rows dy   one Triton GEMM (kernels/gemm.py): dy is read once for both,
                                     where torch reads it a second time for db
Split-K over the rows keeps the GPU full when W is small; the partials are summed in a fixed order.
apex: `apex.fused_dense.FusedDenseFunc` where apex is importable (KERNEL_BACKEND apex).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from ._utils import apex_available, autocast_inputs, triton_available

if triton_available():
    from .gemm import gemm

APEX_MODULE = 'apex.fused_dense'


def dense_ref(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def dense_bwd(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, has_bias: bool):
    """-> dx [M, in], dW like weight, db [out] (None without a bias)."""
    dx = dy2 @ weight
    if has_bias:
        dw, db = gemm(dy2.t(), x2, rowsum=True, out_dtype=weight.dtype)
        return dx, dw, db.to(weight.dtype)
    return dx, gemm(dy2.t(), x2, out_dtype=weight.dtype), None


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


def _setup(ctx, inputs, output):
    x2, weight, bias = inputs
    ctx.save_for_backward(x2, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, dy2):
    x2, weight = ctx.saved_tensors
    dx, dw, db = _bwd_op(dy2.contiguous(), x2, weight, ctx.has_bias)
    return dx, dw, db if ctx.has_bias else None


_fwd_op.register_autograd(_backward, setup_context=_setup)


class _Dense(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias):
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        return F.linear(x2, weight, bias)

    @staticmethod
    def backward(ctx, dy2):
        x2, weight = ctx.saved_tensors
        return dense_bwd(dy2.contiguous(), x2, weight, ctx.has_bias)


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


def _apex_dense(x, weight, bias=None):
    if bias is None:
        return F.linear(x, weight)
    from apex.fused_dense import FusedDenseFunc
    shape = x.shape
    return FusedDenseFunc.apply(x.reshape(-1, shape[-1]), weight, bias).view(*shape[:-1], weight.shape[0])


IMPLS = {
    'torch': dense_ref,
    'triton': fused_dense if triton_available() else None,
    'apex': _apex_dense if apex_available(APEX_MODULE) else None,
}
