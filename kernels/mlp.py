"""Swin's MLP as one op (--fused_mlp): y = GELU(x @ W1^T + b1) @ W2^T + b2, GELU exact (erf).

Forward: upstream's three ops (F.linear with the bias in cuBLAS's epilogue, F.gelu, F.linear); z
and GELU(z) are kept for the backward, as autograd keeps them for the unfused ops. Backward (dy given):
  dg  = dy @ W2,  dW2 = dy^T @ GELU(z)        cuBLAS
  db2 = sum dy                                kernels/bias_grad.py
  dz  = dg * gelu'(z),  db1 = sum dz          one pass (kernels/bias_grad.py): torch's GELU backward
                                              writes dz and its column sum reads it again
  dx  = dz @ W1,  dW1 = dz^T @ x              cuBLAS
(Before 2026-12-07 this op ran our own Triton GEMMs with GELU and its backward inside them; at
35-90% of cuBLAS's speed they lost more than the fusion saved.) Under autocast the op runs in the
autocast dtype, as F.linear would (GELU then runs on the half-precision pre-activation, as
upstream's nn.GELU does). MLP dropout > 0 is rejected by the model at build. A tanh-approximate GELU
is not offered: it changes the math.

apex's FusedDenseGeluDense uses the tanh GELU, which changes the math, so it is not wired.
"""
import torch
import torch.nn.functional as F

from ._utils import autocast_inputs, triton_available

if triton_available():
    from .bias_grad import bias_grad


# ----------------------------------------------------------------------------- reference
def mlp_ref(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


# ----------------------------------------------------------------------------- launchers
def mlp_fwd(x2: torch.Tensor, w1, b1, w2, b2):
    """x2 [M, C] -> (y [M, Cout], z [M, H]: fc1's output, g = GELU(z)): z and g saved for the backward."""
    z = F.linear(x2, w1, b1)
    g = F.gelu(z)
    return F.linear(g, w2, b2), z, g


def mlp_bwd(dy2: torch.Tensor, x2, w1, w2, z, g):
    """-> dx, dw1, db1, dw2, db2 (all in the operands' dtype)."""
    dz, db1 = bias_grad(dy2 @ w2, z)
    return dz @ w1, dz.t() @ x2, db1, dy2.t() @ g, bias_grad(dy2)


# ----------------------------------------------------------------------------- custom ops + autograd
# Compiled code calls the custom ops; eager code calls _Mlp (custom-op dispatch costs more than
# these launches in an eager step). Both save the same tensors and run the same `_grads`.
@torch.library.custom_op('swin::mlp_fwd', mutates_args=())
def _fwd_op(x2: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
            b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return mlp_fwd(x2, w1, b1, w2, b2)


@_fwd_op.register_fake
def _(x2, w1, b1, w2, b2):
    hidden = x2.new_empty((x2.shape[0], w1.shape[0]))
    return x2.new_empty((x2.shape[0], w2.shape[0])), hidden, torch.empty_like(hidden)


@torch.library.custom_op('swin::mlp_bwd', mutates_args=())
def _bwd_op(dy2: torch.Tensor, x2: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, z: torch.Tensor,
            g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return mlp_bwd(dy2, x2, w1, w2, z, g)


@_bwd_op.register_fake
def _(dy2, x2, w1, w2, z, g):
    return (torch.empty_like(x2), torch.empty_like(w1), w1.new_empty(w1.shape[0]), torch.empty_like(w2),
            w2.new_empty(w2.shape[0]))


def _grads(ctx, dy2, bwd):
    """The one backward of both paths; `bwd` is the custom op or the launcher it wraps."""
    return bwd(dy2.contiguous(), *ctx.saved_tensors)


def _setup(ctx, inputs, output):
    x2, w1, _, w2, _ = inputs
    ctx.save_for_backward(x2, w1, w2, output[1], output[2])


_fwd_op.register_autograd(lambda ctx, dy2, _dz, _dg: _grads(ctx, dy2, _bwd_op), setup_context=_setup)


class _Mlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, w1, b1, w2, b2):
        y, z, g = mlp_fwd(x2, w1, b1, w2, b2)
        ctx.save_for_backward(x2, w1, w2, z, g)
        return y

    @staticmethod
    def backward(ctx, dy2):
        return _grads(ctx, dy2, mlp_bwd)


def fused_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Differentiable fused MLP over the last dimension of x (mlp_ref's math)."""
    x, w1, b1, w2, b2 = autocast_inputs(x, w1, b1, w2, b2)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    with torch.autocast(x.device.type, enabled=False):
        if torch.compiler.is_compiling():
            y = _fwd_op(x2, w1, b1, w2, b2)[0]
        else:
            y = _Mlp.apply(x2, w1, b1, w2, b2)
    return y.view(*shape[:-1], w2.shape[0])


IMPLS = {
    'torch': mlp_ref,
    'triton': fused_mlp if triton_available() else None,
    'apex': None,      # apex's FusedDenseGeluDense is tanh-GELU: not the same math; ours stands in
}
