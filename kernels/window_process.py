"""Cyclic shift + window partition, and window merge + reverse shift, as one gather each.

Math (w = window, s = shift, map [B, H, W, C], windows [B*nW, w, w, C] with nW = (H/w)(W/w)):
    partition:  win[b, wy, wx, i, j, c] = x[b, (wy*w + i + s) mod H, (wx*w + j + s) mod W, c]
    merge:      the inverse permutation, x[b, (wy*w + i + s) mod H, ...] = win[b, wy, wx, i, j, c]
(roll by -s then partition; merge then roll by +s, as upstream). Both are permutations of rows of C
values, so the backward of partition is merge of the gradient and vice versa: bit-exact, no math.

Limits: H and W multiples of w (rejected otherwise, upstream does not pad); any B, C, dtype; the
map side may have any strides, the windows side is made contiguous. Element offsets are int64
(token indices int32: up to 2**31 - 1 tokens), the grid is 1-D over row blocks (no 65535 limit),
launches go to the current stream (Triton's default). The geometry (H, W, C, window, shift) is
compile-time: one specialisation per stage and shift, eight in a Swin model.

With --fused_layernorm as well, the model does not call these kernels: the same permutation
(`window_source` / `window_row_of` below) addresses the window side inside the LayerNorm kernels
(layer_norm.py), which saves a read and a write of the activation each way.
"""
from typing import Optional

import torch

from ._utils import cdiv, check_triton_device, next_power_of_2, triton_available


# ----------------------------------------------------------------------------- reference
def window_partition_ref(x: torch.Tensor, window_size: int, shift_size: int = 0) -> torch.Tensor:
    """[B, H, W, C] -> [B*nW, w, w, C], after rolling the map by -shift_size (upstream's ops)."""
    B, H, W, C = x.shape
    if shift_size:
        x = torch.roll(x, shifts=(-shift_size, -shift_size), dims=(1, 2))
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, C)


