"""Batched image operations on tensors that compute what upstream's PIL recipe computes.

Every function takes `x`, a float32 batch [n, 3, H, W] holding whole numbers in 0..255 (what a
uint8 PIL image holds), and per-image arguments as 1-D tensors of length n on x's device, and
returns the same kind of batch: each op rounds and clips as Pillow does for 8-bit images, so a
chain of ops stays on the uint8 grid. The per-op notes say how Pillow computes it; the tests
(tests/test_gpu_pipeline.py) compare each op with Pillow at fixed arguments.

Resampling: crop + resize is kernels/crop_resize.py (antialiased bicubic, a = -0.5, as Pillow, in
float: within a level of Pillow's fixed-point result); the affine ops (rotate, shear, translate) are
kernels/affine_resample.py, Pillow's own math (bicubic a = -1 without antialiasing, truncated). The
tests state the tolerances.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- helpers


def _col(v: torch.Tensor) -> torch.Tensor:
    """[n] -> [n, 1, 1, 1] to broadcast over a batch."""
    return v.reshape(-1, 1, 1, 1)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Image.blend(degenerate, x, factor) for 8-bit images: float32 a + f * (b - a), truncated
    toward zero and clipped to 0..255 (Pillow's Blend.c)."""
    out = degenerate + _col(factor).float() * (x - degenerate)
    return out.clamp_(0, 255).trunc_()


def _luma(x: torch.Tensor) -> torch.Tensor:
    """convert('L'): (19595 R + 38470 G + 7471 B + 0x8000) >> 16 (Pillow's integer ITU-R 601-2)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536)


# ----------------------------------------------------------------------------- per-pixel ops
_VALUES = np.arange(256, dtype=np.float32)
TABLE_OPS = ('invert', 'posterize', 'solarize', 'solarize_add', 'brightness')


def lookup_table(op: str, arg: float) -> np.ndarray:
    """The 256-entry table of a per-pixel op at one argument, in Pillow's float32 arithmetic:
    invert 255 - v; posterize keeps the top `arg` bits (0 bits: black, as Pillow < 13 gave);
    solarize inverts v >= arg; timm's solarize_add adds arg below 128, clipped at 255;
    brightness (ImageEnhance: blend with black) trunc(f * v), clipped."""
    v = _VALUES
    if op == 'invert':
        return 255 - v
    if op == 'posterize':
        step = np.float32(2.0 ** (8 - min(max(int(arg), 0), 8)))
        return np.floor(v / step) * step
    if op == 'solarize':
        return np.where(v < arg, v, 255 - v)
    if op == 'solarize_add':
        return np.where(v < 128, np.minimum(v + np.float32(arg), 255), v)
    if op == 'brightness':
        return np.trunc(np.clip(np.float32(arg) * v, 0, 255))
    raise ValueError(f'no lookup table for {op!r}')


def lookup(x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """out[i, c, y, x] = tables[i, x[i, c, y, x]]: per-image 256-entry tables ([n, 256] float),
    which is how Pillow applies its per-pixel ops (Image.point)."""
    n = x.shape[0]
    offsets = (torch.arange(n, device=x.device) * 256).reshape(n, 1, 1, 1)
    return tables.reshape(-1)[x.long() + offsets]


# ----------------------------------------------------------------------------- colour ops


def color(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Color: blend with the image's grey version (L replicated to RGB)."""
    return _blend(_luma(x).expand_as(x), x, factor)


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast: blend with a flat grey at int(mean(L) + 0.5)."""
    mean = torch.floor(_luma(x).double().mean(dim=(1, 2, 3)) + 0.5).float()
    return _blend(_col(mean).expand_as(x), x, factor)


_SMOOTH = torch.tensor([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.0


def sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Sharpness: blend with ImageFilter.SMOOTH (3x3 [1 1 1; 1 5 1; 1 1 1] / 13,
    rounded to nearest; the one-pixel border is copied unfiltered)."""
    k = _SMOOTH.to(x.device).expand(3, 1, 3, 3)
    smooth = torch.floor(F.conv2d(x, k, groups=3) + 0.5).clamp_(0, 255)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, factor)


def autocontrast(x: torch.Tensor, _: torch.Tensor = None) -> torch.Tensor:
    """ImageOps.autocontrast (no cutoff), per channel: lo, hi = min, max; where hi > lo,
    out = clip(int(v * 255 / (hi - lo) - lo * 255 / (hi - lo))); else unchanged. In float64, as
    Pillow computes the table."""
    lo = x.amin(dim=(2, 3), keepdim=True).double()
    hi = x.amax(dim=(2, 3), keepdim=True).double()
    scale = 255.0 / (hi - lo).clamp(min=1)
    out = torch.trunc(x.double() * scale - lo * scale).clamp_(0, 255).float()
    return torch.where(hi > lo, out, x)


