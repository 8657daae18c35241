"""Pillow's bicubic affine transform (what timm's RandAugment rotate / shear / translate call) for a
batch, in one launch.

Image.transform(size, AFFINE, (a, b, c, d, e, f), BICUBIC, fillcolor=fill) on an 8-bit RGB image
computes, for output pixel (i, j):
    (xin, yin) = (a u + b v + c, d u + e v + f),  (u, v) = (j + 0.5, i + 0.5)
    fill where xin < 0, xin >= W, yin < 0 or yin >= H; else, with (xs, ys) = (xin - 0.5, yin - 0.5),
    x0 = floor(xs), dx = xs - x0 (y likewise), taps x0 - 1 .. x0 + 2 clamped to the image:
    out = sum_m w(dy - m) sum_n w(dx - n) in[y0 + m, x0 + n],  m, n = -1 .. 2
    w(t) = cubic convolution with a = -1 (not resize's -0.5): |t|^3 - 2|t|^2 + 1 for |t| < 1,
           -(|t|^3 - 5|t|^2 + 8|t| - 4) for 1 <= |t| < 2
    stored as uint8 by truncation toward zero after clipping to 0..255 (Pillow's Geometry.c).
torch's grid_sample has only a = -0.75 and rounds: about one level off on photos, and sharper
edges lost. Here the reference computes Pillow's math in float64; the kernel takes positions in
float64 and sums in float32 (the same values but where rounding puts a sum on the other side of an
integer).

Tensors follow data.tensor_ops: float32 [n, 3, H, W] holding whole numbers 0..255, matrix [n, 6]
(a..f per image), fill: 3 numbers.
"""
import torch

from ._utils import check_triton_device, triton_available


# ----------------------------------------------------------------------------- reference
def _cubic(t: torch.Tensor) -> torch.Tensor:
    t = t.abs()
    near = (t - 2) * t * t + 1
    far = -(((t - 5) * t + 8) * t - 4)
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


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
    acc = torch.zeros(n, c, h, w, dtype=torch.float64, device=dev)
    for mi in range(-1, 3):
        yy = (y0 + mi).clamp(0, h - 1).long()
        row = torch.zeros_like(acc)
        for ni in range(-1, 3):
            xx = (x0 + ni).clamp(0, w - 1).long()
            idx = (yy * w + xx).reshape(n, 1, h * w).expand(n, c, h * w)
            row += _cubic(dx - ni)[:, None] * flat.gather(2, idx).view(n, c, h, w)
        acc += _cubic(dy - mi)[:, None] * row
    out = acc.clamp(0, 255).trunc().float()
    fill_t = torch.as_tensor(fill, dtype=torch.float32, device=dev).reshape(1, -1, 1, 1)
    return torch.where(inside[:, None], out, fill_t)


# ----------------------------------------------------------------------------- triton kernel
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _cubic_w(t):
        t = tl.abs(t)
        near = (t - 2.0) * t * t + 1.0
        far = -(((t - 5.0) * t + 8.0) * t - 4.0)
        return tl.where(t < 1.0, near, tl.where(t < 2.0, far, 0.0))

    @triton.jit
    def _affine_kernel(x_ptr, m_ptr, fill_ptr, out_ptr, H, W, BLOCK: tl.constexpr):
        # program: one image, BLOCK output pixels; the coordinates and the 16 weights are computed
        # once and used for the three channels
        b = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < H * W
        i = offs // W
        j = offs % W
        mrow = m_ptr + b * 6
        u = j.to(tl.float64) + 0.5              # positions in float64, as Pillow: the inside test and
        v = i.to(tl.float64) + 0.5              # the tap choice match its own; the weights in float32
        xin = tl.load(mrow) * u + tl.load(mrow + 1) * v + tl.load(mrow + 2)
        yin = tl.load(mrow + 3) * u + tl.load(mrow + 4) * v + tl.load(mrow + 5)
        inside = (xin >= 0) & (xin < W) & (yin >= 0) & (yin < H)
        xs = tl.minimum(tl.maximum(xin - 0.5, -3.0), W + 2.0)
        ys = tl.minimum(tl.maximum(yin - 0.5, -3.0), H + 2.0)
        x0 = tl.floor(xs)
        y0 = tl.floor(ys)
        dx = (xs - x0).to(tl.float32)
        dy = (ys - y0).to(tl.float32)
        x0i = x0.to(tl.int32)
        y0i = y0.to(tl.int32)
        for c in tl.static_range(3):
            plane = x_ptr + (b * 3 + c) * H * W
            acc = tl.zeros((BLOCK,), dtype=tl.float32)
            for mi in tl.static_range(4):
                yy = tl.minimum(tl.maximum(y0i + (mi - 1), 0), H - 1)
                row = tl.zeros((BLOCK,), dtype=tl.float32)
                for ni in tl.static_range(4):
                    xx = tl.minimum(tl.maximum(x0i + (ni - 1), 0), W - 1)
                    row += _cubic_w(dx - (ni - 1)) * tl.load(plane + yy * W + xx, mask=ok, other=0.)
                acc += _cubic_w(dy - (mi - 1)) * row
            val = tl.minimum(tl.maximum(acc, 0.0), 255.0)
            val = tl.where(val >= 0, tl.floor(val), 0.0)                    # truncation (val >= 0)
            val = tl.where(inside, val, tl.load(fill_ptr + c))
            tl.store(out_ptr + (b * 3 + c) * H * W + offs, val, mask=ok)


# ----------------------------------------------------------------------------- launcher
def affine_resample(x: torch.Tensor, matrix: torch.Tensor, fill, out: torch.Tensor = None) -> torch.Tensor:
    """The Triton kernel: as affine_resample_ref (float64 positions, float32 sums). x: float32
    [n, 3, H, W]; matrix: [n, 6] on x's device."""
    check_triton_device(x)
    if x.dtype != torch.float32 or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f'affine_resample takes float32 [n, 3, H, W] images, got {x.dtype} {list(x.shape)}')
    x = x.contiguous()
    n, _, h, w = x.shape
    out = torch.empty_like(x) if out is None else out
    fill_t = torch.as_tensor(fill, dtype=torch.float32).to(x.device, non_blocking=True)
    block = 1024
    _affine_kernel[(n, triton.cdiv(h * w, block))](x, matrix.double().contiguous(), fill_t, out, h, w, BLOCK=block)
    return out
