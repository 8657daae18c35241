"""LayerNorm over the last dimension, statistics in fp32 for every input dtype.

Math (rows x of width C):
  mean = sum(x) / C;  rstd = 1 / sqrt(sum((x - mean)^2) / C + eps);  xhat = (x - mean) * rstd
  y = xhat * w + b
Backward (g = dy * w):
  dx = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat))
  dw = sum_rows(dy * xhat);  db = sum_rows(dy)
dw and db are deterministic: each backward program sums a fixed chunk of rows into its own row of
a [programs, C] fp32 buffer, then torch sums the buffer (no atomics).

Residual fusion (`add_layer_norm`, the block's `h = shortcut + drop_path(branch); y = norm2(h)`):
  h = shortcut + branch * scale[sample]   (scale: drop-path's per-sample keep/keep_prob, or none)
  y = LayerNorm(h);  returns (h, y). The product is rounded to branch's dtype and the sum to h's,
  as the unfused ops round; on the GPU the compiler may still fuse the multiply-add into one FMA,
  so h can differ from the unfused ops in its last bit (tests: exact on CPU, 2 ulp on GPU). Backward (dh from h's other
  use, dy from the norm): dshortcut = dh + dLN(dy);  dbranch = dshortcut * scale[sample].
  One pass each way instead of three (drop-path multiply, add, norm).

Window layout (`layer_norm_partition`, `merge_add_layer_norm`; used where --fused_layernorm and
--fused_window_process both run on Triton): the attention side of the block is [B*nW, w, w, C] with
the cyclic shift applied (window_process.py's permutation). The kernels walk the map's rows and
address that side through the permutation: norm1 writes its output straight into window layout, and
the residual + norm2 reads the attention output from it; the backwards gather dy and scatter
dbranch the same way. Per row the arithmetic is the plain kernels', so results match them.
Swin V2 (`merge_post_norm_add`, `post_norm_add_partition`): the attention output is read from window
layout, and the MLP residual's h is written to the map and to the next block's window layout (its
shift), h's two gradients summed in the backward's pass.

Shapes: x [..., C] (any leading dims; made contiguous), w and b [C] (fp32 or half under O2).
Saves mean and rstd (fp32, one per row) for the backward. Any width (one row per tile up to
C = 16384). Parameter names are nn.LayerNorm's: the module keeps its `weight` and `bias`.
apex: `apex.normalization.fused_layer_norm_affine` where apex is importable (KERNEL_BACKEND apex).
"""
import functools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ._utils import apex_available, cdiv, check_triton_device, next_power_of_2, sm_count, triton_available
from .window_process import check_tokens, check_window, window_merge_ref, window_partition, window_partition_ref

APEX_MODULE = 'apex.normalization'


# ----------------------------------------------------------------------------- reference
def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def post_norm_add_ref(shortcut: torch.Tensor, branch: torch.Tensor, scale, weight: torch.Tensor,
                      bias: torch.Tensor, eps: float = 1e-5, layer_norm=layer_norm_ref) -> torch.Tensor:
    """Swin V2's res-post-norm residual: shortcut + LayerNorm(branch) * scale (scale [B, 1, ...] or None)."""
    y = layer_norm(branch, weight, bias, eps)
    return shortcut + (y * scale.to(y.dtype) if scale is not None else y)


def add_layer_norm_ref(shortcut: torch.Tensor, branch: torch.Tensor, scale, weight: torch.Tensor,
                       bias: torch.Tensor, eps: float = 1e-5):
    """-> (h, y): h = shortcut + branch * scale (scale [B, 1, ...] or None), y = LayerNorm(h)."""
    h = shortcut + (branch * scale if scale is not None else branch)
    return h, layer_norm_ref(h, weight, bias, eps)


