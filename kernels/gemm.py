"""The GEMM that --fused_mlp and --fused_dense build on: out = A @ B with the neighbours folded in.

  out[m, n] = epilogue( sum_k prologue(A[m, k]) * prologue(B[k, n]) )
  prologue: exact GELU on A or on B (the tile is loaded, GELU'd in fp32, rounded back to the
            input dtype -- exactly what storing GELU's output would round to -- then multiplied)
  epilogue: + bias[n]  |  * GELU'(aux[m, n])  (the backward of GELU, aux = its saved input)
  row sums: sum_k A[m, k] alongside (the bias gradient of a weight-gradient GEMM, whose A is
            the output gradient transposed: it is read once for both)
A and B are given by strides, so a transposed operand costs nothing. fp32 accumulation; fp32
operands use IEEE products unless the caller passes tf32=True. Split-K: a long reduction
(the token dimension of a weight gradient) is cut into `split` slices, each program writes its
own fp32 partial, and torch sums them: deterministic, no atomics.

GELU: gelu(z) = z/2 (1 + erf(z/sqrt 2));  gelu'(z) = (1 + erf(z/sqrt 2))/2 + z exp(-z^2/2)/sqrt(2 pi).
"""
from typing import Optional

import torch

from ._utils import cdiv, check_triton_device, next_power_of_2, sm_count, triton_available, triton_interpret


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _gelu(z):
        return 0.5 * z * (1. + tl.erf(z * 0.7071067811865476))

    @triton.jit
    def _gelu_grad(z):
        return 0.5 * (1. + tl.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327

    @triton.jit
    def _gemm_kernel(a_ptr, b_ptr, out_ptr, bias_ptr, aux_ptr, rowsum_ptr,
                     M, N, K, k_per_split,
                     stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on, stride_split,
                     GELU_A: tl.constexpr, GELU_B: tl.constexpr, EPILOGUE: tl.constexpr, ROWSUM: tl.constexpr,
                     IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr):
        """EPILOGUE: 0 none, 1 + bias[n], 2 * gelu'(aux[m, n]). Program (tile, split): tiles in
        groups of GROUP_M rows for L2 reuse; split s reduces k in [s*k_per_split, (s+1)*k_per_split)
        and writes out + s*stride_split (and rowsum + s*M)."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        n_tiles_m = tl.cdiv(M, BLOCK_M)
        n_tiles_n = tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * n_tiles_n)
        first_m = group * GROUP_M
        rows_in_group = tl.minimum(n_tiles_m - first_m, GROUP_M)
        tile_m = first_m + (pid % (GROUP_M * n_tiles_n)) % rows_in_group
        tile_n = (pid % (GROUP_M * n_tiles_n)) // rows_in_group
        offs_m = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        k_start = split.to(tl.int64) * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        row_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < k_end
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.)
            b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.)
            if GELU_A:
                a = _gelu(a.to(tl.float32)).to(a_ptr.dtype.element_ty)
            if GELU_B:
                b = _gelu(b.to(tl.float32)).to(b_ptr.dtype.element_ty)
            if ROWSUM:
                row_acc += tl.sum(a.to(tl.float32), axis=1)
            if IEEE:    # fp32 without TF32; also bf16 under the interpreter, whose bf16 dot is wrong
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision='ieee')
            else:
                acc = tl.dot(a, b, acc)
        if EPILOGUE == 1:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.).to(tl.float32)[None, :]
        if EPILOGUE == 2:
            z = tl.load(aux_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                        mask=m_ok[:, None] & n_ok[None, :], other=0.).to(tl.float32)
            acc = acc * _gelu_grad(z)
        out = out_ptr + split.to(tl.int64) * stride_split
        tl.store(out + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
        if ROWSUM:
            if tile_n == 0:
                tl.store(rowsum_ptr + split.to(tl.int64) * M + offs_m, row_acc, mask=m_ok)


def _blocks(M: int, N: int, K: int):
    """A fixed heuristic (no autotune: first steps stay fast and deterministic in time):
    128x128 tiles with 64-deep k steps, narrowed to the problem where it is small."""
    if triton_interpret():
        return 32, 32, 32, 4, 1
    bm = 128 if M >= 128 else max(16, next_power_of_2(M))
    bn = 128 if N >= 128 else max(16, next_power_of_2(N))
    bk = 64 if K >= 64 else max(16, next_power_of_2(K))
    return bm, bn, bk, 8 if bm * bn >= 128 * 128 else 4, 3


def gemm(a: torch.Tensor, b: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
         gelu_grad_of: Optional[torch.Tensor] = None, gelu_a: bool = False, gelu_b: bool = False,
         rowsum: bool = False, split: Optional[int] = None, out_dtype: Optional[torch.dtype] = None,
         tf32: bool = False):
    """out = epilogue(prologue(a) @ prologue(b)) for 2-D a [M, K] and b [K, N] (any strides).

    fp32 operands multiply in IEEE fp32 unless tf32 is True (the caller's build-time choice, made
    from the same setting that lets cuBLAS use TF32 for the reference path).

    With split > 1 (or None: chosen to fill the GPU when M*N is small and K long) the result is
    the fp32 sum of split partials. Returns out, or (out, rowsum of a over K in fp32) with rowsum.
    """
    check_triton_device(a, b)
    M, K = a.shape
    K2, N = b.shape
    assert K == K2, (a.shape, b.shape)
    out_dtype = out_dtype or a.dtype
    bm, bn, bk, warps, stages = _blocks(M, N, K)
    tiles = cdiv(M, bm) * cdiv(N, bn)
    if split is None and (bias is not None or gelu_grad_of is not None):
        split = 1
    if split is None:
        split = max(1, min(cdiv(2 * sm_count(a.device), tiles), K // (8 * bk)))
    k_per_split = cdiv(cdiv(K, split), bk) * bk
    split = cdiv(K, k_per_split) if K else 1
    partial = split > 1
    out = torch.empty((split, M, N) if partial else (M, N), dtype=torch.float32 if partial else out_dtype,
                      device=a.device)
    sums = torch.empty((split, M), dtype=torch.float32, device=a.device) if rowsum else out
    assert bias is None or not partial, 'a bias epilogue needs the whole reduction in one program'
    if gelu_grad_of is not None:
        assert not partial and gelu_grad_of.shape == (M, N) and gelu_grad_of.is_contiguous()
    ieee = (a.dtype == torch.float32 and not tf32) or \
        (triton_interpret() and a.dtype == torch.bfloat16)
    o2 = out.view(-1, M, N)
    if M and N:
        _gemm_kernel[(tiles, split)](
            a, b, out, bias if bias is not None else out, gelu_grad_of if gelu_grad_of is not None else out, sums,
            M, N, K, k_per_split, a.stride(0), a.stride(1), b.stride(0), b.stride(1), o2.stride(1), o2.stride(2),
            o2.stride(0), GELU_A=gelu_a, GELU_B=gelu_b,
            EPILOGUE=1 if bias is not None else (2 if gelu_grad_of is not None else 0), ROWSUM=rowsum,
            IEEE=ieee, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
    if partial:
        out = out.sum(0).to(out_dtype)
    if rowsum:
        return out, sums.sum(0)
    return out
