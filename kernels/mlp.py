"""Swin's MLP as one op (--fused_mlp): y = GELU(x @ W1^T + b1) @ W2^T + b2, GELU exact (erf).

Forward, two GEMMs (kernels/gemm.py):
  z = x @ W1^T + b1                 bias in fc1's epilogue; z is stored (the backward needs it)
  y = gelu(z) @ W2^T + b2           GELU applied to fc2's A tiles as they load; bias in the epilogue
  GELU's output is never written: the unfused MLP writes and saves both z and gelu(z) (an
  activation 4C wide per token: 1/3 of the MLP's saved memory is gone).
Backward (dy given):
  dz  = (dy @ W2) * gelu'(z)        GELU's backward in the epilogue (no dgelu pass, no d(gelu) tensor)
  dW2 = dy^T @ gelu(z), db2 = sum dy    one pass over dy; GELU recomputed from z on load
  dx  = dz @ W1                     cuBLAS
  dW1 = dz^T @ x,       db1 = sum dz    one pass over dz
Under autocast the op runs in the autocast dtype, as F.linear would (GELU then runs on the
half-precision pre-activation, as upstream's nn.GELU does). MLP dropout > 0 is rejected by the
model at build. A tanh-approximate GELU is not offered: it changes the math.

apex's FusedDenseGeluDense uses the tanh GELU, which changes the math, so it is not wired.
"""
import torch
import torch.nn.functional as F

from ._utils import autocast_inputs, triton_available

if triton_available():
    from .gemm import gemm


# ----------------------------------------------------------------------------- reference
def mlp_ref(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


# ----------------------------------------------------------------------------- launchers
def mlp_fwd(x2: torch.Tensor, w1, b1, w2, b2, tf32: bool = False):
    """x2 [M, C] -> (y [M, Cout], z [M, H]: fc1's output, saved for the backward)."""
    z = gemm(x2, w1.t(), bias=b1, tf32=tf32)
    y = gemm(z, w2.t(), bias=b2, gelu_a=True, tf32=tf32)
    return y, z


def mlp_bwd(dy2: torch.Tensor, x2, w1, w2, z, tf32: bool = False):
    """-> dx, dw1, db1, dw2, db2 (weights' grads in the weights' dtype)."""
    dz = gemm(dy2, w2, gelu_grad_of=z, tf32=tf32)
    dw2, db2 = gemm(dy2.t(), z, gelu_b=True, rowsum=True, out_dtype=w2.dtype, tf32=tf32)
    dx = dz @ w1
    dw1, db1 = gemm(dz.t(), x2, rowsum=True, out_dtype=w1.dtype, tf32=tf32)
    return dx, dw1, db1.to(w1.dtype), dw2, db2.to(w2.dtype)


# ----------------------------------------------------------------------------- custom ops + autograd
# Compiled code calls the custom ops; eager code calls _Mlp (custom-op dispatch costs more than
# these launches in an eager step). Both save the same tensors and run the same `_grads`.
@torch.library.custom_op('swin::mlp_fwd', mutates_args=())
def _fwd_op(x2: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
            b2: torch.Tensor, tf32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return mlp_fwd(x2, w1, b1, w2, b2, tf32)


@_fwd_op.register_fake
def _(x2, w1, b1, w2, b2, tf32):
    return x2.new_empty((x2.shape[0], w2.shape[0])), x2.new_empty((x2.shape[0], w1.shape[0]))


@torch.library.custom_op('swin::mlp_bwd', mutates_args=())
def _bwd_op(dy2: torch.Tensor, x2: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
            z: torch.Tensor, tf32: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return mlp_bwd(dy2, x2, w1, w2, z, tf32)


@_bwd_op.register_fake
def _(dy2, x2, w1, w2, z, tf32):
    return (torch.empty_like(x2), torch.empty_like(w1), w1.new_empty(w1.shape[0]), torch.empty_like(w2),
            w2.new_empty(w2.shape[0]))


def _save(ctx, x2, w1, w2, z, tf32):
    ctx.save_for_backward(x2, w1, w2, z)
    ctx.tf32 = tf32


def _grads(ctx, dy2, bwd):
    """The one backward of both paths; `bwd` is the custom op or the launcher it wraps."""
    x2, w1, w2, z = ctx.saved_tensors
    return bwd(dy2.contiguous(), x2, w1, w2, z, ctx.tf32) + (None,)


def _setup(ctx, inputs, output):
    x2, w1, _, w2, _, tf32 = inputs
    _save(ctx, x2, w1, w2, output[1], tf32)


_fwd_op.register_autograd(lambda ctx, dy2, _dz: _grads(ctx, dy2, _bwd_op), setup_context=_setup)


class _Mlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, w1, b1, w2, b2, tf32):
        y, z = mlp_fwd(x2, w1, b1, w2, b2, tf32)
        _save(ctx, x2, w1, w2, z, tf32)
        return y

    @staticmethod
    def backward(ctx, dy2):
        return _grads(ctx, dy2, mlp_bwd)


def fused_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, *,
              tf32: bool = False) -> torch.Tensor:
    """Differentiable fused MLP over the last dimension of x (mlp_ref's math). tf32: whether fp32
    GEMMs may use TF32 (chosen at model build, with the reference path's setting)."""
    x, w1, b1, w2, b2 = autocast_inputs(x, w1, b1, w2, b2)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    with torch.autocast(x.device.type, enabled=False):
        if torch.compiler.is_compiling():
            y = _fwd_op(x2, w1, b1, w2, b2, tf32)[0]
        else:
            y = _Mlp.apply(x2, w1, b1, w2, b2, tf32)
    return y.view(*shape[:-1], w2.shape[0])


IMPLS = {
    'torch': mlp_ref,
    'triton': fused_mlp if triton_available() else None,
    'apex': None,      # apex's FusedDenseGeluDense is tanh-GELU: not the same math; ours stands in
}
