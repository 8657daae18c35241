"""One RandAugment layer for a whole batch in three kernels, whatever the mix of ops.

Within one RandAugment layer every image gets at most one op. Run as torch ops, each op is a group:
gather its images, 5-15 kernels, scatter them back, about 70 small kernels a layer in a chain. When
the pipeline shares the GPU with a training step each of them waits for SMs, and the chain, not the
work, sets the pace. Here each image carries an op code and the three kernels serve the whole batch,
the geometric ops (rotate, shear, translate: an AFFINE code and the image's six coefficients) included:

- _stats_kernel: per image, what its op reads of the whole image: the luma sum (contrast), per-channel
  min and max (autocontrast; the min kept as 255 - min, so that one zeroed buffer starts every
  statistic) and histograms (equalize); integers, so the atomic sums are exact and the same in any
  order.
- _tables_kernel: per image and channel, a 256-entry table: timm's invert / posterize / solarize /
  solarize_add / brightness tables (built on the host, data.tensor_ops.lookup_table), autocontrast's
  and equalize's from the statistics (Pillow's formulas, as data.tensor_ops); and contrast's
  rounded mean luma.
- _apply_kernel: every pixel once, out of place: a table lookup, or a blend with the luma (color),
  the mean (contrast) or the 3x3 smoothed image (sharpness, border unfiltered), or Pillow's bicubic
  affine transform (kernels/affine_resample.py's per-pixel function), or a copy.

The reference, colour_ops_ref, applies data.tensor_ops's per-op functions group by group (what the
pipeline runs on the CPU). The kernels keep its rounding: the multiply-adds are not fused into FMAs
(enable_fp_fusion=False), so a truncation lands where torch's separately rounded ops land it.
Sharpness sums its nine fp32-weighted taps in a fixed order; the reference's conv2d picks its own,
which can move a result by one level where it sits on a rounding edge (the tests bound it).
"""
import torch

from ._utils import cdiv, check_triton_device, triton_available
from .affine_resample import fill_tensor

NONE, TABLE, AUTOCONTRAST, EQUALIZE, COLOR, CONTRAST, SHARPNESS, AFFINE = range(8)
CODES = {'invert': TABLE, 'posterize': TABLE, 'solarize': TABLE, 'solarize_add': TABLE, 'brightness': TABLE,
         'autocontrast': AUTOCONTRAST, 'equalize': EQUALIZE, 'color': COLOR, 'contrast': CONTRAST,
         'sharpness': SHARPNESS}


# ----------------------------------------------------------------------------- reference
def colour_ops_ref(x: torch.Tensor, code: torch.Tensor, factor: torch.Tensor, tables: torch.Tensor,
                   matrix: torch.Tensor = None, fill=0) -> torch.Tensor:
    """x: float32 [n, 3, H, W] whole numbers 0..255; code: [n] op codes; factor: [n] the blend factor
    of color / contrast / sharpness; tables: [n, 256] the host-built table of TABLE images; matrix:
    [n, 6] the affine coefficients of AFFINE images, which take `fill` (3 numbers) outside. Each op by
    data.tensor_ops on its own images, out of place."""
    from data import tensor_ops as T
    out = x.clone()
    code = code.to(x.device)
    for c, fn in ((TABLE, None), (AUTOCONTRAST, T.autocontrast), (EQUALIZE, T.equalize), (COLOR, T.color),
                  (CONTRAST, T.contrast), (SHARPNESS, T.sharpness), (AFFINE, None)):
        idx = (code == c).nonzero().flatten()
        if idx.numel() == 0:
            continue
        if c == TABLE:
            out[idx] = T.lookup(x[idx], tables.to(x.device)[idx].float())
        elif c == AFFINE:
            out[idx] = T.affine(x[idx], matrix.to(x.device)[idx], fill)
        else:
            out[idx] = fn(x[idx], factor.to(x.device)[idx])
    return out


