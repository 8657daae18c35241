"""Swin-MLP's window spatial MLP in one pass each way (--fused_window_process on MODEL.TYPE swin_mlp).

Math (map x [B, H, W, C], window w, N = w*w tokens a window, heads nh, head width d = C / nh; the
weight is upstream's grouped 1x1 Conv1d, [nh*N, N, 1], so W_h = weight[h*N:(h+1)*N, :, 0]):
  shifted blocks (shift s > 0) pad the map with zeros, w - s rows / columns before and s after,
  partition the padded map into windows, and cut the map back out after merging;
  in every window and head:  out[n, :] = sum_m W_h[n, m] x[m, :] + b[h*N + n]   (x[m, :]: d values)
Upstream runs pad, partition, a head transpose, the grouped convolution, the inverse transpose,
merge and crop: five copies of the activation around one small GEMM a (window, head). Here each
program reads its windows' tokens straight from the map (a padding position reads as zero), does
the N x N by N x d product on the tensor cores and writes the valid tokens straight back.
Backward (dy: out's gradient, zero on the cropped padding):
  dx[m, :] = sum_n W_h[n, m] dy[n, :]                    (valid tokens only; each written once)
  dW_h[n, m] = sum over windows of dy[n, :] . x[m, :]     db[h*N + n] = sum over windows of sum(dy[n, :])
dW and db are deterministic: each backward program sums a fixed run of windows into its own row of a
[programs, nh*N*(N + 1)] fp32 buffer, summed afterwards in one launch (layer_norm.sum_partials).
Accumulation is fp32 for every dtype; fp32 inputs multiply in IEEE fp32 (no TF32).
Autocast as the Conv1d it replaces: under autocast x, weight and bias are cast to its dtype.
"""
import functools
from typing import Optional

import torch
import torch.nn.functional as F

from ._utils import autocast_inputs, cdiv, check_triton_device, next_power_of_2, sm_count, triton_available
from .layer_norm import sum_partials
from .window_process import check_tokens, check_window, window_merge_ref, window_partition_ref


# ----------------------------------------------------------------------------- reference
def spatial_mlp_padding(window_size: int, shift_size: int) -> tuple:
    """(left, right, top, bottom) zero padding of a shifted block (upstream's); none unshifted."""
    if not shift_size:
        return 0, 0, 0, 0
    return window_size - shift_size, shift_size, window_size - shift_size, shift_size


def spatial_mlp_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], num_heads: int,
                    window_size: int, shift_size: int, window_partition=window_partition_ref,
                    window_merge=window_merge_ref) -> torch.Tensor:
    """Upstream's ops: x [B, H, W, C] -> [B, H, W, C] (partition and merge through the given ones)."""
    B, H, W, C = x.shape
    w, heads, d = window_size, num_heads, C // num_heads
    left, right, top, bottom = spatial_mlp_padding(w, shift_size)
    if shift_size:
        x = F.pad(x, [0, 0, left, right, top, bottom])
    Hp, Wp = x.shape[1], x.shape[2]
    windows = window_partition(x, w, 0).reshape(-1, w * w, heads, d).transpose(1, 2)      # B*nW, heads, N, d
    windows = F.conv1d(windows.reshape(-1, heads * w * w, d), weight, bias, groups=heads)
    windows = windows.view(-1, heads, w * w, d).transpose(1, 2).reshape(-1, w, w, C)
    x = window_merge(windows, Hp, Wp, 0)
    return x[:, top:Hp - bottom, left:Wp - right, :] if shift_size else x