# ----------------------------------------------------------------------------- triton kernels
if triton_available():
    import triton
    import triton.language as tl

    from .window_process import window_row_of

    @triton.jit
    def _layer_norm_fwd_kernel(x_ptr, res_ptr, scale_ptr, h_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
                               M, C, rows_per_sample, eps, HAS_RESIDUAL: tl.constexpr, HAS_SCALE: tl.constexpr,
                               POST: tl.constexpr,
                               WINDOWED: tl.constexpr, H: tl.constexpr, W: tl.constexpr, WS: tl.constexpr,
                               SHIFT: tl.constexpr, WIN_OUT: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                               BLOCK_C: tl.constexpr):
        """y = LayerNorm(x); with HAS_RESIDUAL, x is the branch and h = res + x * scale[row's sample]
        is written to h_ptr and normalised (pre-norm, V1). With POST, x is the branch and
        h = res + LayerNorm(x) * scale is written to h_ptr, y only giving its dtype (post-norm, V2).
        Rows are tokens of a [B, H, W] map; with WINDOWED the attention side is in window layout
        (shift SHIFT): y is written there (norm1 + partition; with HAS_RESIDUAL and WIN_OUT the MLP's
        residual + norm1 + partition), or, with HAS_RESIDUAL or POST, the branch is read from there
        (merge + residual + norm2; merge + norm1 + residual); with POST and WIN_OUT the branch is a map
        and h is written to the map and, into y_ptr, to window layout (V2's MLP residual + the next
        block's partition)."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_C)
        row_ok = rows < M
        col_ok = cols < C
        ok = row_ok[:, None] & col_ok[None, :]
        off = rows[:, None] * C + cols[None, :]
        if WINDOWED:   # token indices fit int32 (the launcher checks M)
            win_rows = window_row_of(rows.to(tl.int32), H, W, WS, SHIFT).to(tl.int64)
            win_off = win_rows[:, None] * C + cols[None, :]
        else:
            win_off = off
        if (HAS_RESIDUAL or POST) and not WIN_OUT:
            x = tl.load(x_ptr + win_off, mask=ok, other=0.).to(tl.float32)
        else:
            x = tl.load(x_ptr + off, mask=ok, other=0.).to(tl.float32)
        if HAS_RESIDUAL:
            if HAS_SCALE:      # round the product to the branch's dtype, as `branch * scale` does
                s = tl.load(scale_ptr + rows // rows_per_sample, mask=row_ok, other=0.).to(tl.float32)
                x = (x * s[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
            h = (tl.load(res_ptr + off, mask=ok, other=0.).to(tl.float32) + x).to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + off, h, mask=ok)
            x = h.to(tl.float32)
        mean = tl.sum(x, axis=1) / C
        xc = tl.where(ok, x - mean[:, None], 0.)
        rstd = 1. / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.).to(tl.float32)
        y = xc * rstd[:, None] * w[None, :] + b[None, :]
        if POST:   # rounded as the unfused ops round: norm's output, then `* scale`, then the add
            y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
            if HAS_SCALE:
                s = tl.load(scale_ptr + rows // rows_per_sample, mask=row_ok, other=0.).to(tl.float32)
                y = (y * s[:, None]).to(y_ptr.dtype.element_ty).to(tl.float32)
            h = tl.load(res_ptr + off, mask=ok, other=0.).to(tl.float32) + y
            tl.store(h_ptr + off, h.to(h_ptr.dtype.element_ty), mask=ok)
            if WIN_OUT:   # h again, in the next block's window layout (y_ptr: a buffer of h's dtype then)
                tl.store(y_ptr + win_off, h.to(y_ptr.dtype.element_ty), mask=ok)
        elif HAS_RESIDUAL and not WIN_OUT:
            tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=ok)
        else:
            tl.store(y_ptr + win_off, y.to(y_ptr.dtype.element_ty), mask=ok)
        tl.store(mean_ptr + rows, mean, mask=row_ok)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)

    @triton.jit
    def _layer_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
                               dres_ptr, scale_ptr, dbranch_ptr, M, C, rows_per_program, rows_per_sample,
                               HAS_DRES: tl.constexpr, HAS_DBRANCH: tl.constexpr, HAS_SCALE: tl.constexpr,
                               POST: tl.constexpr,
                               WINDOWED: tl.constexpr, H: tl.constexpr, W: tl.constexpr, WS: tl.constexpr,
                               SHIFT: tl.constexpr, WIN_OUT: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                               BLOCK_C: tl.constexpr):
        """dx = dLN(dy) (+ dres: the gradient of h from its other use); with HAS_DBRANCH also
        dbranch = dx * scale[row's sample]. With POST (dy is h's gradient in the norm's dtype, x the
        branch): dy * scale feeds dLN and dx is the branch's gradient. WINDOWED as in the forward:
        dbranch (HAS_DBRANCH) or, with POST, x and dx are in window layout; else (and with WIN_OUT)
        dy is read from it (norm1 + partition). With POST and WIN_OUT (x a map): h's gradient is dy
        plus dres read from window layout, rounded to h's dtype and written to dbranch_ptr (the
        shortcut's gradient); HAS_DRES / HAS_DBRANCH are off then."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)
        col_ok = cols < C
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.).to(tl.float32)
        # dw, db accumulate in a whole tile and are reduced over rows once, after the loop: a
        # reduction across rows inside the loop (shared memory, every step) was the slow part
        dw = tl.zeros((BLOCK_ROWS, BLOCK_C), dtype=tl.float32)
        db = tl.zeros((BLOCK_ROWS, BLOCK_C), dtype=tl.float32)
        start = pid.to(tl.int64) * rows_per_program
        for r0 in range(0, rows_per_program, BLOCK_ROWS):
            rows = start + r0 + tl.arange(0, BLOCK_ROWS)
            row_ok = (rows < M) & (r0 + tl.arange(0, BLOCK_ROWS) < rows_per_program)
            ok = row_ok[:, None] & col_ok[None, :]
            off = rows[:, None] * C + cols[None, :]
            if WINDOWED:
                win_rows = window_row_of(rows.to(tl.int32), H, W, WS, SHIFT).to(tl.int64)
                win_off = win_rows[:, None] * C + cols[None, :]
            else:
                win_off = off
            if POST and not WIN_OUT:
                x = tl.load(x_ptr + win_off, mask=ok, other=0.).to(tl.float32)
            else:
                x = tl.load(x_ptr + off, mask=ok, other=0.).to(tl.float32)
            if POST and WIN_OUT:   # h's gradient from its two uses: the map's (dy) and the windows' (dres)
                dy = tl.load(dy_ptr + off, mask=ok, other=0.).to(tl.float32)
                dy = (dy + tl.load(dres_ptr + win_off, mask=ok, other=0.).to(tl.float32)).to(dy_ptr.dtype.element_ty)
                tl.store(dbranch_ptr + off, dy.to(dbranch_ptr.dtype.element_ty), mask=ok)   # the shortcut's
                dy = dy.to(tl.float32)
            elif (HAS_DBRANCH or POST) and not WIN_OUT:
                dy = tl.load(dy_ptr + off, mask=ok, other=0.).to(tl.float32)
            else:
                dy = tl.load(dy_ptr + win_off, mask=ok, other=0.).to(tl.float32)
            if POST and HAS_SCALE:   # the gradient through `* scale`, rounded to the norm's dtype
                s = tl.load(scale_ptr + rows // rows_per_sample, mask=row_ok, other=0.).to(tl.float32)
                dy = (dy * s[:, None]).to(dy_ptr.dtype.element_ty).to(tl.float32)
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.)
            xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.)
            g = dy * w[None, :]
            c1 = tl.sum(xhat * g, axis=1) / C
            c2 = tl.sum(g, axis=1) / C
            dx = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            if HAS_DRES and not POST:
                dx += tl.load(dres_ptr + off, mask=ok, other=0.).to(tl.float32)
            if POST and not WIN_OUT:
                tl.store(dx_ptr + win_off, dx.to(dx_ptr.dtype.element_ty), mask=ok)
            else:
                tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=ok)
            if HAS_DBRANCH and not POST:
                if HAS_SCALE:
                    s = tl.load(scale_ptr + rows // rows_per_sample, mask=row_ok, other=0.).to(tl.float32)
                    dx = dx * s[:, None]
                if WIN_OUT:
                    tl.store(dbranch_ptr + off, dx.to(dbranch_ptr.dtype.element_ty), mask=ok)
                else:
                    tl.store(dbranch_ptr + win_off, dx.to(dbranch_ptr.dtype.element_ty), mask=ok)
            dw += dy * xhat
            db += dy
        tl.store(dw_part_ptr + pid * C + cols, tl.sum(dw, axis=0), mask=col_ok)
        tl.store(db_part_ptr + pid * C + cols, tl.sum(db, axis=0), mask=col_ok)

    @triton.jit
    def _layer_norm_wgrad_kernel(part_ptr, dw_ptr, db_ptr, P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """dw, db = the backward's per-program partial sums part [2, P, C] (fp32) summed over P, in a
        fixed order (deterministic), written in the weight's dtype: one launch where torch took four
        (two column sums, two casts). Program (column block, 0 for dw / 1 for db); a grid of one
        in the second dimension sums part [1, P, C] into dw alone (kernels/bias_grad.py)."""
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        which = tl.program_id(1)
        base = part_ptr + which.to(tl.int64) * P * C
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            rows = p0 + tl.arange(0, BLOCK_P)
            ok = (rows < P)[:, None] & col_ok[None, :]
            acc += tl.load(base + rows[:, None].to(tl.int64) * C + cols[None, :], mask=ok, other=0.)
        total = tl.sum(acc, axis=0)
        tl.store(dw_ptr + cols, total.to(dw_ptr.dtype.element_ty), mask=col_ok & (which == 0))
        tl.store(db_ptr + cols, total.to(db_ptr.dtype.element_ty), mask=col_ok & (which == 1))


# the weight-gradient sum's tile (partial rows x columns a step): narrow column blocks give more
# programs (Swin-T stage 1, C = 96: 12 programs), tall tiles fewer dependent loads (2112 partial rows:
# 9 steps of 16 KB)
_WGRAD_ROWS, _WGRAD_COLS = 256, 16


def sum_partials(part: torch.Tensor, dtype: torch.dtype) -> tuple:
    """part [K, P, C] fp32, K = 2 (the backward's per-program sums for dw and db) or 1 -> K sums [C]
    in `dtype`, each summed over P in a fixed order, in one launch."""
    K, P, C = part.shape
    assert K in (1, 2), part.shape
    sums = [torch.empty(C, dtype=dtype, device=part.device) for _ in range(K)]
    _layer_norm_wgrad_kernel[(cdiv(C, _WGRAD_COLS), K)](part, sums[0], sums[-1], P, C, BLOCK_P=_WGRAD_ROWS,
                                                        BLOCK_C=_WGRAD_COLS)
    return tuple(sums)


@functools.lru_cache(None)
def _bwd_launch(C: int):
    """(rows a tile, warps, programs per SM) for the backward. From the sweep on an H100 (bf16,
    2026-11-26, benchmarks/results/tune_layer_norm.md): narrow rows want more programs (16/SM at
    C <= 256), wide rows want fewer and smaller tiles (2 rows, 4 warps at C >= 768: 138 -> 66 us
    at 6272x768); the residual variant follows the same trend (205 -> 101 us at 25088x384)."""
    block_rows, _, num_warps = _tile(C)
    if C >= 768:
        return max(1, min(block_rows, 2)), 4, 4
    return block_rows, num_warps, 16 if C <= 256 else 8


@functools.lru_cache(None)
def _tile(C: int):
    block_c = next_power_of_2(C)
    if block_c > 16384:
        raise ValueError(f'fused LayerNorm supports widths up to 16384, got {C}')
    block_rows = max(1, min(16, 4096 // block_c))   # ~4K elements a tile: full 16-byte loads, no spills
    num_warps = 4 if block_c * block_rows <= 4096 else 8
    return block_rows, block_c, num_warps


# ----------------------------------------------------------------------------- launchers
def _rows_per_sample(M: int, scale: Optional[torch.Tensor]) -> int:
    """Rows that share one drop-path factor (scale holds one per sample)."""
    return max(1, M // scale.numel()) if scale is not None else 1


def _fp32_output(device: torch.device, dtype: torch.dtype) -> bool:
    """Under CUDA autocast F.layer_norm returns fp32 for half inputs (it is on autocast's fp32
    list; CPU autocast leaves it alone): ours does the same."""
    return device.type == 'cuda' and dtype != torch.float32 and torch.is_autocast_enabled('cuda')


def _geometry(window: Optional[Sequence[int]], M: int) -> dict:
    """The kernels' window arguments: window = (H, W, window_size, shift[, out]) or None; out = 1 (the
    residual forms only): the branch is in the map's layout and y goes to window layout."""
    if not window:
        return dict(WINDOWED=False, H=1, W=1, WS=1, SHIFT=0, WIN_OUT=False)
    H, W, ws, shift = (int(v) for v in window[:4])
    check_window(H, W, ws, shift)
    check_tokens(M)
    if M % (H * W):
        raise ValueError(f'LayerNorm with window layout: {M} tokens are not a whole number of {H}x{W} maps')
    return dict(WINDOWED=True, H=H, W=W, WS=ws, SHIFT=shift, WIN_OUT=_win_out(window))


def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   fp32_output: bool = False, residual: Optional[torch.Tensor] = None,
                   scale: Optional[torch.Tensor] = None, window: Optional[Sequence[int]] = None,
                   post: bool = False):
    """-> (y like x (fp32 with fp32_output), mean [M] fp32, rstd [M] fp32), and with `residual`
    (x is then the branch) also h = residual + x * scale, the tensor that was normalised.
    With `post` (and `residual`): -> (h = residual + LayerNorm(x) * scale, mean, rstd), the norm's
    output (fp32 with fp32_output, else x's dtype) never written; with window = (H, W, window_size,
    shift, 1) also h in that window layout (a 4th result; the norm's dtype must be h's).
    With window = (H, W, window_size, shift), the attention side is in window layout
    [B*nW, ws, ws, C]: y is returned in it (x is the map), or the branch x is read from it (with
    `residual`, which is the map); with window = (H, W, window_size, shift, 1) and `residual`, x and
    the residual are maps and y is returned in window layout. mean and rstd follow the map's rows."""
    check_triton_device(x)
    C = x.shape[-1]
    M = x.numel() // C
    geometry = _geometry(window, M)        # before anything is allocated
    x2 = x.reshape(-1, C).contiguous()
    if residual is not None:
        if residual.numel() != x.numel() or ((not window or geometry['WIN_OUT']) and residual.shape != x.shape):
            raise ValueError(f'add_layer_norm: shortcut {tuple(residual.shape)} and branch {tuple(x.shape)} differ')
        y_dtype = torch.float32 if fp32_output else x.dtype
        h_dtype = torch.promote_types(residual.dtype, y_dtype if post else x.dtype)
        h = torch.empty(x2.shape, dtype=h_dtype, device=x.device)
        res2 = residual.reshape(-1, C).contiguous()
    else:
        assert not post, 'post-norm needs the residual'
        h, res2, h_dtype = x2, x2, x.dtype
    y_dtype = torch.float32 if fp32_output else (x.dtype if post else h_dtype)
    # the post-norm form never writes y: a one-element tensor carries its dtype into the kernel; with
    # WIN_OUT it is h's copy in window layout (h's dtype, which must be the norm's then)
    if post and geometry['WIN_OUT'] and h_dtype != y_dtype:
        raise ValueError(f'post_norm_add_partition: h ({h_dtype}) and the norm\'s output ({y_dtype}) differ in dtype')
    y = torch.empty((1,) if post and not geometry['WIN_OUT'] else x2.shape, dtype=y_dtype, device=x.device)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    block_rows, block_c, num_warps = _tile(C)
    scale_flat = scale.reshape(-1).contiguous() if scale is not None else x2
    if M:
        _layer_norm_fwd_kernel[(cdiv(M, block_rows),)](
            x2, res2, scale_flat, h, weight.contiguous(), bias.contiguous(), y, mean, rstd, M, C,
            _rows_per_sample(M, scale), float(eps),
            HAS_RESIDUAL=residual is not None and not post, HAS_SCALE=scale is not None, POST=post, **geometry,
            BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=num_warps)
    if post:
        out = h.view(residual.shape), mean, rstd
        return out + (y.view(-1, geometry['WS'], geometry['WS'], C),) if geometry['WIN_OUT'] else out
    if residual is not None:
        y = y.view(-1, geometry['WS'], geometry['WS'], C) if geometry['WIN_OUT'] else y.view(residual.shape)
        return y, mean, rstd, h.view(residual.shape)
    if window:
        ws = geometry['WS']
        return y.view(-1, ws, ws, C), mean, rstd
    return y.view(x.shape), mean, rstd


def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                   rstd: torch.Tensor, dres: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
                   branch_dtype: Optional[torch.dtype] = None, window: Optional[Sequence[int]] = None,
                   launch: Optional[dict] = None, post: bool = False):
    """-> (dx like x, dweight like weight, dbias like weight). For add_layer_norm (x is h): dres is
    h's gradient from its other use, added in; with `branch_dtype` also -> dbranch = dx * scale
    (the branch's gradient, a 4th result). `window` as in the forward: dy is read from window
    layout, or (with branch_dtype) dbranch is returned in it (in the map's layout, dy read from window
    layout, where window has a 5th value 1). With `post` (post_norm_add's
    backward): x is the branch, dy h's gradient in the norm's output dtype, `scale` drop-path's; dx
    (the branch's gradient) is returned in x's layout. With `post` and window = (H, W, window_size,
    shift, 1): dres is the gradient of h's window-layout copy, and the 4th result (in `branch_dtype`,
    the shortcut's dtype) is the shortcut's gradient, dy + dres in h's dtype."""
    check_triton_device(x)
    C = x.shape[-1]
    M = x.numel() // C
    geometry = _geometry(window, M)
    x2 = x.reshape(-1, C).contiguous()
    dy2 = dy.reshape(-1, C).contiguous()
    dx = torch.empty_like(x2)
    dres2 = dres.reshape(-1, C).contiguous() if dres is not None else dx
    dbranch = torch.empty(x2.shape, dtype=branch_dtype, device=x.device) if branch_dtype is not None else dx
    scale_flat = scale.reshape(-1).contiguous() if scale is not None else dx
    _, block_c, _ = _tile(C)
    block_rows, num_warps, per_sm = _bwd_launch(C)
    launch = launch or {}     # benchmarks/tune_layer_norm.py passes bwd_rows / bwd_warps / bwd_programs_per_sm
    block_rows = launch.get('bwd_rows') or block_rows
    num_warps = launch.get('bwd_warps') or num_warps
    per_sm = launch.get('bwd_programs_per_sm') or per_sm
    programs = max(1, min(per_sm * sm_count(x.device), cdiv(M, block_rows)))
    rows_per_program = cdiv(M, programs)
    programs = cdiv(M, rows_per_program) if M else 1
    # every program writes its whole row of partial sums: no zero-fill needed, except with no rows
    # at all, where no program runs and the weight gradients are zero
    part = (torch.empty if M else torch.zeros)((2, programs, C), dtype=torch.float32, device=x.device)
    if M:
        _layer_norm_bwd_kernel[(programs,)](
            dy2, x2, weight.contiguous(), mean, rstd, dx, part[0], part[1], dres2, scale_flat, dbranch,
            M, C, rows_per_program, _rows_per_sample(M, scale),
            HAS_DRES=dres is not None and not post, HAS_DBRANCH=branch_dtype is not None and not post,
            HAS_SCALE=scale is not None,
            POST=post, **geometry, BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=num_warps)
    out = (dx.view(x.shape),) + sum_partials(part, weight.dtype)
    if branch_dtype is None:
        return out
    ws = geometry['WS']
    return out + (dbranch.view(-1, ws, ws, C) if window and not geometry['WIN_OUT'] else dbranch.view(x.shape),)


# ----------------------------------------------------------------------------- custom ops + autograd
# `window` is [] for a plain LayerNorm, or [H, W, window_size, shift] for the window-layout forms.
def _windows_shape(window, M: int, C: int) -> tuple:
    """[B*nW, ws, ws, C] for M tokens."""
    ws = window[2]
    return (M // (ws * ws), ws, ws, C)


def _win_out(window) -> bool:
    """A residual form's y (not its branch) in window layout: the MLP's residual + norm1 + partition."""
    return len(window) > 4 and bool(window[4])


# Compiled code calls the custom ops; eager code calls the autograd.Functions (custom-op dispatch
# costs tens of microseconds a call, more than these kernels in an eager step). Both paths save
# the same tensors and run the same `_grads` / `_add_grads`, with the custom op or the launcher.
@torch.library.custom_op('swin::layer_norm_fwd', mutates_args=())
def _fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
            fp32_output: bool, window: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_fwd(x, weight, bias, eps, fp32_output, window=window)


@_fwd_op.register_fake
def _(x, weight, bias, eps, fp32_output, window):
    M = x.numel() // x.shape[-1]
    shape = _windows_shape(window, M, x.shape[-1]) if window else x.shape
    # contiguous, like the real output (x itself may be strided)
    return (x.new_empty(shape, dtype=torch.float32 if fp32_output else x.dtype),
            x.new_empty((M,), dtype=torch.float32), x.new_empty((M,), dtype=torch.float32))


@torch.library.custom_op('swin::layer_norm_bwd', mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
            rstd: torch.Tensor, window: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_bwd(dy, x, weight, mean, rstd, window=window)


@_bwd_op.register_fake
def _(dy, x, weight, mean, rstd, window):
    return x.new_empty(x.shape), torch.empty_like(weight), torch.empty_like(weight)


def _save(ctx, x, weight, mean, rstd, window):
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.window = window


def _grads(ctx, dy, bwd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = bwd(dy, x, weight, mean, rstd, window=ctx.window)
    return dx, dw, db, None, None, None


def _setup(ctx, inputs, output):
    x, weight, _, _, _, window = inputs
    _save(ctx, x, weight, output[1], output[2], window)


_fwd_op.register_autograd(lambda ctx, dy, _dmean, _drstd: _grads(ctx, dy, _bwd_op), setup_context=_setup)


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, fp32_output, window):
        y, mean, rstd = layer_norm_fwd(x, weight, bias, eps, fp32_output, window=window)
        _save(ctx, x, weight, mean, rstd, window)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _grads(ctx, dy, layer_norm_bwd)


def _layer_norm(x, weight, bias, eps, window):
    fp32_output = _fp32_output(x.device, x.dtype)
    if torch.compiler.is_compiling():
        return _fwd_op(x, weight, bias, float(eps), fp32_output, window)[0]
    return _LayerNorm.apply(x, weight, bias, float(eps), fp32_output, window)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Fused, differentiable LayerNorm over the last dimension (F.layer_norm's math).

    Under CUDA autocast the output is fp32, as autocast makes F.layer_norm's (it is on CUDA
    autocast's fp32 list; CPU autocast leaves it alone), so the residual stream keeps the
    reference path's precision; the input is read as is.
    """
    return _layer_norm(x, weight, bias, eps, [])


def layer_norm_partition(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                         H: int, W: int, window_size: int, shift_size: int) -> torch.Tensor:
    """Fused `window_partition(LayerNorm(x), window_size, shift_size)`: x [B, H*W, C] (or
    [B, H, W, C]) -> normalised windows [B*nW, ws, ws, C]; the block's norm1 written straight
    into window layout, one pass instead of two, each way."""
    return _layer_norm(x, weight, bias, eps, [H, W, window_size, shift_size])


# ----------------------------------------------------------------------------- residual add + LayerNorm
@torch.library.custom_op('swin::add_layer_norm_fwd', mutates_args=())
def _add_fwd_op(shortcut: torch.Tensor, branch: torch.Tensor, scale: Optional[torch.Tensor], weight: torch.Tensor,
                bias: torch.Tensor, eps: float, fp32_output: bool, window: list[int]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, mean, rstd, h = layer_norm_fwd(branch, weight, bias, eps, fp32_output, residual=shortcut, scale=scale,
                                      window=window)
    return h, y, mean, rstd


@_add_fwd_op.register_fake
def _(shortcut, branch, scale, weight, bias, eps, fp32_output, window):
    M = branch.numel() // branch.shape[-1]
    h_dtype = torch.promote_types(shortcut.dtype, branch.dtype)
    y_shape = _windows_shape(window, M, branch.shape[-1]) if window and _win_out(window) else shortcut.shape
    return (shortcut.new_empty(shortcut.shape, dtype=h_dtype),
            shortcut.new_empty(y_shape, dtype=torch.float32 if fp32_output else h_dtype),
            branch.new_empty((M,), dtype=torch.float32), branch.new_empty((M,), dtype=torch.float32))


def _add_bwd(dh, dy, h, weight, mean, rstd, scale, branch_dtype, window):
    """-> (dshortcut, dweight, dbias, dbranch or an empty tensor where dbranch IS dshortcut)."""
    out = layer_norm_bwd(dy, h, weight, mean, rstd, dres=dh, scale=scale, branch_dtype=branch_dtype, window=window)
    return out if branch_dtype is not None else out + (h.new_empty(0),)


@torch.library.custom_op('swin::add_layer_norm_bwd', mutates_args=())
def _add_bwd_op(dh: Optional[torch.Tensor], dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                mean: torch.Tensor, rstd: torch.Tensor, scale: Optional[torch.Tensor],
                branch_dtype: Optional[torch.dtype], window: list[int]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _add_bwd(dh, dy, h, weight, mean, rstd, scale, branch_dtype, window)


@_add_bwd_op.register_fake
def _(dh, dy, h, weight, mean, rstd, scale, branch_dtype, window):
    M = h.numel() // h.shape[-1]
    branch_shape = _windows_shape(window, M, h.shape[-1]) if window and not _win_out(window) else h.shape
    return (h.new_empty(h.shape), torch.empty_like(weight), torch.empty_like(weight),
            h.new_empty(branch_shape, dtype=branch_dtype) if branch_dtype is not None else h.new_empty(0))


def _add_save(ctx, shortcut, branch, scale, weight, h, mean, rstd, window):
    ctx.save_for_backward(h, weight, mean, rstd, scale)
    ctx.dtypes = shortcut.dtype, branch.dtype
    ctx.window = window


def _add_grads(ctx, dh, dy, bwd):
    h, weight, mean, rstd, scale = ctx.saved_tensors
    shortcut_dtype, branch_dtype = ctx.dtypes
    # without a scale, a dtype change or a layout change, the branch's gradient IS the shortcut's:
    # one tensor, written once
    separate = scale is not None or branch_dtype != h.dtype or (bool(ctx.window) and not _win_out(ctx.window))
    dshortcut, dw, db, dbranch = bwd(dh, dy, h, weight, mean, rstd, scale, branch_dtype if separate else None,
                                     ctx.window)
    return dshortcut.to(shortcut_dtype), dbranch if separate else dshortcut, None, dw, db, None, None, None


def _add_setup(ctx, inputs, output):
    shortcut, branch, scale, weight, _, _, _, window = inputs
    h, _, mean, rstd = output
    _add_save(ctx, shortcut, branch, scale, weight, h, mean, rstd, window)


_add_fwd_op.register_autograd(lambda ctx, dh, dy, _dmean, _drstd: _add_grads(ctx, dh, dy, _add_bwd_op),
                              setup_context=_add_setup)


class _AddLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shortcut, branch, scale, weight, bias, eps, fp32_output, window):
        y, mean, rstd, h = layer_norm_fwd(branch, weight, bias, eps, fp32_output, residual=shortcut, scale=scale,
                                          window=window)
        _add_save(ctx, shortcut, branch, scale, weight, h, mean, rstd, window)
        return h, y

    @staticmethod
    def backward(ctx, dh, dy):
        return _add_grads(ctx, dh, dy, _add_bwd)


def _add_layer_norm(shortcut, branch, scale, weight, bias, eps, window):
    fp32_output = _fp32_output(branch.device, torch.promote_types(shortcut.dtype, branch.dtype))
    if torch.compiler.is_compiling():
        h, y, _, _ = _add_fwd_op(shortcut, branch, scale, weight, bias, float(eps), fp32_output, window)
        return h, y
    return _AddLayerNorm.apply(shortcut, branch, scale, weight, bias, float(eps), fp32_output, window)


def add_layer_norm(shortcut: torch.Tensor, branch: torch.Tensor, scale: Optional[torch.Tensor],
                   weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5):
    """Fused `h = shortcut + branch * scale; y = LayerNorm(h)` -> (h, y); scale is drop-path's
    per-sample [B, 1, ...] tensor or None. Output dtypes as the unfused ops under autocast."""
    return _add_layer_norm(shortcut, branch, scale, weight, bias, eps, [])


def merge_add_layer_norm(shortcut: torch.Tensor, windows: torch.Tensor, scale: Optional[torch.Tensor],
                         weight: torch.Tensor, bias: torch.Tensor, eps: float, H: int, W: int,
                         shift_size: int):
    """Fused `add_layer_norm(shortcut, window_merge(windows, H, W, shift_size), scale, ...)`:
    the attention output is read straight from window layout [B*nW, ws, ws, C]; shortcut, h and
    y are [B, H*W, C]. Its backward writes the branch's gradient straight into window layout."""
    return _add_layer_norm(shortcut, windows, scale, weight, bias, eps, [H, W, windows.shape[1], shift_size])


def add_layer_norm_partition(shortcut: torch.Tensor, branch: torch.Tensor, scale: Optional[torch.Tensor],
                             weight: torch.Tensor, bias: torch.Tensor, eps: float, H: int, W: int, window_size: int,
                             shift_size: int):
    """Fused `h = shortcut + branch * scale; windows = window_partition(LayerNorm(h), window_size,
    shift_size)` -> (h [B, H*W, C], windows [B*nW, ws, ws, C]): the previous block's MLP residual
    with this block's norm1, roll and partition, one pass each way."""
    return _add_layer_norm(shortcut, branch, scale, weight, bias, eps, [H, W, window_size, shift_size, 1])


# ----------------------------------------------------------------------------- post-norm: LayerNorm, then add
# Swin V2's res-post-norm blocks: h = shortcut + drop_path(LayerNorm(branch)).
@torch.library.custom_op('swin::post_norm_add_fwd', mutates_args=())
def _post_fwd_op(shortcut: torch.Tensor, branch: torch.Tensor, scale: Optional[torch.Tensor], weight: torch.Tensor,
                 bias: torch.Tensor, eps: float, fp32_output: bool, window: list[int]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_fwd(branch, weight, bias, eps, fp32_output, residual=shortcut, scale=scale, window=window,
                          post=True)


@_post_fwd_op.register_fake
def _(shortcut, branch, scale, weight, bias, eps, fp32_output, window):
    M = branch.numel() // branch.shape[-1]
    h_dtype = torch.promote_types(shortcut.dtype, torch.float32 if fp32_output else branch.dtype)
    return (shortcut.new_empty(shortcut.shape, dtype=h_dtype), branch.new_empty((M,), dtype=torch.float32),
            branch.new_empty((M,), dtype=torch.float32))


def _post_bwd(dy, branch, weight, mean, rstd, scale, window):
    return layer_norm_bwd(dy, branch, weight, mean, rstd, scale=scale, window=window, post=True)


@torch.library.custom_op('swin::post_norm_add_bwd', mutates_args=())
def _post_bwd_op(dy: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                 rstd: torch.Tensor, scale: Optional[torch.Tensor], window: list[int]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _post_bwd(dy, branch, weight, mean, rstd, scale, window)


@_post_bwd_op.register_fake
def _(dy, branch, weight, mean, rstd, scale, window):
    return branch.new_empty(branch.shape), torch.empty_like(weight), torch.empty_like(weight)


def _post_save(ctx, shortcut, branch, scale, weight, mean, rstd, fp32_output, window):
    ctx.save_for_backward(branch, weight, mean, rstd, scale)
    ctx.shortcut_dtype = shortcut.dtype
    ctx.y_dtype = torch.float32 if fp32_output else branch.dtype
    ctx.window = window


def _post_grads(ctx, dh, bwd):
    branch, weight, mean, rstd, scale = ctx.saved_tensors
    dbranch, dw, db = bwd(dh.to(ctx.y_dtype), branch, weight, mean, rstd, scale, ctx.window)
    return dh.to(ctx.shortcut_dtype), dbranch, None, dw, db, None, None, None


def _post_setup(ctx, inputs, output):
    shortcut, branch, scale, weight, _, _, fp32_output, window = inputs
    _post_save(ctx, shortcut, branch, scale, weight, output[1], output[2], fp32_output, window)


_post_fwd_op.register_autograd(lambda ctx, dh, _dmean, _drstd: _post_grads(ctx, dh, _post_bwd_op),
                               setup_context=_post_setup)


class _PostNormAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shortcut, branch, scale, weight, bias, eps, fp32_output, window):
        h, mean, rstd = layer_norm_fwd(branch, weight, bias, eps, fp32_output, residual=shortcut, scale=scale,
                                       window=window, post=True)
        _post_save(ctx, shortcut, branch, scale, weight, mean, rstd, fp32_output, window)
        return h

    @staticmethod
    def backward(ctx, dh):
        return _post_grads(ctx, dh, _post_bwd)


def _post_norm_add(shortcut, branch, scale, weight, bias, eps, window):
    fp32_output = _fp32_output(branch.device, branch.dtype)
    if torch.compiler.is_compiling():
        return _post_fwd_op(shortcut, branch, scale, weight, bias, float(eps), fp32_output, window)[0]
    return _PostNormAdd.apply(shortcut, branch, scale, weight, bias, float(eps), fp32_output, window)


def post_norm_add(shortcut: torch.Tensor, branch: torch.Tensor, scale: Optional[torch.Tensor],
                  weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Fused `shortcut + LayerNorm(branch) * scale` (scale: drop-path's per-sample [B, 1, ...] or
    None), rounded as the unfused ops under autocast round; the norm's output is never written."""
    return _post_norm_add(shortcut, branch, scale, weight, bias, eps, [])


def merge_post_norm_add(shortcut: torch.Tensor, windows: torch.Tensor, scale: Optional[torch.Tensor],
                        weight: torch.Tensor, bias: torch.Tensor, eps: float, H: int, W: int,
                        shift_size: int) -> torch.Tensor:
    """Fused `post_norm_add(shortcut, window_merge(windows, H, W, shift_size), ...)`: the attention
    output is read straight from window layout [B*nW, ws, ws, C]; its gradient is written back in it."""
    return _post_norm_add(shortcut, windows, scale, weight, bias, eps, [H, W, windows.shape[1], shift_size])


# V2's MLP residual with the next block's partition: h = shortcut + drop_path(LayerNorm(branch)), also
# written in the next block's window layout; backward, h's two gradients summed in the same pass.
@torch.library.custom_op('swin::post_norm_add_partition_fwd', mutates_args=())
def _post_part_fwd_op(shortcut: torch.Tensor, branch: torch.Tensor, scale: Optional[torch.Tensor],
                      weight: torch.Tensor, bias: torch.Tensor, eps: float, fp32_output: bool, window: list[int]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    h, mean, rstd, windows = layer_norm_fwd(branch, weight, bias, eps, fp32_output, residual=shortcut, scale=scale,
                                            window=window, post=True)
    return h, windows, mean, rstd


@_post_part_fwd_op.register_fake
def _(shortcut, branch, scale, weight, bias, eps, fp32_output, window):
    M = branch.numel() // branch.shape[-1]
    h_dtype = torch.promote_types(shortcut.dtype, torch.float32 if fp32_output else branch.dtype)
    return (shortcut.new_empty(shortcut.shape, dtype=h_dtype),
            shortcut.new_empty(_windows_shape(window, M, branch.shape[-1]), dtype=h_dtype),
            branch.new_empty((M,), dtype=torch.float32), branch.new_empty((M,), dtype=torch.float32))


def _post_part_bwd(dh, dwin, branch, weight, mean, rstd, scale, shortcut_dtype, window):
    """-> (dshortcut, dbranch, dweight, dbias)."""
    dbranch, dw, db, dshortcut = layer_norm_bwd(dh, branch, weight, mean, rstd, dres=dwin, scale=scale,
                                                branch_dtype=shortcut_dtype, window=window, post=True)
    return dshortcut, dbranch, dw, db


@torch.library.custom_op('swin::post_norm_add_partition_bwd', mutates_args=())
def _post_part_bwd_op(dh: torch.Tensor, dwin: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor,
                      mean: torch.Tensor, rstd: torch.Tensor, scale: Optional[torch.Tensor],
                      shortcut_dtype: torch.dtype, window: list[int]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _post_part_bwd(dh, dwin, branch, weight, mean, rstd, scale, shortcut_dtype, window)


@_post_part_bwd_op.register_fake
def _(dh, dwin, branch, weight, mean, rstd, scale, shortcut_dtype, window):
    return (branch.new_empty(branch.shape, dtype=shortcut_dtype), branch.new_empty(branch.shape),
            torch.empty_like(weight), torch.empty_like(weight))


def _post_part_save(ctx, shortcut, branch, scale, weight, mean, rstd, window):
    ctx.save_for_backward(branch, weight, mean, rstd, scale)
    ctx.shortcut_dtype = shortcut.dtype
    ctx.window = window


def _post_part_grads(ctx, dh, dwin, bwd):
    branch, weight, mean, rstd, scale = ctx.saved_tensors
    dshortcut, dbranch, dw, db = bwd(dh, dwin, branch, weight, mean, rstd, scale, ctx.shortcut_dtype, ctx.window)
    return dshortcut, dbranch, None, dw, db, None, None, None


def _post_part_setup(ctx, inputs, output):
    shortcut, branch, scale, weight, _, _, _, window = inputs
    _post_part_save(ctx, shortcut, branch, scale, weight, output[2], output[3], window)


_post_part_fwd_op.register_autograd(
    lambda ctx, dh, dwin, _dmean, _drstd: _post_part_grads(ctx, dh, dwin, _post_part_bwd_op),
    setup_context=_post_part_setup)


class _PostNormAddPartition(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shortcut, branch, scale, weight, bias, eps, fp32_output, window):
        h, mean, rstd, windows = layer_norm_fwd(branch, weight, bias, eps, fp32_output, residual=shortcut,
                                                scale=scale, window=window, post=True)
        _post_part_save(ctx, shortcut, branch, scale, weight, mean, rstd, window)
        return h, windows

    @staticmethod
    def backward(ctx, dh, dwin):
        return _post_part_grads(ctx, dh, dwin, _post_part_bwd)


def post_norm_add_partition(shortcut: torch.Tensor, branch: torch.Tensor, scale: Optional[torch.Tensor],
                            weight: torch.Tensor, bias: torch.Tensor, eps: float, H: int, W: int, window_size: int,
                            shift_size: int):
    """Fused `h = post_norm_add(shortcut, branch, ...); windows = window_partition(h, window_size,
    shift_size)` -> (h [B, H*W, C], windows [B*nW, ws, ws, C]): a V2 block's MLP residual with the next
    block's roll + partition, one pass each way (the partition's pass, and backward its merge and the
    add of h's two gradients, are saved). Where h's dtype is not the norm's (a half branch on an fp32
    residual stream outside CUDA autocast) the two ops run composed."""
    fp32_output = _fp32_output(branch.device, branch.dtype)
    y_dtype = torch.float32 if fp32_output else branch.dtype
    if torch.promote_types(shortcut.dtype, y_dtype) != y_dtype:
        return post_norm_add_partition_ref(shortcut, branch, scale, weight, bias, eps, H, W, window_size, shift_size,
                                           post_norm_add=post_norm_add, window_partition=window_partition)
    window = [H, W, window_size, shift_size, 1]
    if torch.compiler.is_compiling():
        h, windows, _, _ = _post_part_fwd_op(shortcut, branch, scale, weight, bias, float(eps), fp32_output, window)
        return h, windows
    return _PostNormAddPartition.apply(shortcut, branch, scale, weight, bias, float(eps), fp32_output, window)


# ----------------------------------------------------------------------------- references of the window forms
def layer_norm_partition_ref(x, weight, bias, eps, H, W, window_size, shift_size, layer_norm=layer_norm_ref,
                             window_partition=window_partition_ref):
    """norm1 then roll + partition, through whichever implementations are given (upstream's ops
    by default)."""
    y = layer_norm(x, weight, bias, eps)
    return window_partition(y.view(y.shape[0], H, W, y.shape[-1]), window_size, shift_size)


def add_layer_norm_partition_ref(shortcut, branch, scale, weight, bias, eps, H, W, window_size, shift_size,
                                 add_layer_norm=add_layer_norm_ref, window_partition=window_partition_ref):
    """residual add + norm1, then roll + partition, through the given implementations."""
    h, y = add_layer_norm(shortcut, branch, scale, weight, bias, eps)
    return h, window_partition(y.view(y.shape[0], H, W, y.shape[-1]), window_size, shift_size)


def merge_add_layer_norm_ref(shortcut, windows, scale, weight, bias, eps, H, W, shift_size,
                             add_layer_norm=add_layer_norm_ref, window_merge=window_merge_ref):
    """merge + reverse roll, then residual add + norm2, through the given implementations."""
    x = window_merge(windows, H, W, shift_size).view(shortcut.shape)
    return add_layer_norm(shortcut, x, scale, weight, bias, eps)


def post_norm_add_partition_ref(shortcut, branch, scale, weight, bias, eps, H, W, window_size, shift_size,
                                post_norm_add=post_norm_add_ref, window_partition=window_partition_ref):
    """V2's MLP residual, then the next block's roll + partition, through the given implementations."""
    h = post_norm_add(shortcut, branch, scale, weight, bias, eps)
    return h, window_partition(h.view(h.shape[0], H, W, h.shape[-1]), window_size, shift_size)


def merge_post_norm_add_ref(shortcut, windows, scale, weight, bias, eps, H, W, shift_size,
                            post_norm_add=post_norm_add_ref, window_merge=window_merge_ref):
    """merge + reverse roll, then shortcut + LayerNorm(.) * scale, through the given implementations."""
    x = window_merge(windows, H, W, shift_size).view(shortcut.shape)
    return post_norm_add(shortcut, x, scale, weight, bias, eps)


def _apex_layer_norm(x, weight, bias, eps=1e-5):
    """apex's fused LayerNorm with F.layer_norm's autocast behaviour. apex's wrapper would cast to
    the autocast dtype and return that; F.layer_norm is on CUDA autocast's fp32 list (inputs cast
    to fp32, fp32 out). So under autocast the inputs go to apex's op in fp32, with autocast off."""
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine
    if x.device.type == 'cuda' and torch.is_autocast_enabled('cuda'):
        x, weight, bias = x.float(), weight.float(), bias.float()
    with torch.autocast(x.device.type, enabled=False):
        return fused_layer_norm_affine(x, weight, bias, (x.shape[-1],), eps)


IMPLS = {
    'torch': layer_norm_ref,
    'triton': layer_norm if triton_available() else None,
    'apex': _apex_layer_norm if apex_available(APEX_MODULE) else None,
}

ADD_IMPLS = {
    'torch': add_layer_norm_ref,
    'triton': add_layer_norm if triton_available() else None,
    'apex': None,       # apex has no residual-add LayerNorm: ours stands in
}

# The window-layout forms (--fused_layernorm with --fused_window_process): the reference composes
# the two ops; only our kernels fold the shuffle into the norm, so apex has none.
PARTITION_IMPLS = {
    'torch': layer_norm_partition_ref,
    'triton': layer_norm_partition if triton_available() else None,
    'apex': None,
}

ADD_PARTITION_IMPLS = {
    'torch': add_layer_norm_partition_ref,
    'triton': add_layer_norm_partition if triton_available() else None,
    'apex': None,
}

MERGE_ADD_IMPLS = {
    'torch': merge_add_layer_norm_ref,
    'triton': merge_add_layer_norm if triton_available() else None,
    'apex': None,
}

# Swin V2's post-norm residuals (--fused_layernorm; the merge form also with --fused_window_process)
POST_IMPLS = {
    'torch': post_norm_add_ref,
    'triton': post_norm_add if triton_available() else None,
    'apex': None,
}

POST_PARTITION_IMPLS = {
    'torch': post_norm_add_partition_ref,
    'triton': post_norm_add_partition if triton_available() else None,
    'apex': None,
}

MERGE_POST_IMPLS = {
    'torch': merge_post_norm_add_ref,
    'triton': merge_post_norm_add if triton_available() else None,
    'apex': None,
}
