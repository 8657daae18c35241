"""Fused window attention: softmax(q k^T * scale + B + M) v for every (window, head), on-chip.

Shapes (B_ = batch * windows, N = w*w tokens, C = heads * d):
  qkv    [B_, N, 3C]  straight from the qkv projection, split as (3, heads, d); no permute copies
  table  [(2w-1)^2, heads]  relative_position_bias_table; B[h, i, j] = table[index[i, j], h]
  index  [N, N]  relative_position_index (int)
  mask   [nW, N, N] or None  the shifted-window mask (0 / -100); window b uses mask[b % nW]
  out    [B_, N, C]  in the layout the output projection reads.

Forward, per (window b, head h, block of query rows), keys all in one tile (N <= 64):
  S = (q k^T) * scale + B + M;   P = softmax(S) in fp32;   O = P v;   lse = logsumexp(S)
Only O and lse (fp32, [B_, heads, N]) are written; the N x N scores never leave the chip.
B + M is built once per forward, in one launch, as one padded fp32 tile per (window type, head) ([nW, heads,
64, 64] at window 7, 3 MB for Swin-T stage 1, L2-resident) and kept for the backward, so the kernels read one
aligned tile instead of gathering index, table and mask per window.

Backward (recompute S and P from lse):
  dV = P^T dO;   dP = dO V^T;   D_i = sum_j P_ij dP_ij   (fp32 P and dP; = sum_d dO_id O_id, used in fp32)
  dS = P * (dP - D);   dQ = dS K * scale;   dK = dS^T Q * scale;   dB[h] = sum_b dS[b, h]
dQ, dK, dV are written straight into one [B_, N, 3C] tensor, the qkv projection's layout.
dB is deterministic: each program owns a strided group of windows and accumulates dS for them
in registers (or, when the queries span several blocks, in its own slice of a global buffer);
the groups are then summed by torch, and dB is scattered to the table by a kernel that walks each
table row's positions in a fixed order (no float atomics anywhere).

Swin V2's scaled cosine attention (`cosine_window_attention`) runs through the same kernel: its
differences from V1 are two switches of it (NORM_QK, HEAD_SCALE), no second kernel. Per head h with
tau_h = exp(min(logit_scale_h, log 100)):
  S = tau_h * normalize(q) normalize(k)^T + 16 sigmoid(T)[index] + M
so the kernel (NORM_QK) L2-normalises q and k as it loads them (in fp32, then in the input dtype for
the products, as F.normalize), takes the table as 16 sigmoid(T) (one PyTorch op a step) and tau as a
per-head scale in place of the one scalar (HEAD_SCALE). Its backward takes dQ and dK through the
normalisation once they are complete, and returns dL/dtau_h = sum dS * (q k^T), summed from the
fp32 dS. (Folding tau into q instead took tau's gradient from dQ rounded to bf16, a sum that
cancels: 12% off in a bf16 test where upstream's autocast math is 1% off. Normalising in PyTorch
cost passes over q and k in fp32 and a copy of qkv around every call.)

Windows above 64 tokens (window 12: N = 144; Swin V2's 16 and 24) take the keys in blocks of 64: the forward
keeps a running max and sum (online softmax), the backward walks the key blocks per window and
sums dQ in an fp32 scratch it owns; smaller windows load all keys at once, as before.

Limits: N <= 1024 (windows up to 32), head_dim 16..128; fp32/fp16/bf16 with fp32 accumulation
(fp32 inputs use IEEE fp32 products, not TF32: the flag never changes the math); no attention
dropout (rejected at model build). Offsets are int64 and the grid is 1-D (no 65535 limit).
"""
import collections
import concurrent.futures
import functools
from typing import Optional

import torch
import torch.nn.functional as F

from ._utils import cdiv, check_triton_device, next_power_of_2, sm_count, triton_available


