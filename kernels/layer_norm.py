"""LayerNorm over the last dimension, statistics in fp32 for every input dtype.

Math (rows x of width C):
  mean = sum(x) / C;  rstd = 1 / sqrt(sum((x - mean)^2) / C + eps);  xhat = (x - mean) * rstd
  y = xhat * w + b
Backward (g = dy * w):
  dx = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat))
  dw = sum_rows(dy * xhat);  db = sum_rows(dy)
dw and db are deterministic: each backward program sums a fixed chunk of rows into its own row of
a [programs, C] fp32 buffer, then torch sums the buffer (no atomics).

Shapes: x [..., C] (any leading dims; made contiguous), w and b [C] (fp32 or half under O2).
Saves mean and rstd (fp32, one per row) for the backward. Any width (one row per tile up to
C = 16384). Parameter names are nn.LayerNorm's: the module keeps its `weight` and `bias`.
apex: `apex.normalization.fused_layer_norm_affine` where apex is importable (KERNEL_BACKEND apex).
"""
import torch
import torch.nn.functional as F

from ._utils import apex_available, check_triton_device, next_power_of_2, triton_available

APEX_MODULE = 'apex.normalization'


# ----------------------------------------------------------------------------- reference
def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


# ----------------------------------------------------------------------------- triton kernels
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _layer_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, M, C, eps,
                               BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_C)
        row_ok = rows < M
        col_ok = cols < C
        ok = row_ok[:, None] & col_ok[None, :]
        off = rows[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + off, mask=ok, other=0.).to(tl.float32)
        mean = tl.sum(x, axis=1) / C
        xc = tl.where(ok, x - mean[:, None], 0.)
        rstd = 1. / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.).to(tl.float32)
        y = xc * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=ok)
        tl.store(mean_ptr + rows, mean, mask=row_ok)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)

    @triton.jit
    def _layer_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
                               M, C, rows_per_program,
                               BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)
        col_ok = cols < C
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.).to(tl.float32)
        dw = tl.zeros((BLOCK_C,), dtype=tl.float32)
        db = tl.zeros((BLOCK_C,), dtype=tl.float32)
        start = pid.to(tl.int64) * rows_per_program
        for r0 in range(0, rows_per_program, BLOCK_ROWS):
            rows = start + r0 + tl.arange(0, BLOCK_ROWS)
            row_ok = (rows < M) & (r0 + tl.arange(0, BLOCK_ROWS) < rows_per_program)
            ok = row_ok[:, None] & col_ok[None, :]
            off = rows[:, None] * C + cols[None, :]
            x = tl.load(x_ptr + off, mask=ok, other=0.).to(tl.float32)
            dy = tl.load(dy_ptr + off, mask=ok, other=0.).to(tl.float32)
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.)
            xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.)
            g = dy * w[None, :]
            c1 = tl.sum(xhat * g, axis=1) / C
            c2 = tl.sum(g, axis=1) / C
            dx = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=ok)
            dw += tl.sum(dy * xhat, axis=0)
            db += tl.sum(dy, axis=0)
        tl.store(dw_part_ptr + pid * C + cols, dw, mask=col_ok)
        tl.store(db_part_ptr + pid * C + cols, db, mask=col_ok)