def equalize(x: torch.Tensor, _: torch.Tensor = None) -> torch.Tensor:
    """ImageOps.equalize, per channel histogram h: step = (count - h[last non-empty bin]) // 255;
    lut[i] = (step // 2 + sum(h[:i])) // step; unchanged where step is 0 (one value, or nearly)."""
    n, c, hgt, wdt = x.shape
    flat = x.reshape(n * c, hgt * wdt).long()
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(
        1, flat, torch.ones_like(flat))
    last_bin = 255 - torch.argmax((hist.flip(1) > 0).long(), dim=1)          # last non-empty bin
    last = hist.gather(1, last_bin[:, None])[:, 0]
    step = (hgt * wdt - last) // 255
    safe = step.clamp(min=1)[:, None]
    before = torch.cumsum(hist, 1) - hist                                     # sum(h[:i])
    lut = ((safe // 2 + before) // safe).clamp_(max=255)
    out = lut.gather(1, flat).reshape(n, c, hgt, wdt).float()
    return torch.where((step > 0).reshape(n, c, 1, 1), out, x)


# ----------------------------------------------------------------------------- geometry
AFFINE_OPS = ('rotate', 'shear_x', 'shear_y', 'translate_x_rel', 'translate_y_rel', 'translate_x_abs',
              'translate_y_abs')


def affine_coefficients(op: str, arg: float, w: int, h: int) -> list:
    """Image.transform's inverse affine coefficients (a, b, c, d, e, f) of one timm geometric op on
    a w x h image: rotate (Image.rotate about (w / 2, h / 2), counter-clockwise degrees), shear
    (1, s, 0, 0, 1, 0) / (1, 0, 0, s, 1, 0), translate by pixels (the _rel ops: arg x width / height)."""
    if op == 'rotate':
        a = -math.radians(arg)
        cos, sin = math.cos(a), math.sin(a)
        cx, cy = w / 2.0, h / 2.0
        return [cos, sin, -cx * cos - cy * sin + cx, -sin, cos, cx * sin - cy * cos + cy]
    if op == 'shear_x':
        return [1, arg, 0, 0, 1, 0]
    if op == 'shear_y':
        return [1, 0, 0, arg, 1, 0]
    axis = op[len('translate_')]
    pixels = arg * (w if axis == 'x' else h) if op.endswith('_rel') else arg
    return [1, 0, pixels, 0, 1, 0] if axis == 'x' else [1, 0, 0, 0, 1, pixels]


def affine(x: torch.Tensor, matrix: torch.Tensor, fill) -> torch.Tensor:
    """Image.transform(AFFINE, (a, b, c, d, e, f), BICUBIC, fillcolor=fill) for a batch, Pillow's
    math (cubic a = -1, truncation; kernels/affine_resample.py): output pixel (i, j), at continuous
    position (u, v) = (j + 0.5, i + 0.5), takes the input at (a u + b v + c, d u + e v + f);
    positions outside the input get `fill` (per channel). matrix: [n, 6]. One Triton launch on the
    GPU; the float64 reference elsewhere."""
    from kernels.affine_resample import affine_resample, affine_resample_ref
    if x.is_cuda:
        return affine_resample(x, matrix, fill)
    return affine_resample_ref(x, matrix, fill)


def crop_padded(img: torch.Tensor, top: int, left: int, h: int, w: int) -> torch.Tensor:
    """img[:, top:top+h, left:left+w] where the box may reach outside img (filled with 0), as
    torchvision's RandomCrop(padding=...) sees the padded image."""
    _, H, W = img.shape
    if top >= 0 and left >= 0 and top + h <= H and left + w <= W:
        return img[:, top:top + h, left:left + w]
    out = img.new_zeros(img.shape[0], h, w)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, H), min(left + w, W)
    if y1 > y0 and x1 > x0:
        out[:, y0 - top:y1 - top, x0 - left:x1 - left] = img[:, y0:y1, x0:x1]
    return out


def center_crop_box(h: int, w: int, size: int) -> tuple:
    """torchvision CenterCrop's (top, left) for a size x size crop of an h x w image."""
    return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def resize_shorter(h: int, w: int, size: int) -> tuple:
    """torchvision Resize(int)'s output size: the shorter side becomes `size`."""
    if w <= h:
        return int(size * h / w), size
    return size, int(size * w / h)

