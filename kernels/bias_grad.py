"""Bias gradients beside cuBLAS's GEMMs (--fused_dense, --fused_mlp), dy [M, N] row-major:

  db = sum over rows of dy                           a Linear's bias gradient
  dz = dy * gelu'(z),  db = sum over rows of dz      GELU's backward and fc1's bias gradient, one pass

Why our own: torch's column sum (`reduce_kernel`) over Swin's tall, narrow half-precision gradients
took 2.82 of 21.8 ms of GPU time in an eager Swin-T step (50 bias gradients, about a quarter of the
H200's bandwidth; benchmarks/results/fp16_vs_bf16_profile_h200_2026-11-29.txt), and GELU's backward
is a pass over fc1's gradient of its own before that sum reads it again. Here a program sums a band
of rows into a whole fp32 tile (reduced across rows once, at the end) and writes one partial row;
the partials are summed over programs in a fixed order and cast in one more launch (deterministic,
no atomics). dz is rounded to dy's dtype before it is summed, as torch sums the dz it stored.

GELU exact (erf): gelu'(z) = (1 + erf(z / sqrt 2)) / 2 + z exp(-z^2 / 2) / sqrt(2 pi).
"""
from typing import Optional

import torch

from ._utils import cdiv, check_triton_device, next_power_of_2, sm_count, triton_available


# ----------------------------------------------------------------------------- reference
def bias_grad_ref(dy2: torch.Tensor) -> torch.Tensor:
    """dy2 [M, N] -> [N] in dy2's dtype (fp32 accumulation, as torch's sum)."""
    return dy2.sum(0)


def gelu_bias_grad_ref(dy2: torch.Tensor, z: torch.Tensor) -> tuple:
    """(dz, db): GELU's backward at its input z, and dz's column sum."""
    dz = torch.ops.aten.gelu_backward(dy2, z)
    return dz, dz.sum(0)


# ----------------------------------------------------------------------------- triton kernel
if triton_available():
    import triton
    import triton.language as tl

    from .layer_norm import sum_partials

    @triton.jit
    def _gelu_grad(z):
        return 0.5 * (1. + tl.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327

    @triton.jit
    def _bias_grad_kernel(dy_ptr, z_ptr, dz_ptr, part_ptr, M, N, rows_per_program,
                          DGELU: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        """Program (column block, band of rows): part[band, cols] = the band's column sums of dy, or
        with DGELU of dz = dy * gelu'(z) (written to dz_ptr in dy's dtype)."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        band = tl.program_id(1)
        start = band.to(tl.int64) * rows_per_program
        acc = tl.zeros((BLOCK_ROWS, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rows_per_program, BLOCK_ROWS):
            rows = start + r0 + tl.arange(0, BLOCK_ROWS)
            ok = (rows < M)[:, None] & col_ok[None, :]      # a band is a whole number of tiles
            off = rows[:, None] * N + cols[None, :]
            d = tl.load(dy_ptr + off, mask=ok, other=0.).to(tl.float32)
            if DGELU:
                z = tl.load(z_ptr + off, mask=ok, other=0.).to(tl.float32)
                d = (d * _gelu_grad(z)).to(dz_ptr.dtype.element_ty)
                tl.store(dz_ptr + off, d, mask=ok)
                d = d.to(tl.float32)
            acc += d
        tl.store(part_ptr + band.to(tl.int64) * N + cols, tl.sum(acc, axis=0), mask=col_ok)


# ----------------------------------------------------------------------------- launcher
def _launch(M: int, N: int, device: torch.device) -> tuple:
    """(BLOCK_ROWS, BLOCK_N, bands, rows a band): tiles of ~4K elements (full 16-byte loads), about
    8 programs an SM, each band a whole number of tiles."""
    block_n = min(next_power_of_2(N), 256)
    block_rows = max(1, 4096 // block_n)
    bands = max(1, min(cdiv(M, block_rows), 8 * sm_count(device) // cdiv(N, block_n)))
    rows = max(block_rows, cdiv(cdiv(M, bands), block_rows) * block_rows)
    return block_rows, block_n, max(1, cdiv(M, rows)), rows


def bias_grad(dy2: torch.Tensor, z: Optional[torch.Tensor] = None):
    """dy2 [M, N] contiguous -> db [N] in dy2's dtype; with z (GELU's input, like dy2) -> (dz, db)."""
    check_triton_device(dy2, z)
    assert dy2.dim() == 2 and dy2.is_contiguous(), 'bias_grad takes a contiguous [M, N] gradient'
    assert z is None or (z.shape == dy2.shape and z.dtype == dy2.dtype and z.is_contiguous())
    M, N = dy2.shape
    block_rows, block_n, bands, rows = _launch(M, N, dy2.device)
    part = torch.empty((1, bands, N), dtype=torch.float32, device=dy2.device)
    dz = torch.empty_like(dy2) if z is not None else dy2
    if N:
        _bias_grad_kernel[(cdiv(N, block_n), bands)](dy2, z if z is not None else dy2, dz, part, M, N, rows,
                                                     DGELU=z is not None, BLOCK_ROWS=block_rows, BLOCK_N=block_n,
                                                     num_warps=4)
    db, = sum_partials(part, dy2.dtype)
    return (dz, db) if z is not None else db