def window_merge_ref(windows: torch.Tensor, H: int, W: int, shift_size: int = 0) -> torch.Tensor:
    """[B*nW, w, w, C] -> [B, H, W, C], then roll by +shift_size (upstream's window_reverse + roll)."""
    w = windows.shape[1]
    B = windows.shape[0] // ((H // w) * (W // w))
    x = windows.view(B, H // w, W // w, w, w, -1).permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, -1)
    if shift_size:
        x = torch.roll(x, shifts=(shift_size, shift_size), dims=(1, 2))
    return x


def check_tokens(n_tokens: int) -> None:
    """The kernels index tokens in int32 (element offsets are int64)."""
    if n_tokens >= 2 ** 31:
        raise ValueError(f'{n_tokens} tokens (batch x H x W) in one call; the fused window kernels take '
                         f'at most 2**31 - 1: use a smaller batch per GPU')


def check_window(H: int, W: int, window_size: int, shift_size: int) -> None:
    if H % window_size or W % window_size:
        raise ValueError(f'feature map {H}x{W} is not a multiple of the window {window_size}: '
                         f'choose DATA.IMG_SIZE / window sizes that divide (upstream does not pad)')
    if not 0 <= shift_size < window_size:
        raise ValueError(f'shift {shift_size} must be in [0, window {window_size})')


# ----------------------------------------------------------------------------- triton kernels
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def window_source(rows, H: tl.constexpr, W: tl.constexpr, WS: tl.constexpr, SHIFT: tl.constexpr):
        """Window-layout rows (tokens) -> (b, y, x) of the map token each holds (partition's
        gather). The geometry is constexpr, so divisions by it compile to multiply-shifts."""
        j = rows % WS                                  # column inside the window
        i = (rows // WS) % WS                          # row inside the window
        win = rows // (WS * WS)
        n_wx: tl.constexpr = W // WS
        n_win: tl.constexpr = (H // WS) * n_wx
        wi = win % n_win
        b = win // n_win
        y = ((wi // n_wx) * WS + i + SHIFT) % H         # source row on the map (rolled by -SHIFT)
        x = ((wi % n_wx) * WS + j + SHIFT) % W
        return b, y, x

    @triton.jit
    def window_row_of(rows, H: tl.constexpr, W: tl.constexpr, WS: tl.constexpr, SHIFT: tl.constexpr):
        """Rows of a contiguous [B, H, W] map -> the window-layout row holding that token (merge's
        gather: the inverse of window_source)."""
        x = rows % W
        y = (rows // W) % H
        b = rows // (H * W)
        yu = (y + (H - SHIFT)) % H                     # undo the roll
        xu = (x + (W - SHIFT)) % W
        n_wx: tl.constexpr = W // WS
        n_win: tl.constexpr = (H // WS) * n_wx
        win = b * n_win + (yu // WS) * n_wx + xu // WS
        return (win * WS + yu % WS) * WS + xu % WS

    @triton.jit
    def _window_shuffle_kernel(
        map_ptr, win_ptr,                      # the [B, H, W, C] map (strided) and contiguous windows
        n_rows, stride_mb, stride_mh, stride_mw, stride_mc,
        H: tl.constexpr, W: tl.constexpr, C: tl.constexpr, WS: tl.constexpr, SHIFT: tl.constexpr,
        TO_WINDOWS: tl.constexpr,              # True: map -> windows (partition); False: merge
        C_CONTIGUOUS: tl.constexpr,            # the map's channel stride is 1
        BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        # Each program moves BLOCK_ROWS window-layout rows (tokens) of C values. Token indices
        # are int32 (the launcher checks n_rows < 2**31); element offsets are int64.
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < n_rows
        b, y, x = window_source(rows, H, W, WS, SHIFT)
        map_row = b.to(tl.int64) * stride_mb + y.to(tl.int64) * stride_mh + x.to(tl.int64) * stride_mw
        win_row = rows.to(tl.int64) * C
        # C is constexpr: the column loop unrolls and the mask below is dropped where BLOCK_C divides C
        for c0 in tl.static_range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            if C % BLOCK_C == 0:
                mask = row_ok[:, None]
            else:
                mask = row_ok[:, None] & (cols < C)[None, :]
            if C_CONTIGUOUS:
                map_off = map_row[:, None] + cols[None, :]
            else:
                map_off = map_row[:, None] + cols[None, :].to(tl.int64) * stride_mc
            win_off = win_row[:, None] + cols[None, :]
            if TO_WINDOWS:
                tl.store(win_ptr + win_off, tl.load(map_ptr + map_off, mask=mask), mask=mask)
            else:
                tl.store(map_ptr + map_off, tl.load(win_ptr + win_off, mask=mask), mask=mask)


def _tile(C: int, element_size: int, launch: Optional[dict] = None):
    """(rows a program, channels a tile, warps), from the sweep on an H100 (2026-11-26,
    benchmarks/results/tune_window_process.md): small programs of 16 tokens win at every Swin width
    (C = 96 bf16: 53.6 us, 2.88 TB/s, against 62.1 us for 64-token programs and 52.4 us for a
    plain copy of the same bytes); C <= 128 in one power-of-two tile (the masked lanes cost less
    than the extra loop steps of a narrower tile), wider rows in 128-channel steps; 8 warps where a
    row holds more than 256 bytes."""
    block_c = min(next_power_of_2(C), 128)
    warps = 8 if C * element_size > 256 else 4
    launch = launch or {}     # benchmarks/tune_window_process.py passes block_rows / block_c / warps
    return (launch.get('block_rows') or 16, launch.get('block_c') or block_c, launch.get('warps') or warps)


def _launch(map_t: torch.Tensor, win_t: torch.Tensor, window_size: int, shift_size: int,
            to_windows: bool, launch: Optional[dict] = None) -> None:
    B, H, W, C = map_t.shape
    n_rows = B * H * W
    block_rows, block_c, num_warps = _tile(C, map_t.element_size(), launch)
    _window_shuffle_kernel[(cdiv(n_rows, block_rows),)](
        map_t, win_t, n_rows, *map_t.stride(), H=H, W=W, C=C, WS=window_size, SHIFT=shift_size,
        TO_WINDOWS=to_windows, C_CONTIGUOUS=map_t.stride(3) == 1,
        BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=num_warps)


# ----------------------------------------------------------------------------- launchers
def window_partition_fwd(x: torch.Tensor, window_size: int, shift_size: int,
                         launch: Optional[dict] = None) -> torch.Tensor:
    """Triton partition: [B, H, W, C] (any strides) -> new contiguous [B*nW, w, w, C]."""
    check_triton_device(x)
    B, H, W, C = x.shape
    check_window(H, W, window_size, shift_size)
    check_tokens(B * H * W)
    out = torch.empty((B * H * W // window_size ** 2, window_size, window_size, C),
                      dtype=x.dtype, device=x.device)
    if out.numel():
        _launch(x, out, window_size, shift_size, to_windows=True, launch=launch)
    return out


def window_merge_fwd(windows: torch.Tensor, H: int, W: int, shift_size: int) -> torch.Tensor:
    """Triton merge: [B*nW, w, w, C] -> new contiguous [B, H, W, C]."""
    check_triton_device(windows)
    w, C = windows.shape[1], windows.shape[-1]
    check_window(H, W, w, shift_size)
    windows = windows.contiguous()
    B = windows.shape[0] // ((H // w) * (W // w))
    check_tokens(B * H * W)
    out = torch.empty((B, H, W, C), dtype=windows.dtype, device=windows.device)
    if out.numel():
        _launch(out, windows, w, shift_size, to_windows=False)
    return out


# The backward of a permutation is the inverse permutation of the gradient.
window_partition_bwd = window_merge_fwd
window_merge_bwd = window_partition_fwd


# ----------------------------------------------------------------------------- custom ops + autograd
@torch.library.custom_op('swin::window_partition', mutates_args=())
def _window_partition_op(x: torch.Tensor, window_size: int, shift_size: int) -> torch.Tensor:
    return window_partition_fwd(x, window_size, shift_size)


@_window_partition_op.register_fake
def _(x, window_size, shift_size):
    B, H, W, C = x.shape
    return x.new_empty((B * (H // window_size) * (W // window_size), window_size, window_size, C))


@torch.library.custom_op('swin::window_merge', mutates_args=())
def _window_merge_op(windows: torch.Tensor, H: int, W: int, shift_size: int) -> torch.Tensor:
    return window_merge_fwd(windows, H, W, shift_size)


@_window_merge_op.register_fake
def _(windows, H, W, shift_size):
    w = windows.shape[1]
    return windows.new_empty((windows.shape[0] // ((H // w) * (W // w)), H, W, windows.shape[-1]))


# Both paths (custom ops under torch.compile, the autograd.Functions in eager) take their
# backward from `_partition_grad` / `_merge_grad`, given the op or the launcher to call.
def _partition_grad(ctx, grad, merge):
    return merge(grad, ctx.H, ctx.W, ctx.shift_size), None, None


def _merge_grad(ctx, grad, partition):
    return partition(grad, ctx.window_size, ctx.shift_size), None, None, None


def _partition_setup(ctx, inputs, output):
    x, _, ctx.shift_size = inputs
    ctx.H, ctx.W = x.shape[1], x.shape[2]


def _merge_setup(ctx, inputs, output):
    windows, _, _, ctx.shift_size = inputs
    ctx.window_size = windows.shape[1]


_window_partition_op.register_autograd(lambda ctx, grad: _partition_grad(ctx, grad, _window_merge_op),
                                       setup_context=_partition_setup)
_window_merge_op.register_autograd(lambda ctx, grad: _merge_grad(ctx, grad, _window_partition_op),
                                   setup_context=_merge_setup)


class _WindowPartition(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, window_size, shift_size):
        _partition_setup(ctx, (x, window_size, shift_size), None)
        return window_partition_fwd(x, window_size, shift_size)

    @staticmethod
    def backward(ctx, grad):
        return _partition_grad(ctx, grad, window_partition_bwd)


class _WindowMerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, windows, H, W, shift_size):
        _merge_setup(ctx, (windows, H, W, shift_size), None)
        return window_merge_fwd(windows, H, W, shift_size)

    @staticmethod
    def backward(ctx, grad):
        return _merge_grad(ctx, grad, window_merge_bwd)


# ----------------------------------------------------------------------------- functional API
# Eager calls go through the thin autograd.Function (a custom op costs tens of microseconds of
# Python dispatch per call, which an eager Swin step cannot afford); torch.compile traces the
# registered custom ops, which it sees as single nodes.
def window_partition(x: torch.Tensor, window_size: int, shift_size: int = 0) -> torch.Tensor:
    """Fused roll(-shift) + partition, differentiable: [B, H, W, C] -> [B*nW, w, w, C]."""
    if torch.compiler.is_compiling():
        return _window_partition_op(x, window_size, shift_size)
    return _WindowPartition.apply(x, window_size, shift_size)


def window_merge(windows: torch.Tensor, H: int, W: int, shift_size: int = 0) -> torch.Tensor:
    """Fused merge + roll(+shift), differentiable: [B*nW, w, w, C] -> [B, H, W, C]."""
    if torch.compiler.is_compiling():
        return _window_merge_op(windows, H, W, shift_size)
    return _WindowMerge.apply(windows, H, W, shift_size)


# Implementations by backend; apex has no such op, so 'apex' uses ours.
IMPLS = {
    'torch': (window_partition_ref, window_merge_ref),
    'triton': (window_partition, window_merge) if triton_available() else None,
}
IMPLS['apex'] = IMPLS['triton']