def _tile(C: int):
    block_c = next_power_of_2(C)
    if block_c > 16384:
        raise ValueError(f'fused LayerNorm supports widths up to 16384, got {C}')
    block_rows = max(1, min(16, 4096 // block_c))   # ~4K elements a tile: full 16-byte loads, no spills
    num_warps = 4 if block_c * block_rows <= 4096 else 8
    return block_rows, block_c, num_warps


# ----------------------------------------------------------------------------- launchers
def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   fp32_output: bool = False):
    """-> (y like x (fp32 with fp32_output), mean [M] fp32, rstd [M] fp32)."""
    check_triton_device(x)
    C = x.shape[-1]
    x2 = x.reshape(-1, C).contiguous()
    M = x2.shape[0]
    y = torch.empty(x2.shape, dtype=torch.float32 if fp32_output else x.dtype, device=x.device)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    block_rows, block_c, num_warps = _tile(C)
    if M:
        _layer_norm_fwd_kernel[(triton.cdiv(M, block_rows),)](
            x2, weight.contiguous(), bias.contiguous(), y, mean, rstd, M, C, float(eps),
            BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=num_warps)
    return y.view(x.shape), mean, rstd


def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                   rstd: torch.Tensor):
    """-> (dx like x, dweight like weight, dbias like weight)."""
    check_triton_device(x)
    C = x.shape[-1]
    x2 = x.reshape(-1, C).contiguous()
    dy2 = dy.reshape(-1, C).contiguous()
    M = x2.shape[0]
    dx = torch.empty_like(x2)
    block_rows, block_c, num_warps = _tile(C)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.device.type == 'cuda' else 2
    programs = max(1, min(4 * sms, triton.cdiv(M, block_rows)))
    rows_per_program = triton.cdiv(M, programs)
    programs = triton.cdiv(M, rows_per_program) if M else 1
    # every program writes its whole row of partial sums: no zero-fill needed
    dw_part = torch.empty((programs, C), dtype=torch.float32, device=x.device)
    db_part = torch.empty((programs, C), dtype=torch.float32, device=x.device)
    if M:
        _layer_norm_bwd_kernel[(programs,)](
            dy2, x2, weight.contiguous(), mean, rstd, dx, dw_part, db_part, M, C, rows_per_program,
            BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=num_warps)
    return dx.view(x.shape), dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)


# ----------------------------------------------------------------------------- custom ops + autograd
@torch.library.custom_op('swin::layer_norm_fwd', mutates_args=())
def _fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
            fp32_output: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_fwd(x, weight, bias, eps, fp32_output)


@_fwd_op.register_fake
def _(x, weight, bias, eps, fp32_output):
    M = x.numel() // x.shape[-1]
    # contiguous, like the real output (x itself may be strided)
    return (x.new_empty(x.shape, dtype=torch.float32 if fp32_output else x.dtype), x.new_empty((M,), dtype=torch.float32),
            x.new_empty((M,), dtype=torch.float32))


@torch.library.custom_op('swin::layer_norm_bwd', mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
            rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_bwd(dy, x, weight, mean, rstd)


@_bwd_op.register_fake
def _(dy, x, weight, mean, rstd):
    return x.new_empty(x.shape), torch.empty_like(weight), torch.empty_like(weight)


def _setup(ctx, inputs, output):
    x, weight, _, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _bwd_op(dy, x, weight, mean, rstd)
    return dx, dw, db, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


class _LayerNorm(torch.autograd.Function):
    """Eager path (see window_process.py: custom-op dispatch is too slow for eager steps)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, fp32_output):
        y, mean, rstd = layer_norm_fwd(x, weight, bias, eps, fp32_output)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = layer_norm_bwd(dy, x, weight, mean, rstd)
        return dx, dw, db, None, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Fused, differentiable LayerNorm over the last dimension (F.layer_norm's math).

    Under CUDA autocast the output is fp32, as autocast makes F.layer_norm's (it is on CUDA
    autocast's fp32 list; CPU autocast leaves it alone), so the residual stream keeps the
    reference path's precision; the input is read as is.
    """
    fp32_output = (x.device.type == 'cuda' and x.dtype != torch.float32
                   and torch.is_autocast_enabled('cuda'))
    if torch.compiler.is_compiling():
        return _fwd_op(x, weight, bias, float(eps), fp32_output)[0]
    return _LayerNorm.apply(x, weight, bias, float(eps), fp32_output)


def _apex_layer_norm(x, weight, bias, eps=1e-5):
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine
    return fused_layer_norm_affine(x, weight, bias, (x.shape[-1],), eps)


IMPLS = {
    'torch': layer_norm_ref,
    'triton': layer_norm if triton_available() else None,
    'apex': _apex_layer_norm if apex_available(APEX_MODULE) else None,
}
