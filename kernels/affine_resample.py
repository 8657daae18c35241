"""Pillow's bicubic affine transform (what timm's RandAugment rotate / shear / translate call) for a
batch, in one launch.

Image.transform(size, AFFINE, (a, b, c, d, e, f), BICUBIC, fillcolor=fill) on an 8-bit RGB image
computes, in float64, for output pixel (i, j):
    (xin, yin) = (a u + b v + c, d u + e v + f),  (u, v) = (j + 0.5, i + 0.5)
    fill where xin < 0, xin >= W, yin < 0 or yin >= H; else, with (xs, ys) = (xin - 0.5, yin - 0.5),
    x0 = floor(xs), dx = xs - x0 (y likewise), and taps x0 - 1 .. x0 + 2 clamped to the image, each
    of the 4 rows r = y0 - 1 .. y0 + 2 is interpolated along x, then the 4 results along y, by
        cubic(v1, v2, v3, v4, d) = v2 + d (p2 + d (p3 + d p4)),  p2 = v3 - v1,
        p3 = 2 (v1 - v2) + v3 - v4,  p4 = -v1 + v2 - v3 + v4
    (cubic convolution with a = -1, not resize's -0.5), and stored as uint8 by truncation toward
    zero after clipping to 0..255 (Pillow's Geometry.c). Keeping Pillow's polynomial form matters:
    on a flat patch p2..p4 are exactly 0, where a weighted sum can land a hair below the integer
    and truncate a whole level lower.
torch's grid_sample has only a = -0.75 and rounds: about one level off on photos. Here the
reference and the kernel both compute Pillow's math in float64.

Tensors follow data.tensor_ops: float32 [n, 3, H, W] holding whole numbers 0..255, matrix [n, 6]
(a..f per image), fill: 3 numbers.
"""
import torch

from ._utils import cdiv, check_triton_device, triton_available