# ----------------------------------------------------------------------------- triton kernels
if triton_available():
    import triton
    import triton.language as tl

    from .affine_resample import _affine_pixel

    @triton.jit
    def _luma_k(r, g, b):
        """convert('L'): (19595 R + 38470 G + 7471 B + 0x8000) >> 16, exact in fp32 (< 2^24)."""
        return tl.floor((r * 19595.0 + g * 38470.0 + b * 7471.0 + 32768.0) / 65536.0)

    @triton.jit
    def _stats_kernel(x_ptr, code_ptr, luma_ptr, lo_ptr, hi_ptr, hist_ptr, HW, BLOCK: tl.constexpr):
        # program: one image, BLOCK pixels; only images whose op reads whole-image statistics
        b = tl.program_id(0).to(tl.int64)
        code = tl.load(code_ptr + b)
        if (code == 2) | (code == 3) | (code == 5):          # AUTOCONTRAST, EQUALIZE, CONTRAST
            offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
            ok = offs < HW
            base = x_ptr + b * 3 * HW + offs
            r = tl.load(base, mask=ok, other=0.)
            g = tl.load(base + HW, mask=ok, other=0.)
            bl = tl.load(base + 2 * HW, mask=ok, other=0.)
            if code == 5:
                luma = tl.where(ok, _luma_k(r, g, bl), 0.).to(tl.int32)
                tl.atomic_add(luma_ptr + b, tl.sum(luma, 0))
            for c in tl.static_range(3):
                v = r if c == 0 else (g if c == 1 else bl)
                if code == 2:                                    # lo_ptr holds 255 - min
                    tl.atomic_max(lo_ptr + b * 3 + c, 255 - tl.min(tl.where(ok, v, 255.), 0).to(tl.int32))
                    tl.atomic_max(hi_ptr + b * 3 + c, tl.max(tl.where(ok, v, 0.), 0).to(tl.int32))
                if code == 3:
                    h = tl.histogram(v.to(tl.int32), 256, mask=ok)
                    tl.atomic_add(hist_ptr + (b * 3 + c) * 256 + tl.arange(0, 256), h)

    @triton.jit
    def _tables_kernel(code_ptr, host_ptr, luma_ptr, lo_ptr, hi_ptr, hist_ptr, lut_ptr, mean_ptr, HW):
        # program: one image and channel; the image's 256-entry table for that channel
        pid = tl.program_id(0).to(tl.int64)
        b = pid // 3
        code = tl.load(code_ptr + b)
        idx = tl.arange(0, 256)
        v = idx.to(tl.float64)
        lut = v
        if code == 1:                                            # TABLE: built on the host
            lut = tl.load(host_ptr + b * 256 + idx)
        if code == 2:                                            # AUTOCONTRAST, in float64 as Pillow
            lo = (255 - tl.load(lo_ptr + pid)).to(tl.float64)
            hi = tl.load(hi_ptr + pid).to(tl.float64)
            scale = 255.0 / tl.maximum(hi - lo, 1.0)
            stretched = tl.minimum(tl.maximum(tl.floor(v * scale - lo * scale), 0.0), 255.0)
            lut = tl.where(hi > lo, stretched, v)
        if code == 3:                                            # EQUALIZE
            h = tl.load(hist_ptr + pid * 256 + idx)
            last = tl.max(tl.where(h > 0, idx, -1), 0)
            step = (HW - tl.sum(tl.where(idx == last, h, 0), 0)) // 255
            safe = tl.maximum(step, 1)
            before = tl.cumsum(h, 0) - h
            eq = tl.minimum((safe // 2 + before) // safe, 255).to(tl.float64)
            lut = tl.where(step > 0, eq, v)
        if code == 5:
            if pid % 3 == 0:                                     # CONTRAST: floor(mean luma + 0.5)
                s = tl.load(luma_ptr + b).to(tl.float64)
                tl.store(mean_ptr + b, tl.floor(s / HW + 0.5).to(tl.float32))
        tl.store(lut_ptr + pid * 256 + idx, lut.to(tl.float32))

    @triton.jit
    def _blend_k(deg, v, f):
        """Image.blend for 8-bit images: deg + f (v - deg), clipped, truncated (v, deg >= 0)."""
        return tl.floor(tl.minimum(tl.maximum(deg + f * (v - deg), 0.0), 255.0))

    @triton.jit
    def _tap_k(plane, i, j, di: tl.constexpr, dj: tl.constexpr, W, ok):
        return tl.load(plane + (i + di) * W + (j + dj), mask=ok, other=0.)

    @triton.jit
    def _apply_kernel(x_ptr, out_ptr, code_ptr, factor_ptr, lut_ptr, mean_ptr, m_ptr, fill_ptr, H, W,
                      BLOCK: tl.constexpr):
        # program: one image, BLOCK pixels of all three channels
        b = tl.program_id(0).to(tl.int64)
        HW = H * W
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < HW
        code = tl.load(code_ptr + b)
        f = tl.load(factor_ptr + b).to(tl.float32)
        base = x_ptr + b * 3 * HW + offs
        r = tl.load(base, mask=ok, other=0.)
        g = tl.load(base + HW, mask=ok, other=0.)
        bl = tl.load(base + 2 * HW, mask=ok, other=0.)
        luma = _luma_k(r, g, bl)
        mean = tl.load(mean_ptr + b)
        i = offs // W
        j = offs % W
        inner = ok & (i >= 1) & (i < H - 1) & (j >= 1) & (j < W - 1)
        for c in tl.static_range(3):
            v = r if c == 0 else (g if c == 1 else bl)
            out = v
            if (code >= 1) & (code <= 3):                        # TABLE, AUTOCONTRAST, EQUALIZE
                out = tl.load(lut_ptr + (b * 3 + c) * 256 + v.to(tl.int32), mask=ok, other=0.)
            if code == 4:                                        # COLOR
                out = _blend_k(luma, v, f)
            if code == 5:                                        # CONTRAST
                out = _blend_k(mean, v, f)
            if code == 6:                                        # SHARPNESS: 3x3 [1 1 1; 1 5 1; 1 1 1] / 13
                plane = x_ptr + (b * 3 + c) * HW
                w1 = 1.0 / 13.0
                w5 = 5.0 / 13.0
                acc = _tap_k(plane, i, j, -1, -1, W, inner) * w1
                acc += _tap_k(plane, i, j, -1, 0, W, inner) * w1
                acc += _tap_k(plane, i, j, -1, 1, W, inner) * w1
                acc += _tap_k(plane, i, j, 0, -1, W, inner) * w1
                acc += v * w5
                acc += _tap_k(plane, i, j, 0, 1, W, inner) * w1
                acc += _tap_k(plane, i, j, 1, -1, W, inner) * w1
                acc += _tap_k(plane, i, j, 1, 0, W, inner) * w1
                acc += _tap_k(plane, i, j, 1, 1, W, inner) * w1
                smooth = tl.minimum(tl.maximum(tl.floor(acc + 0.5), 0.0), 255.0)
                out = _blend_k(tl.where(inner, smooth, v), v, f)
            if code == 7:                                        # AFFINE
                out = _affine_pixel(x_ptr + (b * 3 + c) * HW, m_ptr + b * 6, i, j, H, W, ok, tl.load(fill_ptr + c))
            tl.store(out_ptr + (b * 3 + c) * HW + offs, out, mask=ok)


# ----------------------------------------------------------------------------- launcher
def colour_ops(x: torch.Tensor, code: torch.Tensor, factor: torch.Tensor, tables: torch.Tensor,
               matrix: torch.Tensor = None, fill=0) -> torch.Tensor:
    """The three kernels: as colour_ops_ref. x: float32 [n, 3, H, W]; code: [n] integer op codes;
    factor: [n]; tables: [n, 256] (read for TABLE images only); matrix: [n, 6] (read for AFFINE images
    only; none: no image may be AFFINE); all on x's device."""
    check_triton_device(x)
    if x.dtype != torch.float32 or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f'colour_ops takes float32 [n, 3, H, W] images, got {x.dtype} {list(x.shape)}')
    x = x.contiguous()
    n, _, h, w = x.shape
    dev = x.device
    code = code.contiguous()
    # every statistic in one zeroed buffer: luma sums [n], 255 - min [n, 3], max [n, 3], histograms [n, 3, 256]
    stats = torch.zeros(n * (1 + 3 + 3 + 3 * 256), dtype=torch.int32, device=dev)
    luma, lo, hi, hist = stats.split([n, 3 * n, 3 * n, 3 * 256 * n])
    lut = torch.empty(n, 3, 256, dtype=torch.float32, device=dev)
    mean = torch.empty(n, dtype=torch.float32, device=dev)         # written and read for CONTRAST only
    out = torch.empty_like(x)
    tables = tables.double().contiguous()
    matrix = tables if matrix is None else matrix.double().contiguous()     # a valid pointer, never read
    block = 1024
    grid = (n, cdiv(h * w, block))
    exact = dict(enable_fp_fusion=False)       # torch's separately rounded multiply and add
    _stats_kernel[grid](x, code, luma, lo, hi, hist, h * w, BLOCK=block)
    _tables_kernel[(n * 3,)](code, tables, luma, lo, hi, hist, lut, mean, h * w, **exact)
    _apply_kernel[grid](x, out, code, factor.contiguous(), lut, mean, matrix, fill_tensor(fill, dev), h, w,
                        BLOCK=block, **exact)
    return out