# ----------------------------------------------------------------------------- triton kernels
if triton_available():
    import triton
    import triton.language as tl

    from .window_attention import _dot

    @triton.jit
    def _window_tokens(win, n, n_windows, H: tl.constexpr, W: tl.constexpr, WS: tl.constexpr,
                       SHIFT: tl.constexpr):
        """Window `win` of the (padded) map, its tokens n -> (row index of token n in the [B*H*W]
        map, int64; whether it is a map token and not padding)."""
        PAD: tl.constexpr = WS - SHIFT if SHIFT > 0 else 0        # padding before, on both axes
        n_wx: tl.constexpr = (W + (WS if SHIFT > 0 else 0)) // WS
        n_win: tl.constexpr = (H + (WS if SHIFT > 0 else 0)) // WS * n_wx
        b = win // n_win
        wi = win % n_win
        y = (wi // n_wx) * WS + n // WS - PAD
        x = (wi % n_wx) * WS + n % WS - PAD
        ok = (n < WS * WS) & (y >= 0) & (y < H) & (x >= 0) & (x < W) & (win < n_windows)
        return (b.to(tl.int64) * H + y) * W + x, ok

    @triton.jit
    def _spatial_mlp_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, n_windows,
                                H: tl.constexpr, W: tl.constexpr, C: tl.constexpr, WS: tl.constexpr,
                                SHIFT: tl.constexpr, NH: tl.constexpr, HD: tl.constexpr, HAS_BIAS: tl.constexpr,
                                DOT_MODE: tl.constexpr, WINDOWS: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_D: tl.constexpr):
        """Program (run of WINDOWS windows, head h): out = W_h @ x + b_h for each window; the NH
        programs of a run are neighbours in the grid, so they share the tokens' cache lines."""
        pid = tl.program_id(0)
        h = pid % NH
        first = (pid // NH) * WINDOWS
        N: tl.constexpr = WS * WS
        n = tl.arange(0, BLOCK_N)
        d = tl.arange(0, BLOCK_D)
        n_ok = n < N
        wt = tl.load(w_ptr + (h * N + n[:, None]) * N + n[None, :], mask=n_ok[:, None] & n_ok[None, :], other=0.)
        if HAS_BIAS:
            bias = tl.load(b_ptr + h * N + n, mask=n_ok, other=0.).to(tl.float32)
        cols = h * HD + d
        d_ok = d < HD
        for i in range(WINDOWS):
            row, ok = _window_tokens(first + i, n, n_windows, H, W, WS, SHIFT)
            off = row[:, None] * C + cols[None, :]
            mask = ok[:, None] & d_ok[None, :]
            xt = tl.load(x_ptr + off, mask=mask, other=0.)
            acc = _dot(wt, xt, DOT_MODE)
            if HAS_BIAS:
                acc += bias[:, None]
            tl.store(y_ptr + off, acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _spatial_mlp_bwd_kernel(dy_ptr, x_ptr, w_ptr, dx_ptr, part_ptr, n_windows, windows_per_group,
                                H: tl.constexpr, W: tl.constexpr, C: tl.constexpr, WS: tl.constexpr,
                                SHIFT: tl.constexpr, NH: tl.constexpr, HD: tl.constexpr, DOT_MODE: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Program (group g of windows, head h): dx = W_h^T @ dy for each window, and the group's sums
        of dy @ x^T (dW_h) and of dy's rows (db_h) into row g of the partial buffer."""
        pid = tl.program_id(0)
        h = pid % NH
        g = pid // NH
        N: tl.constexpr = WS * WS
        n = tl.arange(0, BLOCK_N)
        d = tl.arange(0, BLOCK_D)
        n_ok = n < N
        wt = tl.load(w_ptr + (h * N + n[:, None]) * N + n[None, :], mask=n_ok[:, None] & n_ok[None, :], other=0.)
        wt_t = tl.trans(wt)
        cols = h * HD + d
        d_ok = d < HD
        acc_w = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
        first = g * windows_per_group
        for i in range(windows_per_group):
            row, ok = _window_tokens(first + i, n, n_windows, H, W, WS, SHIFT)
            off = row[:, None] * C + cols[None, :]
            mask = ok[:, None] & d_ok[None, :]
            dyt = tl.load(dy_ptr + off, mask=mask, other=0.)
            xt = tl.load(x_ptr + off, mask=mask, other=0.)
            dx = _dot(wt_t, dyt, DOT_MODE)
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            acc_w += _dot(dyt, tl.trans(xt), DOT_MODE)
            acc_b += tl.sum(dyt.to(tl.float32), axis=1)
        P: tl.constexpr = NH * N * (N + 1)
        base = part_ptr + g.to(tl.int64) * P
        tl.store(base + (h * N + n[:, None]) * N + n[None, :], acc_w, mask=n_ok[:, None] & n_ok[None, :])
        tl.store(base + NH * N * N + h * N + n, acc_b, mask=n_ok)


# ----------------------------------------------------------------------------- launchers
# Windows a forward program takes: the head's N x N weight (8 KB in bf16 at window 8) is read once for
# them. Backward groups a head: enough programs to fill the GPU several times over, as the window
# attention's backward (its partial buffer is nh*N*(N+1) floats a group: 66 KB at window 8, 4 heads).
FWD_WINDOWS = 4
BWD_PROGRAMS_PER_SM = 8


@functools.lru_cache(None)
def _geometry(H: int, W: int, C: int, window_size: int, shift_size: int, num_heads: int) -> tuple:
    """-> (windows a sample, BLOCK_N, BLOCK_D), after checking the shapes."""
    check_window(H, W, window_size, shift_size)
    if C % num_heads:
        raise ValueError(f'spatial MLP: {C} channels do not split into {num_heads} heads')
    grow = window_size if shift_size else 0
    n_win = ((H + grow) // window_size) * ((W + grow) // window_size)
    return n_win, max(16, next_power_of_2(window_size * window_size)), max(16, next_power_of_2(C // num_heads))


def _dot_mode(x: torch.Tensor) -> int:
    if x.dtype == torch.float32:
        return 1
    return 2 if x.device.type == 'cpu' else 0


def _check(x: torch.Tensor, weight: torch.Tensor, num_heads: int, window_size: int) -> None:
    N = window_size * window_size
    if x.dim() != 4:
        raise ValueError(f'spatial MLP takes a [B, H, W, C] map, got {tuple(x.shape)}')
    if tuple(weight.shape) != (num_heads * N, N, 1):
        raise ValueError(f'spatial MLP weight {tuple(weight.shape)}: expected {(num_heads * N, N, 1)} '
                         f'for {num_heads} heads and window {window_size}')
    if weight.dtype != x.dtype:
        raise TypeError(f'spatial MLP: input {x.dtype} and weight {weight.dtype} differ (as Conv1d, they '
                        f'must match outside autocast)')


def spatial_mlp_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], num_heads: int,
                    window_size: int, shift_size: int) -> torch.Tensor:
    """x [B, H, W, C] -> y [B, H, W, C] contiguous, in x's dtype."""
    check_triton_device(x, weight, bias)
    _check(x, weight, num_heads, window_size)
    B, H, W, C = x.shape
    check_tokens(B * H * W)
    n_win, block_n, block_d = _geometry(H, W, C, window_size, shift_size, num_heads)
    x = x.contiguous()
    y = torch.empty_like(x)
    n_windows = B * n_win
    if n_windows:
        _spatial_mlp_fwd_kernel[(cdiv(n_windows, FWD_WINDOWS) * num_heads,)](
            x, weight.contiguous(), bias.contiguous() if bias is not None else x, y, n_windows,
            H=H, W=W, C=C, WS=window_size, SHIFT=shift_size, NH=num_heads, HD=C // num_heads,
            HAS_BIAS=bias is not None, DOT_MODE=_dot_mode(x), WINDOWS=FWD_WINDOWS, BLOCK_N=block_n,
            BLOCK_D=block_d, num_warps=4)
    return y


def spatial_mlp_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, num_heads: int, window_size: int,
                    shift_size: int) -> tuple:
    """-> (dx like x, dweight like weight, dbias [nh*N] in weight's dtype)."""
    check_triton_device(x)
    B, H, W, C = x.shape
    n_win, block_n, block_d = _geometry(H, W, C, window_size, shift_size, num_heads)
    N = window_size * window_size
    dy, x = dy.contiguous(), x.contiguous()
    dx = torch.empty_like(x)
    n_windows = B * n_win
    groups = max(1, min(n_windows, cdiv(BWD_PROGRAMS_PER_SM * sm_count(x.device), num_heads)))
    per_group = cdiv(n_windows, groups) if n_windows else 1
    groups = cdiv(n_windows, per_group) if n_windows else 1
    # every program writes its whole row of partial sums; with no windows none runs: zeros
    part = (torch.empty if n_windows else torch.zeros)((1, groups, num_heads * N * (N + 1)), dtype=torch.float32,
                                                        device=x.device)
    if n_windows:
        _spatial_mlp_bwd_kernel[(groups * num_heads,)](
            dy, x, weight.contiguous(), dx, part, n_windows, per_group,
            H=H, W=W, C=C, WS=window_size, SHIFT=shift_size, NH=num_heads, HD=C // num_heads,
            DOT_MODE=_dot_mode(x), BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4)
    sums, = sum_partials(part, weight.dtype)
    # dbias copied out of the one sum: a custom op's outputs may not alias one another
    return dx, sums[:num_heads * N * N].view(weight.shape), sums[num_heads * N * N:].clone()


# ----------------------------------------------------------------------------- custom ops + autograd
# Compiled code calls the custom ops; eager code calls _SpatialMLP (custom-op dispatch costs more
# than these launches in an eager step). Both save the same tensors and run the same `_grads`.
@torch.library.custom_op('swin::spatial_mlp_fwd', mutates_args=())
def _fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], num_heads: int,
            window_size: int, shift_size: int) -> torch.Tensor:
    return spatial_mlp_fwd(x, weight, bias, num_heads, window_size, shift_size)


@_fwd_op.register_fake
def _(x, weight, bias, num_heads, window_size, shift_size):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op('swin::spatial_mlp_bwd', mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, num_heads: int, window_size: int,
            shift_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return spatial_mlp_bwd(dy, x, weight, num_heads, window_size, shift_size)


@_bwd_op.register_fake
def _(dy, x, weight, num_heads, window_size, shift_size):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight),
            weight.new_empty(weight.shape[0]))