# ----------------------------------------------------------------------------- reference
def window_attention_ref(qkv: torch.Tensor, table: torch.Tensor, index: torch.Tensor,
                         mask: Optional[torch.Tensor], num_heads: int, scale: float) -> torch.Tensor:
    """Upstream's math, op for op: [B_, N, 3C] -> [B_, N, C]."""
    B_, N, C3 = qkv.shape
    C = C3 // 3
    qkv = qkv.reshape(B_, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]                                  # B_, heads, N, d
    bias = table[index.view(-1)].view(N, N, -1).permute(2, 0, 1)      # heads, N, N
    attn = (q * scale) @ k.transpose(-2, -1) + bias.unsqueeze(0)      # B_, heads, N, N
    if mask is not None:
        nW = mask.shape[0]
        attn = attn.view(B_ // nW, nW, num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, N, N)
    attn = attn.softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(B_, N, C)               # B_, N, C


def _check(qkv, table, index, mask, num_heads):
    B_, N, C3 = qkv.shape
    if C3 % (3 * num_heads):
        raise ValueError(f'qkv width {C3} is not 3 x heads ({num_heads}) x head_dim')
    d = C3 // 3 // num_heads
    if N > 1024:
        raise ValueError(f'fused window attention supports windows of up to 1024 tokens, got {N}')
    if not 16 <= d <= 128:
        raise ValueError(f'fused window attention supports head_dim 16..128, got {d}')
    if table.shape[1] != num_heads or index.shape != (N, N):
        raise ValueError(f'bias table {tuple(table.shape)} / index {tuple(index.shape)} do not fit '
                         f'{num_heads} heads and {N} tokens')
    if mask is not None and (mask.shape[1:] != (N, N) or B_ % mask.shape[0]):
        raise ValueError(f'mask {tuple(mask.shape)} does not fit {B_} windows of {N} tokens')
    return B_, N, C3 // 3, d


# ----------------------------------------------------------------------------- triton kernels
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _dot(a, b, DOT_MODE: tl.constexpr):
        """a @ b with fp32 accumulation. DOT_MODE 0: half inputs on the tensor cores; 1: fp32
        inputs as IEEE fp32 (no TF32); 2: upcast to fp32 first (Triton's CPU interpreter computes
        bf16 dots wrongly; bf16 -> fp32 is exact, so the math is the same)."""
        if DOT_MODE == 0:
            return tl.dot(a, b)
        elif DOT_MODE == 1:
            return tl.dot(a, b, input_precision='ieee')
        else:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision='ieee')

    @triton.jit
    def _l2_normalize(x, DOT_MODE: tl.constexpr):
        """F.normalize(x, dim=-1) per row: x / max(||x||, 1e-12), in fp32, back in x's dtype.
        DOT_MODE 2 (bf16 in Triton's CPU interpreter) keeps fp32: the interpreter's fp32 -> bf16
        cast is not round-to-nearest-even (biased: 54% of values differ from torch's cast), which
        skews every cosine the same way; its dots upcast to fp32 anyway. Round-to-nearest sqrt and
        reciprocal, once per row (tl.sqrt and / are approximate on the GPU)"""
        xf = x.to(tl.float32)
        y = xf * tl.div_rn(1., tl.maximum(tl.sqrt_rn(tl.sum(xf * xf, axis=1)), 1e-12))[:, None]
        if DOT_MODE == 2:
            return y
        return y.to(x.dtype)

    @triton.jit
    def _l2_normalize_bwd(x, dy):
        """dL/dx of y = x / max(||x||, eps) from dL/dy (fp32): (dy - y (y . dy)) / ||x||; dy / eps
        where ||x|| <= eps (F.normalize's clamp)."""
        xf = x.to(tl.float32)
        n = tl.sqrt_rn(tl.sum(xf * xf, axis=1))
        r = tl.div_rn(1., tl.maximum(n, 1e-12))
        y = xf * r[:, None]
        proj = tl.where(n > 1e-12, tl.sum(y * dy, axis=1), 0.)
        return (dy - y * proj[:, None]) * r[:, None]

    @triton.jit
    def _scores(qkv_ptr, bm_ptr, b, h, rows, cols, d_idx, N, C, n_heads, n_bm, scale,
                HEAD_DIM: tl.constexpr, DOT_MODE: tl.constexpr, ROWS_PAD: tl.constexpr,
                COLS_PAD: tl.constexpr, NORM_QK: tl.constexpr):
        """S = q k^T * scale + (B + M) for one (window, head, query block, key block); -inf on
        padded keys; NORM_QK: q and k L2-normalised first (Swin V2's cosine attention). Returns
        (S, q k^T, q, k) with q, k as they entered the product."""
        row_ok = rows < N
        col_ok = cols < N
        d_ok = d_idx < HEAD_DIM
        base = b * N * 3 * C + h * HEAD_DIM
        q = tl.load(qkv_ptr + base + rows[:, None] * 3 * C + d_idx[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.)
        k = tl.load(qkv_ptr + base + C + cols[:, None] * 3 * C + d_idx[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.)
        if NORM_QK:
            q = _l2_normalize(q, DOT_MODE)
            k = _l2_normalize(k, DOT_MODE)
        qk = _dot(q, tl.trans(k), DOT_MODE)
        s = qk * scale
        # bias + mask of this window's type and head: one padded fp32 tile [ROWS_PAD, COLS_PAD],
        # shared by every image (L2-resident); padding keeps rows 16-byte aligned and loads unmasked
        bm_tile = bm_ptr + ((b % n_bm) * n_heads + h) * (ROWS_PAD * COLS_PAD)
        s += tl.load(bm_tile + rows[:, None] * COLS_PAD + cols[None, :])
        s = tl.where(col_ok[None, :], s, float('-inf'))
        return s, qk, q, k

    @triton.jit
    def _window_attention_fwd_kernel(
        qkv_ptr, bm_ptr, out_ptr, lse_ptr, head_scale_ptr,
        N, C, n_heads, n_bm, scale,
        HEAD_DIM: tl.constexpr, DOT_MODE: tl.constexpr, NUM_M: tl.constexpr, NUM_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_SCALE: tl.constexpr,
        NORM_QK: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        m_blk = pid % NUM_M
        bh = pid // NUM_M
        h = bh % n_heads
        b = bh // n_heads
        if HEAD_SCALE:                                      # Swin V2: tau_h in place of the one scale
            scale = tl.load(head_scale_ptr + h)
        rows = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
        d_idx = tl.arange(0, BLOCK_D)
        v_base = qkv_ptr + b * N * 3 * C + 2 * C + h * HEAD_DIM
        if NUM_K == 1:
            cols = tl.arange(0, BLOCK_N)
            s, _, q, k = _scores(qkv_ptr, bm_ptr, b, h, rows, cols, d_idx, N, C, n_heads, n_bm, scale,
                                 HEAD_DIM, DOT_MODE, NUM_M * BLOCK_M, BLOCK_N, NORM_QK)
            m = tl.max(s, axis=1)
            p = tl.exp(s - m[:, None])
            l = tl.sum(p, axis=1)
            v = tl.load(v_base + cols[:, None] * 3 * C + d_idx[None, :],
                        mask=(cols < N)[:, None] & (d_idx < HEAD_DIM)[None, :], other=0.)
            o = _dot(p.to(v.dtype), v, DOT_MODE) / l[:, None]
        else:
            # keys in NUM_K blocks: a running max m and sum l, the output rescaled as m grows
            m = tl.full((BLOCK_M,), float('-inf'), tl.float32)
            l = tl.zeros((BLOCK_M,), dtype=tl.float32)
            acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            for kb in range(NUM_K):
                cols = kb * BLOCK_N + tl.arange(0, BLOCK_N)
                s, _, q, k = _scores(qkv_ptr, bm_ptr, b, h, rows, cols, d_idx, N, C, n_heads, n_bm, scale,
                                     HEAD_DIM, DOT_MODE, NUM_M * BLOCK_M, NUM_K * BLOCK_N, NORM_QK)
                m_new = tl.maximum(m, tl.max(s, axis=1))
                alpha = tl.exp(m - m_new)
                p = tl.exp(s - m_new[:, None])
                l = l * alpha + tl.sum(p, axis=1)
                v = tl.load(v_base + cols[:, None] * 3 * C + d_idx[None, :],
                            mask=(cols < N)[:, None] & (d_idx < HEAD_DIM)[None, :], other=0.)
                acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_MODE)
                m = m_new
            o = acc / l[:, None]
        row_ok = rows < N
        tl.store(out_ptr + b * N * C + h * HEAD_DIM + rows[:, None] * C + d_idx[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (d_idx < HEAD_DIM)[None, :])
        tl.store(lse_ptr + bh * N + rows, m + tl.log(l), mask=row_ok)

    @triton.jit
    def _window_attention_bwd_kernel(
        qkv_ptr, bm_ptr, out_ptr, lse_ptr, dout_ptr, dqkv_ptr, dbias_ptr, dq_acc_ptr, delta_ptr, head_scale_ptr,
        dscale_ptr, B_, N, C, n_heads, n_bm, scale, n_groups,
        HEAD_DIM: tl.constexpr, DOT_MODE: tl.constexpr, NUM_M: tl.constexpr, NUM_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_SCALE: tl.constexpr,
        NORM_QK: tl.constexpr,
    ):
        # Program (group g, head h) walks windows g, g + n_groups, ... for head h. With NUM_K key
        # blocks it walks them per window, summing dQ in fp32 in dq_acc ([B_, N, C]; its rows of
        # head h belong to this program alone), then writes dQ once.
        pid = tl.program_id(0).to(tl.int64)
        h = pid % n_heads
        g = pid // n_heads
        d_idx = tl.arange(0, BLOCK_D)
        d_ok = d_idx < HEAD_DIM
        dbias_base = dbias_ptr + (g * n_heads + h) * N * N
        dbias_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)     # used when NUM_M == 1
        # HEAD_SCALE: S = tau_h q k^T + ..., so dL/dtau_h = sum dS * (q k^T), summed here in fp32 from
        # the fp32 dS (as upstream's autograd does), not from a rounded dQ
        dscale_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if HEAD_SCALE:
            scale = tl.load(head_scale_ptr + h)
        for b in range(g, B_, n_groups):
            base = b * N * 3 * C + h * HEAD_DIM
            if NUM_K > 1 and DOT_MODE != 1 and HEAD_SCALE:
                # D_i = sum_j P_ij dP_ij over every key block first (a pass of two dots), into delta
                # (its rows of (b, h) belong to this program alone)
                for m_blk in range(NUM_M):
                    rows = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
                    row_ok = rows < N
                    lse = tl.load(lse_ptr + (b * n_heads + h) * N + rows, mask=row_ok, other=0.)
                    do = tl.load(dout_ptr + b * N * C + h * HEAD_DIM + rows[:, None] * C + d_idx[None, :],
                                 mask=row_ok[:, None] & d_ok[None, :], other=0.)
                    delta = tl.zeros((BLOCK_M,), dtype=tl.float32)
                    for kb in range(NUM_K):
                        cols = kb * BLOCK_N + tl.arange(0, BLOCK_N)
                        s, _, q, k = _scores(qkv_ptr, bm_ptr, b, h, rows, cols, d_idx, N, C, n_heads, n_bm, scale,
                                             HEAD_DIM, DOT_MODE, NUM_M * BLOCK_M, NUM_K * BLOCK_N, NORM_QK)
                        v = tl.load(qkv_ptr + base + 2 * C + cols[:, None] * 3 * C + d_idx[None, :],
                                    mask=(cols < N)[:, None] & d_ok[None, :], other=0.)
                        delta += tl.sum(tl.exp(s - lse[:, None]) * _dot(do, tl.trans(v), DOT_MODE), axis=1)
                    tl.store(delta_ptr + (b * n_heads + h) * N + rows, delta, mask=row_ok)
                tl.debug_barrier()
            for kb in range(NUM_K):
                cols = kb * BLOCK_N + tl.arange(0, BLOCK_N)
                col_ok = cols < N
                kv_mask = col_ok[:, None] & d_ok[None, :]
                v = tl.load(qkv_ptr + base + 2 * C + cols[:, None] * 3 * C + d_idx[None, :], mask=kv_mask, other=0.)
                dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
                dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
                # a loop, not unrolled: at window 12 (3 query blocks, head dim 64) the unrolled backward took
                # minutes to compile in fp32 (ieee dots) and 30 s in bf16; as a loop 34 s and 6.5 s (sm_90
                # target, compiled on a 2-core CPU box). Window 7 has one query block either way.
                for m_blk in range(NUM_M):
                    rows = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
                    row_ok = rows < N
                    rd_mask = row_ok[:, None] & d_ok[None, :]
                    s, qk, q, k = _scores(qkv_ptr, bm_ptr, b, h, rows, cols, d_idx, N, C, n_heads, n_bm, scale,
                                          HEAD_DIM, DOT_MODE, NUM_M * BLOCK_M, NUM_K * BLOCK_N, NORM_QK)
                    lse = tl.load(lse_ptr + (b * n_heads + h) * N + rows, mask=row_ok, other=0.)
                    p = tl.exp(s - lse[:, None])
                    p = tl.where(row_ok[:, None], p, 0.)                     # padded rows add nothing
                    o_off = b * N * C + h * HEAD_DIM + rows[:, None] * C + d_idx[None, :]
                    do = tl.load(dout_ptr + o_off, mask=rd_mask, other=0.)
                    dv += _dot(tl.trans(p.to(do.dtype)), do, DOT_MODE)
                    dp = _dot(do, tl.trans(v), DOT_MODE)
                    # D_i: half-precision inputs take sum_j P_ij dP_ij from the fp32 P and dP, as the
                    # softmax's own backward (sum_j dS_ij = 0); rowsum(dO * O) with O rounded to half is
                    # not, and its error does not cancel in V2's logit-scale gradient (bf16 window 24:
                    # 7% off vs 2.5%; fp16 2.6% vs 0.05%). With the keys in blocks that costs a pre-pass
                    # (above), taken for V2 (HEAD_SCALE) only: V1 has no such sum. fp32 inputs take
                    # rowsum(dO * O): O is exact there, and the P recomputed from lse is the less
                    # accurate side (2.5x less error).
                    if NUM_K == 1 and DOT_MODE != 1:
                        delta = tl.sum(p * dp, axis=1)
                    elif NUM_K > 1 and DOT_MODE != 1 and HEAD_SCALE:
                        delta = tl.load(delta_ptr + (b * n_heads + h) * N + rows, mask=row_ok, other=0.)
                    else:
                        o = tl.load(out_ptr + o_off, mask=rd_mask, other=0.)
                        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
                    ds = p * (dp - delta[:, None])                          # dL/dS, fp32
                    if HEAD_SCALE:
                        dscale_acc += tl.sum(ds * qk, axis=1)         # padded rows / keys: ds = 0
                    dq = _dot(ds.to(k.dtype), k, DOT_MODE) * scale
                    dk += _dot(tl.trans(ds.to(q.dtype)), q, DOT_MODE) * scale
                    if NUM_K == 1:
                        if NORM_QK:       # dQ is complete here: through the normalisation to raw q
                            dq = _l2_normalize_bwd(tl.load(qkv_ptr + base + rows[:, None] * 3 * C + d_idx[None, :],
                                                           mask=rd_mask, other=0.), dq)
                        tl.store(dqkv_ptr + base + rows[:, None] * 3 * C + d_idx[None, :],
                                 dq.to(dqkv_ptr.dtype.element_ty), mask=rd_mask)
                    else:
                        acc_ptrs = dq_acc_ptr + o_off
                        if kb > 0:
                            dq += tl.load(acc_ptrs, mask=rd_mask, other=0.)
                        tl.store(acc_ptrs, dq, mask=rd_mask)
                        tl.debug_barrier()
                    if NUM_M == 1:
                        dbias_acc += ds
                    else:
                        # This program alone owns its slice of the buffer: read-add-write, no atomics.
                        rc = rows[:, None] * N + cols[None, :]
                        tile_ok = row_ok[:, None] & col_ok[None, :]
                        cur = tl.load(dbias_base + rc, mask=tile_ok, other=0.)
                        tl.store(dbias_base + rc, cur + ds, mask=tile_ok)
                        tl.debug_barrier()
                if NORM_QK:               # dK of this key block is complete: to raw k
                    dk = _l2_normalize_bwd(tl.load(qkv_ptr + base + C + cols[:, None] * 3 * C + d_idx[None, :],
                                                   mask=kv_mask, other=0.), dk)
                tl.store(dqkv_ptr + base + C + cols[:, None] * 3 * C + d_idx[None, :],
                         dk.to(dqkv_ptr.dtype.element_ty), mask=kv_mask)
                tl.store(dqkv_ptr + base + 2 * C + cols[:, None] * 3 * C + d_idx[None, :],
                         dv.to(dqkv_ptr.dtype.element_ty), mask=kv_mask)
            if NUM_K > 1:
                for m_blk in range(NUM_M):
                    rows = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
                    rd_mask = (rows < N)[:, None] & d_ok[None, :]
                    dq = tl.load(dq_acc_ptr + b * N * C + h * HEAD_DIM + rows[:, None] * C + d_idx[None, :],
                                 mask=rd_mask, other=0.)
                    if NORM_QK:
                        dq = _l2_normalize_bwd(tl.load(qkv_ptr + base + rows[:, None] * 3 * C + d_idx[None, :],
                                                       mask=rd_mask, other=0.), dq)
                    tl.store(dqkv_ptr + base + rows[:, None] * 3 * C + d_idx[None, :],
                             dq.to(dqkv_ptr.dtype.element_ty), mask=rd_mask)
        if HEAD_SCALE:
            tl.store(dscale_ptr + pid, tl.sum(dscale_acc))
        if NUM_M == 1:
            rows = tl.arange(0, BLOCK_M)
            cols = tl.arange(0, BLOCK_N)
            tl.store(dbias_base + rows[:, None] * N + cols[None, :], dbias_acc,
                     mask=(rows < N)[:, None] & (cols < N)[None, :])

    @triton.jit
    def _table_grad_kernel(dbias_ptr, order_ptr, starts_ptr, dtable_ptr, NN, heads,
                           BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr):
        """dtable[r, h] = the sum of dbias[h, p] over the positions p whose index is r. dbias
        [heads, NN] fp32; row r's positions are order[starts[r]:starts[r + 1]]. Program r."""
        r = tl.program_id(0)
        lo = tl.load(starts_ptr + r)
        hi = tl.load(starts_ptr + r + 1)
        hs = tl.arange(0, BLOCK_H)
        h_ok = hs < heads
        acc = tl.zeros((BLOCK_P, BLOCK_H), dtype=tl.float32)
        for k0 in range(lo, hi, BLOCK_P):
            k = k0 + tl.arange(0, BLOCK_P)
            k_ok = k < hi
            pos = tl.load(order_ptr + k, mask=k_ok, other=0).to(tl.int64)
            acc += tl.load(dbias_ptr + hs[None, :].to(tl.int64) * NN + pos[:, None],
                           mask=k_ok[:, None] & h_ok[None, :], other=0.)
        tl.store(dtable_ptr + r * heads + hs, tl.sum(acc, axis=0), mask=h_ok)


    @triton.jit
    def _bias_mask_kernel(table_ptr, index_ptr, mask_ptr, out_ptr, N, heads, HAS_MASK: tl.constexpr,
                          ROWS_PAD: tl.constexpr, COLS_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_C: tl.constexpr):
        """out[t, h, i, j] = table[index[i, j], h] (+ mask[t, i, j]) in fp32 for i, j < N, zero in the
        padding: program (window type t and head h, block of BLOCK_R rows)."""
        th = tl.program_id(0)
        t = th // heads
        h = th % heads
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        out_base = out_ptr + th.to(tl.int64) * ROWS_PAD * COLS_PAD
        for c0 in tl.static_range(0, COLS_PAD, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            ok = (rows < N)[:, None] & (cols < N)[None, :]
            pos = rows[:, None] * N + cols[None, :]
            idx = tl.load(index_ptr + pos, mask=ok, other=0).to(tl.int64)
            v = tl.load(table_ptr + idx * heads + h, mask=ok, other=0.).to(tl.float32)
            if HAS_MASK:
                v += tl.load(mask_ptr + t.to(tl.int64) * N * N + pos, mask=ok, other=0.).to(tl.float32)
            tl.store(out_base + rows[:, None] * COLS_PAD + cols[None, :], v, mask=(rows < ROWS_PAD)[:, None])

def _group_by_row(index: torch.Tensor, table_rows: int) -> tuple:
    flat = index.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    starts = torch.searchsorted(flat[order], torch.arange(table_rows + 1, device=index.device))
    return order.to(torch.int32), starts.to(torch.int32)


def _group_off_pool(index: torch.Tensor, table_rows: int) -> tuple:
    """_group_by_row on a helper thread, ordered with the caller's stream by events. torch.compile's
    CUDA graph trees route every allocation of the calling thread into their graph's memory pool during
    their warm-up runs, and refuse to record a graph while a tensor they did not hand out lives in
    that pool: a cached tensor must come from another thread."""
    caller = torch.cuda.current_stream(index.device)
    ready = caller.record_event()

    def build():
        with torch.cuda.device(index.device):
            stream = torch.cuda.current_stream()
            stream.wait_event(ready)
            return _group_by_row(index, table_rows), stream.record_event()

    grouped, done = _helper().submit(build).result()
    caller.wait_event(done)
    for t in grouped:          # freed (evicted) only once the caller's stream is done with them
        t.record_stream(caller)
    return grouped


@functools.lru_cache(maxsize=1)
def _helper() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix='window-attention-cache')


def _positions_by_row(index: torch.Tensor, table_rows: int) -> tuple:
    """-> (order, starts): the flat positions of `index` sorted by their table row (stable: ascending
    position within a row) and where each row's run starts ([table_rows + 1], int32), for the table
    gradient's scatter. Built once per index buffer (a few kernels, no host sync) and cached: an
    entry holds the index itself, so its address cannot be reused while cached, and its version
    counter, so an in-place change (a checkpoint loaded into the buffer) rebuilds it."""
    key = (index.data_ptr(), tuple(index.shape), index.dtype, index.device, table_rows)
    hit = _POSITIONS.get(key)
    if hit is not None and hit[1] == index._version:
        _POSITIONS.move_to_end(key)
        return hit[2], hit[3]
    if not index.is_cuda:
        grouped = _group_by_row(index, table_rows)
    elif torch.cuda.is_current_stream_capturing():
        # built inside the graph being captured, not cached: the warm-up steps before a capture fill
        # the cache, and another thread may not allocate while a capture is under way
        return _group_by_row(index, table_rows)
    else:
        grouped = _group_off_pool(index, table_rows)
    _POSITIONS[key] = (index, index._version, *grouped)
    while len(_POSITIONS) > 64:
        _POSITIONS.popitem(last=False)
    return grouped


_POSITIONS = collections.OrderedDict()


def _bias_mask_ref(table: torch.Tensor, index: torch.Tensor, mask: Optional[torch.Tensor],
                   rows_pad: int, cols_pad: int) -> torch.Tensor:
    """`_bias_mask` in torch's ops (a gather, a cast, an add, a zero fill and a copy)."""
    N = index.shape[0]
    bias = table.float()[index.reshape(-1)].view(N, N, -1).permute(2, 0, 1)   # heads, N, N
    bm = bias.unsqueeze(0) if mask is None else bias.unsqueeze(0) + mask.float().unsqueeze(1)
    out = bm.new_zeros((bm.shape[0], bm.shape[1], rows_pad, cols_pad))
    out[:, :, :N, :N] = bm
    return out


def _bias_mask(table: torch.Tensor, index: torch.Tensor, mask: Optional[torch.Tensor],
               rows_pad: int, cols_pad: int) -> torch.Tensor:
    """[nW or 1, heads, rows_pad, cols_pad] fp32: the gathered bias plus each window type's mask,
    zero-padded, built once per call (Swin-T stage 1: 3 MB) so that the attention kernels read one
    aligned, L2-resident tile instead of gathering index, table and mask themselves. One launch
    (`_bias_mask_ref`'s five ops, in eager steps five launches a block); the same fp32 sums."""
    N, heads = index.shape[0], table.shape[1]
    n_bm = mask.shape[0] if mask is not None else 1
    out = torch.empty((n_bm, heads, rows_pad, cols_pad), dtype=torch.float32, device=table.device)
    if out.numel():
        block_r, block_c = 16, min(cols_pad, 64)
        assert cols_pad % block_c == 0, cols_pad         # _blocks pads to 16, 32, 64 or a multiple of 64
        _bias_mask_kernel[(n_bm * heads, cdiv(rows_pad, block_r))](
            table.contiguous(), index.contiguous(), mask.contiguous() if mask is not None else table, out, N, heads,
            HAS_MASK=mask is not None, ROWS_PAD=rows_pad, COLS_PAD=cols_pad, BLOCK_R=block_r,
            BLOCK_C=block_c, num_warps=4)
    return out


def _dot_mode(qkv: torch.Tensor) -> int:
    if qkv.dtype == torch.float32:
        return 1
    return 2 if qkv.device.type == 'cpu' else 0


# Backward programs per SM (each sums its windows' dS in a fixed order, so this also fixes the
# summation grouping: a constant, not a knob). The H100 winner of benchmarks/bench_kernels.py.
BWD_PROGRAMS_PER_SM = 8


# Windows above this many tokens take the keys in blocks of 64; up to it, one tile of all keys. Measured
# (benchmarks/tune_window_attention.py, H200, 2026-11-28, bf16, batch 128, forward + backward): window
# 12 stage 1 9.14 ms as one 256-key tile vs 2.52 ms in blocks of 64 (V2: 11.9 vs 3.04), window 16
# 14.0 vs 5.6 (V2 17.5 vs 6.7). Windows 7 and 8 (49, 64 tokens) are one block of 64 either way.
KEY_TILE_ABOVE = 64


def _blocks(N: int, d: int, launch: Optional[dict] = None):
    """-> (block_m, block_n, block_d, num_m, num_k, num_warps): query blocks of block_m rows; the
    keys in one block of block_n (N <= KEY_TILE_ABOVE) or in num_k blocks of 64 (larger windows).
    launch: benchmarks/tune_window_attention.py passes key_tile_above (the forward and backward of
    one call must get the same)."""
    tile_above = (launch or {}).get('key_tile_above', KEY_TILE_ABOVE)
    num_k, block_n = (1, max(16, next_power_of_2(N))) if N <= tile_above else ((N + 63) // 64, 64)
    block_d = max(16, next_power_of_2(d))
    # head dim 128: 64-row query blocks overflow sm_90's 227 KB of shared memory in the backward (Triton
    # 3.6 on an H200: 254 KB in bf16; fp32 more); with 32-row blocks fp32 runs there. Swin's head dim is 32.
    block_m = min(block_n * num_k, 32 if block_d >= 128 else 64)
    num_m = (N + block_m - 1) // block_m
    num_warps = 4 if block_n <= 64 else 8
    return block_m, block_n, block_d, num_m, num_k, num_warps


# dS partial sums of the tiled path (windows above 64 tokens) are [groups, heads, N, N] fp32: at
# window 24 that is 5.3 MB a (group, head), so the groups are capped to keep the buffer near this
DBIAS_BUDGET_BYTES = 256 << 20


def _n_groups(B_: int, heads: int, device: torch.device, N: int, num_k: int) -> int:
    """Window groups of the backward (one program per group and head): enough programs to fill the
    GPU several times over; fewer for the tiled path, whose per-group dS buffers are large."""
    groups = (BWD_PROGRAMS_PER_SM * sm_count(device) + heads - 1) // heads
    if num_k > 1:
        groups = min(groups, DBIAS_BUDGET_BYTES // (heads * N * N * 4))
    return max(1, min(B_, groups))


# ----------------------------------------------------------------------------- launchers
def _head_scale(head_scale: Optional[torch.Tensor], num_heads: int) -> Optional[torch.Tensor]:
    if head_scale is None:
        return None
    if head_scale.numel() != num_heads:
        raise ValueError(f'head_scale has {head_scale.numel()} values for {num_heads} heads')
    return head_scale.detach().reshape(num_heads).float().contiguous()


def window_attention_fwd(qkv: torch.Tensor, table: torch.Tensor, index: torch.Tensor,
                         mask: Optional[torch.Tensor], num_heads: int, scale: float,
                         head_scale: Optional[torch.Tensor] = None, norm_qk: bool = False,
                         launch: Optional[dict] = None):
    """-> (out [B_, N, C], lse [B_, heads, N] fp32, bm: the padded bias+mask tiles, kept for the
    backward so it is built once a step). head_scale ([heads], Swin V2's tau) replaces `scale`;
    norm_qk: q and k are L2-normalised in the kernel (Swin V2's cosine attention)."""
    check_triton_device(qkv)
    B_, N, C, d = _check(qkv, table, index, mask, num_heads)
    hs = _head_scale(head_scale, num_heads)
    qkv = qkv.contiguous()
    out = torch.empty((B_, N, C), dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty((B_, num_heads, N), dtype=torch.float32, device=qkv.device)
    block_m, block_n, block_d, num_m, num_k, num_warps = _blocks(N, d, launch)
    bm = _bias_mask(table, index, mask, num_m * block_m, num_k * block_n)
    grid = (B_ * num_heads * num_m,)
    if B_:
        _window_attention_fwd_kernel[grid](
            qkv, bm, out, lse, hs if hs is not None else lse, N, C, num_heads, bm.shape[0], float(scale),
            HEAD_DIM=d, DOT_MODE=_dot_mode(qkv), NUM_M=num_m, NUM_K=num_k,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, HEAD_SCALE=hs is not None, NORM_QK=norm_qk,
            num_warps=num_warps)
    return out, lse, bm


def window_attention_bwd(dout: torch.Tensor, qkv: torch.Tensor, bm: torch.Tensor, index: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor, num_heads: int, scale: float,
                         table_rows: int, head_scale: Optional[torch.Tensor] = None,
                         norm_qk: bool = False, launch: Optional[dict] = None):
    """-> (dqkv [B_, N, 3C] in qkv's dtype, dtable [table_rows, heads] fp32, dhead_scale: [heads] fp32
    with head_scale, else empty). `bm` is the forward's."""
    check_triton_device(qkv)
    hs = _head_scale(head_scale, num_heads)
    B_, N, C3 = qkv.shape
    d = C3 // 3 // num_heads
    qkv, dout = qkv.contiguous(), dout.contiguous()
    block_m, block_n, block_d, num_m, num_k, num_warps = _blocks(N, d, launch)
    n_groups = _n_groups(B_, num_heads, qkv.device, N, num_k)
    dqkv = torch.empty_like(qkv)
    dq_acc = torch.empty((B_, N, C3 // 3), dtype=torch.float32, device=qkv.device) if num_k > 1 else dqkv
    delta = (torch.empty((B_, num_heads, N), dtype=torch.float32, device=qkv.device)
             if num_k > 1 and qkv.dtype != torch.float32 and hs is not None else lse)
    # Per-group partial sums of dS (zeroed: the multi-block path reads before it writes; and with no
    # windows no program runs, so the table's gradient must come out zero).
    alloc = torch.zeros if num_m > 1 or B_ == 0 else torch.empty
    dbias_partial = alloc((n_groups, num_heads, N, N), dtype=torch.float32, device=qkv.device)
    dscale_partial = torch.zeros((n_groups if hs is not None else 0, num_heads), dtype=torch.float32,
                                 device=qkv.device)
    if B_:
        _window_attention_bwd_kernel[(n_groups * num_heads,)](
            qkv, bm, out, lse, dout, dqkv, dbias_partial, dq_acc, delta, hs if hs is not None else lse, dscale_partial,
            B_, N, C3 // 3, num_heads, bm.shape[0], float(scale), n_groups,
            HEAD_DIM=d, DOT_MODE=_dot_mode(qkv), NUM_M=num_m, NUM_K=num_k,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, HEAD_SCALE=hs is not None, NORM_QK=norm_qk,
            num_warps=num_warps)
    dbias = dbias_partial.sum(0)                                      # heads, N, N (fixed order)
    dscale = dscale_partial.sum(0) if hs is not None else dscale_partial.new_zeros(0)
    # Scatter to the table rows through the index, each row summing its positions in a fixed order
    # (deterministic, exact fp32). A one-hot matmul did this before: [N*N, rows] floats written and
    # read every call (window 24: 2.9 GB), several launches, and TF32 where a user allows it.
    order, starts = _positions_by_row(index, table_rows)
    dtable = torch.empty((table_rows, num_heads), dtype=torch.float32, device=qkv.device)
    _table_grad_kernel[(table_rows,)](dbias, order, starts, dtable, N * N, num_heads,
                                      BLOCK_P=64, BLOCK_H=max(2, next_power_of_2(num_heads)))
    return dqkv, dtable, dscale


# ----------------------------------------------------------------------------- custom ops + autograd
@torch.library.custom_op('swin::window_attention_fwd', mutates_args=())
def _fwd_op(qkv: torch.Tensor, table: torch.Tensor, index: torch.Tensor, mask: Optional[torch.Tensor],
            num_heads: int, scale: float, head_scale: Optional[torch.Tensor] = None, norm_qk: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return window_attention_fwd(qkv, table, index, mask, num_heads, scale, head_scale, norm_qk)


@_fwd_op.register_fake
def _(qkv, table, index, mask, num_heads, scale, head_scale=None, norm_qk=False):
    B_, N, C3 = qkv.shape
    block_m, block_n, _, num_m, num_k, _ = _blocks(N, C3 // 3 // num_heads)
    n_bm = mask.shape[0] if mask is not None else 1
    return (qkv.new_empty((B_, N, C3 // 3)), qkv.new_empty((B_, num_heads, N), dtype=torch.float32),
            qkv.new_empty((n_bm, num_heads, num_m * block_m, num_k * block_n), dtype=torch.float32))


@torch.library.custom_op('swin::window_attention_bwd', mutates_args=())
def _bwd_op(dout: torch.Tensor, qkv: torch.Tensor, bm: torch.Tensor, index: torch.Tensor,
            out: torch.Tensor, lse: torch.Tensor, num_heads: int, scale: float,
            table_rows: int, head_scale: Optional[torch.Tensor] = None, norm_qk: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return window_attention_bwd(dout, qkv, bm, index, out, lse, num_heads, scale, table_rows, head_scale, norm_qk)


@_bwd_op.register_fake
def _(dout, qkv, bm, index, out, lse, num_heads, scale, table_rows, head_scale=None, norm_qk=False):
    return (qkv.new_empty(qkv.shape), qkv.new_empty((table_rows, num_heads), dtype=torch.float32),
            qkv.new_empty((num_heads if head_scale is not None else 0,), dtype=torch.float32))


# Compiled code calls the custom ops; eager code calls _WindowAttention (custom-op dispatch costs
# more than these launches in an eager step). Both save the same tensors and run the same `_grads`.
def _save(ctx, qkv, table, index, num_heads, scale, head_scale, norm_qk, out, lse, bm):
    ctx.save_for_backward(qkv, bm, index, out, lse, head_scale)
    ctx.num_heads, ctx.scale, ctx.table_rows, ctx.table_dtype = num_heads, scale, table.shape[0], table.dtype
    ctx.norm_qk = norm_qk


def _grads(ctx, dout, bwd):
    qkv, bm, index, out, lse, head_scale = ctx.saved_tensors
    dqkv, dtable, dscale = bwd(dout, qkv, bm, index, out, lse, ctx.num_heads, ctx.scale, ctx.table_rows, head_scale,
                               ctx.norm_qk)
    dhead = None if head_scale is None else dscale.view(head_scale.shape).to(head_scale.dtype)
    return dqkv, dtable.to(ctx.table_dtype), None, None, None, None, dhead, None


def _setup(ctx, inputs, output):
    qkv, table, index, _, num_heads, scale, head_scale, norm_qk = inputs
    _save(ctx, qkv, table, index, num_heads, scale, head_scale, norm_qk, *output)


_fwd_op.register_autograd(lambda ctx, dout, _dlse, _dbm: _grads(ctx, dout, _bwd_op), setup_context=_setup)


class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, table, index, mask, num_heads, scale, head_scale, norm_qk):
        out, lse, bm = window_attention_fwd(qkv, table, index, mask, num_heads, scale, head_scale, norm_qk)
        _save(ctx, qkv, table, index, num_heads, scale, head_scale, norm_qk, out, lse, bm)
        return out

    @staticmethod
    def backward(ctx, dout):
        return _grads(ctx, dout, window_attention_bwd)


def window_attention(qkv: torch.Tensor, table: torch.Tensor, index: torch.Tensor,
                     mask: Optional[torch.Tensor], num_heads: int, scale: float,
                     head_scale: Optional[torch.Tensor] = None, norm_qk: bool = False) -> torch.Tensor:
    """Fused, differentiable window attention (see the module docstring): [B_, N, 3C] -> [B_, N, C].
    head_scale: a differentiable scale per head ([heads]) in place of `scale` (Swin V2's tau);
    norm_qk: q and k L2-normalised inside the kernel (Swin V2's cosine attention)."""
    if torch.compiler.is_compiling():
        return _fwd_op(qkv, table, index, mask, num_heads, float(scale), head_scale, bool(norm_qk))[0]
    return _WindowAttention.apply(qkv, table, index, mask, num_heads, float(scale), head_scale, bool(norm_qk))


# ----------------------------------------------------------------------------- Swin V2
LOGIT_SCALE_MAX = 4.605170185988092     # log(100): exp(logit_scale) is clamped at 100


def cosine_scores_ref(qkv: torch.Tensor, logit_scale: torch.Tensor, table: torch.Tensor, index: torch.Tensor,
                      mask: Optional[torch.Tensor], num_heads: int) -> tuple:
    """Swin V2's attention scores, upstream's math op for op: (cos [B_, heads, N, N], the scores before
    the softmax, v [B_, heads, N, d])."""
    B_, N, C3 = qkv.shape
    q, k, v = qkv.reshape(B_, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    cos = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    attn = cos * torch.clamp(logit_scale, max=LOGIT_SCALE_MAX).exp()
    attn = attn + 16 * torch.sigmoid(table[index.view(-1)].view(N, N, -1).permute(2, 0, 1)).unsqueeze(0)
    if mask is not None:
        nW = mask.shape[0]
        attn = (attn.view(B_ // nW, nW, num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)).view(-1, num_heads, N, N)
    return cos, attn, v


def cosine_window_attention_ref(qkv: torch.Tensor, logit_scale: torch.Tensor, table: torch.Tensor,
                                index: torch.Tensor, mask: Optional[torch.Tensor], num_heads: int) -> torch.Tensor:
    """Swin V2's attention, upstream's math op for op; table is the cpb MLP's raw output
    [(2w-1)^2, heads], logit_scale [heads, 1, 1]: [B_, N, 3C] -> [B_, N, C]."""
    B_, N, C3 = qkv.shape
    _, attn, v = cosine_scores_ref(qkv, logit_scale, table, index, mask, num_heads)
    return (attn.softmax(-1) @ v).transpose(1, 2).reshape(B_, N, C3 // 3)


def cosine_window_attention(qkv: torch.Tensor, logit_scale: torch.Tensor, table: torch.Tensor,
                            index: torch.Tensor, mask: Optional[torch.Tensor], num_heads: int,
                            attention=None) -> torch.Tensor:
    """Swin V2's attention through a V1 attention implementation (`attention`: the fused kernel by
    default, or window_attention_ref). The fused kernel takes qkv as it is, normalises q and k itself
    and takes the per-head scale tau as an input whose gradient it sums from the fp32 dS (see the
    module docstring); any other implementation gets normalised q and k with tau folded into q.
    The table becomes 16 sigmoid(.) once per call."""
    B_, N, C3 = qkv.shape
    tau = torch.clamp(logit_scale, max=LOGIT_SCALE_MAX).exp().view(num_heads)
    if attention is None or attention is window_attention:
        return window_attention(qkv, 16 * torch.sigmoid(table), index, mask, num_heads, 1.0, head_scale=tau,
                                norm_qk=True)
    q, k, v = qkv.view(B_, N, 3, num_heads, C3 // 3 // num_heads).unbind(2)        # B_, N, heads, d
    q = (F.normalize(q.float(), dim=-1) * tau.view(num_heads, 1)).to(qkv.dtype)
    k = F.normalize(k.float(), dim=-1).to(qkv.dtype)
    qkv = torch.stack((q, k, v), dim=2).view(B_, N, C3)
    return attention(qkv, 16 * torch.sigmoid(table), index, mask, num_heads, 1.0)


# apex has no matching op: 'apex' uses ours.
IMPLS = {
    'torch': window_attention_ref,
    'triton': window_attention if triton_available() else None,
}
IMPLS['apex'] = IMPLS['triton']