# ----------------------------------------------------------------------------- reference
def _cubic(v1, v2, v3, v4, d):
    """Pillow's BICUBIC macro (a = -1) in its polynomial form."""
    p2 = v3 - v1
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def affine_resample_ref(x: torch.Tensor, matrix: torch.Tensor, fill) -> torch.Tensor:
    """Pillow's bicubic affine transform of each image of x (see the module docstring), in float64."""
    n, c, h, w = x.shape
    dev = x.device
    m = matrix.double().reshape(n, 6, 1, 1)
    u = torch.arange(w, device=dev, dtype=torch.float64)[None, None, :] + 0.5
    v = torch.arange(h, device=dev, dtype=torch.float64)[None, :, None] + 0.5
    xin = m[:, 0] * u + m[:, 1] * v + m[:, 2]                                  # n, h, w
    yin = m[:, 3] * u + m[:, 4] * v + m[:, 5]
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    xs, ys = (xin - 0.5).clamp(-3, w + 2), (yin - 0.5).clamp(-3, h + 2)
    x0, y0 = xs.floor(), ys.floor()
    dx, dy = xs - x0, ys - y0
    flat = x.double().reshape(n, c, h * w)
    dx, dy = dx[:, None], dy[:, None]
    xx = [(x0 + k).clamp(0, w - 1).long() for k in (-1, 0, 1, 2)]
    rows = []
    for k in (-1, 0, 1, 2):
        yy = (y0 + k).clamp(0, h - 1).long()
        taps = [flat.gather(2, (yy * w + xi).reshape(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)
                for xi in xx]
        rows.append(_cubic(*taps, dx))
    acc = _cubic(*rows, dy)
    out = acc.clamp(0, 255).trunc().float()
    fill_t = torch.as_tensor(fill, dtype=torch.float32, device=dev).reshape(1, -1, 1, 1)
    return torch.where(inside[:, None], out, fill_t)


# ----------------------------------------------------------------------------- triton kernel
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _cubic_k(v1, v2, v3, v4, d):
        p2 = v3 - v1
        p3 = 2.0 * (v1 - v2) + v3 - v4
        p4 = -v1 + v2 - v3 + v4
        return v2 + d * (p2 + d * (p3 + d * p4))

    @triton.jit
    def _tap(plane, row, x, W, ok):
        x = tl.minimum(tl.maximum(x, 0), W - 1)
        return tl.load(plane + row + x, mask=ok, other=0.).to(tl.float64)

    @triton.jit
    def _row(plane, y, x0, H, W, ok, dx):
        """One source row (clamped into the image) interpolated along x at x0 + dx."""
        row = tl.minimum(tl.maximum(y, 0), H - 1) * W
        return _cubic_k(_tap(plane, row, x0 - 1, W, ok), _tap(plane, row, x0, W, ok),
                        _tap(plane, row, x0 + 1, W, ok), _tap(plane, row, x0 + 2, W, ok), dx)

    @triton.jit
    def _affine_pixel(plane, m_row, i, j, H, W, ok, fill):
        """The transform of one channel plane at output pixels (i, j) (float64 math, as Pillow), as
        float32 whole numbers; m_row: the image's six coefficients. kernels/colour_ops.py's layer
        kernel calls it too."""
        u = j.to(tl.float64) + 0.5
        v = i.to(tl.float64) + 0.5
        xin = tl.load(m_row) * u + tl.load(m_row + 1) * v + tl.load(m_row + 2)
        yin = tl.load(m_row + 3) * u + tl.load(m_row + 4) * v + tl.load(m_row + 5)
        inside = (xin >= 0) & (xin < W) & (yin >= 0) & (yin < H)
        xs = tl.minimum(tl.maximum(xin - 0.5, -3.0), W + 2.0)
        ys = tl.minimum(tl.maximum(yin - 0.5, -3.0), H + 2.0)
        x0 = tl.floor(xs)
        y0 = tl.floor(ys)
        dx = xs - x0
        dy = ys - y0
        x0i = x0.to(tl.int32)
        y0i = y0.to(tl.int32)
        acc = _cubic_k(_row(plane, y0i - 1, x0i, H, W, ok, dx), _row(plane, y0i, x0i, H, W, ok, dx),
                       _row(plane, y0i + 1, x0i, H, W, ok, dx), _row(plane, y0i + 2, x0i, H, W, ok, dx), dy)
        val = tl.floor(tl.minimum(tl.maximum(acc, 0.0), 255.0))            # truncation: val >= 0 here
        return tl.where(inside, val.to(tl.float32), fill)

    @triton.jit
    def _affine_kernel(x_ptr, m_ptr, fill_ptr, out_ptr, H, W, BLOCK: tl.constexpr):
        # program: one image, BLOCK output pixels of the three channels
        b = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < H * W
        i = offs // W
        j = offs % W
        for c in tl.static_range(3):
            val = _affine_pixel(x_ptr + (b * 3 + c) * H * W, m_ptr + b * 6, i, j, H, W, ok, tl.load(fill_ptr + c))
            tl.store(out_ptr + (b * 3 + c) * H * W + offs, val, mask=ok)


# ----------------------------------------------------------------------------- launcher
_FILLS = {}     # (fill values, device) -> the 3-float tensor: the recipe's fill is one constant a run


def fill_tensor(fill, device: torch.device) -> torch.Tensor:
    if isinstance(fill, torch.Tensor):
        return fill.to(device=device, dtype=torch.float32)
    values = tuple(float(v) for v in (fill if isinstance(fill, (tuple, list)) else (fill,) * 3))
    key = (values, str(device))
    if key not in _FILLS:
        _FILLS[key] = torch.tensor(values, dtype=torch.float32, device=device)
    return _FILLS[key]


def affine_resample(x: torch.Tensor, matrix: torch.Tensor, fill, out: torch.Tensor = None) -> torch.Tensor:
    """The Triton kernel: as affine_resample_ref (float64 math). x: float32
    [n, 3, H, W]; matrix: [n, 6] on x's device."""
    check_triton_device(x)
    if x.dtype != torch.float32 or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f'affine_resample takes float32 [n, 3, H, W] images, got {x.dtype} {list(x.shape)}')
    x = x.contiguous()
    n, _, h, w = x.shape
    out = torch.empty_like(x) if out is None else out
    fill_t = fill_tensor(fill, x.device)
    block = 1024
    _affine_kernel[(n, cdiv(h * w, block))](x, matrix.double().contiguous(), fill_t, out, h, w, BLOCK=block)
    return out