def _save(ctx, x, weight, bias, num_heads, window_size, shift_size):
    ctx.save_for_backward(x, weight)
    ctx.geometry = num_heads, window_size, shift_size
    ctx.has_bias = bias is not None


def _grads(ctx, dy, bwd):
    x, weight = ctx.saved_tensors
    dx, dw, db = bwd(dy, x, weight, *ctx.geometry)
    return dx, dw, db if ctx.has_bias else None, None, None, None


_fwd_op.register_autograd(lambda ctx, dy: _grads(ctx, dy, _bwd_op),
                          setup_context=lambda ctx, inputs, output: _save(ctx, *inputs))


class _SpatialMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_heads, window_size, shift_size):
        _save(ctx, x, weight, bias, num_heads, window_size, shift_size)
        return spatial_mlp_fwd(x, weight, bias, num_heads, window_size, shift_size)

    @staticmethod
    def backward(ctx, dy):
        return _grads(ctx, dy, spatial_mlp_bwd)


def spatial_mlp(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], num_heads: int,
                window_size: int, shift_size: int) -> torch.Tensor:
    """Fused, differentiable `spatial_mlp_ref` (x [B, H, W, C] -> [B, H, W, C]); autocast as Conv1d."""
    x, weight, bias = autocast_inputs(x, weight, bias)
    args = (x, weight, bias, int(num_heads), int(window_size), int(shift_size))
    with torch.autocast(x.device.type, enabled=False):
        if torch.compiler.is_compiling():
            return _fwd_op(*args)
        return _SpatialMLP.apply(*args)


IMPLS = {
    'torch': spatial_mlp_ref,
    'triton': spatial_mlp if triton_available() else None,
    'apex': None,      # apex has no such op: ours stands in
}
