"""Crop + antialiased bicubic resize of a batch of differently sized images, in two launches.

The input pipeline (--data-pipeline gpu) resizes 128 decoded images of different sizes a batch.
One interpolate call per image costs ~40 us of host time each (the pipeline's limit, measured on
an H200 host), and as many small launches. Here every image is packed into one uint8 buffer and
two Triton kernels do the whole batch, with torch's antialiased bicubic math (what
F.interpolate(mode='bicubic', antialias=True) computes, Pillow's resampling in float).

Math, along one axis (input length n_in, virtual output length n_out, scale = n_in / n_out):
    support = 2 * max(scale, 1)                         (bicubic: 2 taps each side at scale 1)
    center  = scale * (v + 0.5)                         (v: virtual output index)
    lo = max(floor(center - support + 0.5), 0),  hi = min(floor(center + support + 0.5), n_in)
    w_j = cubic((lo + j - center + 0.5) / max(scale, 1)),  j = 0 .. hi - lo - 1,  a = -0.5
    out[v] = sum_j w_j in[lo + j] / sum_j w_j
    cubic(t) = ((a + 2)|t| - (a + 3))|t|^2 + 1 for |t| < 1;  a(|t|^3 - 5|t|^2 + 8|t| - 4) for |t| < 2
Horizontal pass first (rows of the box -> S columns, float32 intermediate), then vertical; the
result is rounded to the 8-bit grid (floor(x + 0.5), clipped to 0..255), as `data.tensor_ops.resize`.

Each image b has a box (top, left, h, w) of its (H, W) image that is resized to a virtual
(out_h, out_w) image, of which the window (out_top, out_left, S, S) is written: a random-resized
crop is box = the crop, virtual = (S, S), window at 0; resize-shorter-side + centre crop is box =
the whole image, virtual = the resized size, window = the centre. flip 1 writes the window
mirrored left-right: the recipe's horizontal flip, which comes right after the resize, costs no
pass of its own. Limits: uint8 RGB (3 channels),
each image in CHW (nvJPEG's output) or HWC (what the workers decode) layout, read in place: a batch
of HWC images reaches the device in one copy and is resized without a per-image transpose; any
image sizes (element offsets are int64); the intermediate holds max(box h) x S floats per image and
channel.
"""
import torch

from ._utils import cdiv, check_triton_device, next_power_of_2, triton_available, upload

META_FIELDS = ('offset', 'H', 'W', 'top', 'left', 'h', 'w', 'out_h', 'out_w', 'out_top', 'out_left', 'flip')
# the launcher appends each image's layout to its row: 0 CHW, 1 HWC
_ROW = len(META_FIELDS) + 1


class Packed:
    """A batch of HWC uint8 images stored back to back in one flat buffer, as the input pipeline's
    workers send them: the kernels read it as it is, with no per-image tensor made on the host (a
    tensor call costs microseconds of host time under the GIL, and a batch had ~1000 of them).
    Iterating gives each image as a [3, H, W] view of the buffer, for the per-image paths."""

    def __init__(self, buf: torch.Tensor, offsets: list, hw: list):
        self.buf, self.offsets, self.hw = buf, offsets, hw     # flat uint8; element offsets; (H, W) each

    def __len__(self) -> int:
        return len(self.hw)

    def __iter__(self):
        for o, (h, w) in zip(self.offsets, self.hw):
            yield self.buf[o:o + h * w * 3].view(h, w, 3).permute(2, 0, 1)


# ----------------------------------------------------------------------------- reference
def crop_resize_ref(images, meta, size: int) -> torch.Tensor:
    """One F.interpolate per image: [B, 3, size, size] float32 on the 8-bit grid. images: [3, H, W]
    uint8 tensors or a Packed batch; meta: B rows as META_FIELDS, lists or an int64 tensor (offset
    unused here)."""
    import torch.nn.functional as F
    images = list(images)
    out = torch.empty(len(images), 3, size, size, device=images[0].device)
    for i, (img, m) in enumerate(zip(images, _rows(meta))):
        _, _, _, top, left, h, w, oh, ow, ot, ol, flip = m
        r = F.interpolate(img[None, :, top:top + h, left:left + w].float(), size=(oh, ow), mode='bicubic',
                          antialias=True, align_corners=False)[0]
        r = r[:, ot:ot + size, ol:ol + size]
        out[i] = r.flip(-1) if flip else r
    return out.add_(0.5).floor_().clamp_(0, 255)


def _rows(meta) -> list:
    """META_FIELDS rows as lists of ints (new lists: the launcher fills them in), from lists or a tensor."""
    return meta.tolist() if isinstance(meta, torch.Tensor) else [list(r) for r in meta]


def pack(images: list) -> tuple:
    """(uint8 buffer of every image's pixels as stored, int64 element offset of each image, its
    layout: 1 where the [3, H, W] tensor is an HWC image seen channels-first, else 0). Images in
    neither layout are copied to CHW."""
    flat, layouts = [], []
    for img in images:
        hwc = not img.is_contiguous() and img.permute(1, 2, 0).is_contiguous()
        flat.append(img.permute(1, 2, 0).reshape(-1) if hwc else img.contiguous().reshape(-1))
        layouts.append(int(hwc))
    offsets = torch.tensor([0] + [f.numel() for f in flat[:-1]]).cumsum(0)
    return torch.cat(flat), offsets, torch.tensor(layouts)


def taps(n_in: int, n_out: int) -> int:
    """Most input samples one output sample reads along an axis."""
    support = 2.0 * max(n_in / n_out, 1.0)
    return int(2 * support) + 3


# ----------------------------------------------------------------------------- triton kernels
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _cubic(t):
        """Keys' cubic with a = -0.5 (torch's and Pillow's antialiased bicubic)."""
        t = tl.abs(t)
        near = ((1.5 * t - 2.5) * t) * t + 1.0
        far = ((-0.5 * t + 2.5) * t - 4.0) * t + 2.0
        return tl.where(t < 1.0, near, tl.where(t < 2.0, far, 0.0))

    @triton.jit
    def _window(n_in, n_out, out_start, idx):
        """The source taps of output positions idx (of n_out, offset out_start) resampling n_in
        pixels: (centre, first tap, end, 1 / filter stretch); the filter widens when shrinking."""
        scale = n_in.to(tl.float32) / n_out.to(tl.float32)
        support = 2.0 * tl.maximum(scale, 1.0)
        center = scale * ((idx + out_start).to(tl.float32) + 0.5)
        lo = tl.maximum(tl.floor(center - support + 0.5), 0.0)
        hi = tl.minimum(tl.floor(center + support + 0.5), n_in.to(tl.float32))
        return center, lo, hi, 1.0 / tl.maximum(scale, 1.0)

    @triton.jit
    def _horizontal_kernel(src_ptr, meta_ptr, tmp_ptr, max_h, max_taps,
                           S: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, ROW: tl.constexpr):
        """tmp[b, c, y, x] for the box's rows y and output columns x of the window."""
        pid_bc = tl.program_id(0)
        pid_y = tl.program_id(1)
        b = pid_bc // 3
        c = pid_bc % 3
        m = meta_ptr + b * ROW
        offset = tl.load(m + 0)
        H = tl.load(m + 1)
        W = tl.load(m + 2)
        top = tl.load(m + 3)
        left = tl.load(m + 4)
        h = tl.load(m + 5)
        w = tl.load(m + 6)
        out_w = tl.load(m + 8)
        out_left = tl.load(m + 10)
        hwc = tl.load(m + 12) == 1                # strides of the image's layout: CHW or HWC
        c_stride = tl.where(hwc, 1, H * W)
        row_stride = tl.where(hwc, 3 * W, W)
        px = tl.where(hwc, 3, 1)
        xs = tl.arange(0, BLOCK_S)
        center, lo, hi, inv = _window(w, out_w, out_left, xs)
        ys = pid_y * ROWS + tl.arange(0, ROWS)
        row_ok = ys < h
        col_ok = xs < S
        base = (src_ptr + offset + c.to(tl.int64) * c_stride + (top + ys).to(tl.int64)[:, None] * row_stride
                + left * px)
        acc = tl.zeros((ROWS, BLOCK_S), dtype=tl.float32)
        wsum = tl.zeros((BLOCK_S,), dtype=tl.float32)
        for j in range(0, max_taps):
            src_x = lo + j
            valid = (src_x < hi) & col_ok
            wj = tl.where(valid, _cubic((src_x - center + 0.5) * inv), 0.0)
            v = tl.load(base + src_x.to(tl.int64)[None, :] * px, mask=row_ok[:, None] & valid[None, :], other=0)
            acc += wj[None, :] * v.to(tl.float32)
            wsum += wj
        acc = acc / tl.where(wsum == 0.0, 1.0, wsum)[None, :]
        dst = tmp_ptr + (pid_bc.to(tl.int64) * max_h + ys[:, None]) * S + xs[None, :]
        tl.store(dst, acc, mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _vertical_kernel(tmp_ptr, meta_ptr, out_ptr, max_h, max_taps,
                         S: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, ROW: tl.constexpr):
        """out[b, c, y, x] from tmp's columns, rounded to the 8-bit grid."""
        pid_bc = tl.program_id(0)
        pid_y = tl.program_id(1)
        b = pid_bc // 3
        m = meta_ptr + b * ROW
        h = tl.load(m + 5)
        out_h = tl.load(m + 7)
        out_top = tl.load(m + 9)
        flip = tl.load(m + 11) == 1
        ys = pid_y * ROWS + tl.arange(0, ROWS)
        xs = tl.arange(0, BLOCK_S)
        row_ok = ys < S
        col_ok = xs < S
        center, lo, hi, inv = _window(h, out_h, out_top, ys)
        base = tmp_ptr + pid_bc.to(tl.int64) * max_h * S
        acc = tl.zeros((ROWS, BLOCK_S), dtype=tl.float32)
        wsum = tl.zeros((ROWS,), dtype=tl.float32)
        for j in range(0, max_taps):
            src_y = lo + j
            valid = (src_y < hi) & row_ok
            wj = tl.where(valid, _cubic((src_y - center + 0.5) * inv), 0.0)
            v = tl.load(base + src_y.to(tl.int64)[:, None] * S + xs[None, :],
                        mask=valid[:, None] & col_ok[None, :], other=0.0)
            acc += wj[:, None] * v
            wsum += wj
        acc = acc / tl.where(wsum == 0.0, 1.0, wsum)[:, None]
        acc = tl.minimum(tl.maximum(tl.floor(acc + 0.5), 0.0), 255.0)
        dst_x = tl.where(flip, S - 1 - xs, xs)          # mirrored for a flipped image (in range where col_ok)
        dst = out_ptr + (pid_bc.to(tl.int64) * S + ys[:, None]) * S + dst_x[None, :]
        tl.store(dst, acc, mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------- launcher
def crop_resize_fwd(images, meta, size: int, out: torch.Tensor = None) -> torch.Tensor:
    """The batch [B, 3, size, size] float32 on the 8-bit grid, as crop_resize_ref. images: [3, H, W]
    uint8 tensors on one device, CHW or HWC underneath (see pack), or a Packed batch; meta: B rows of
    META_FIELDS, lists of ints or an int64 tensor (offset is filled here). The rows reach the device
    in one upload, each with its image's offset and layout."""
    rows = _rows(meta)
    if isinstance(images, Packed):
        buf, offsets, layouts = images.buf, images.offsets, [1] * len(images)
    else:
        buf, offsets, layouts = pack(images)
        offsets, layouts = offsets.tolist(), layouts.tolist()
    check_triton_device(buf)
    for r, o, layout in zip(rows, offsets, layouts):
        r[0] = o
        r.append(layout)
    max_h = max(r[5] for r in rows)
    taps_x = max(taps(r[6], r[8]) for r in rows)
    taps_y = max(taps(r[5], r[7]) for r in rows)
    B = len(rows)
    meta_dev = upload(torch.tensor(rows, dtype=torch.int64), buf.device)
    tmp = torch.empty(B * 3, max_h, size, device=buf.device)
    out = torch.empty(B, 3, size, size, device=buf.device) if out is None else out
    block_s = next_power_of_2(size)
    rows_per_program = 4
    _horizontal_kernel[(B * 3, cdiv(max_h, rows_per_program))](
        buf, meta_dev, tmp, max_h, taps_x, S=size, ROWS=rows_per_program, BLOCK_S=block_s, ROW=_ROW)
    _vertical_kernel[(B * 3, cdiv(size, rows_per_program))](
        tmp, meta_dev, out, max_h, taps_y, S=size, ROWS=rows_per_program, BLOCK_S=block_s, ROW=_ROW)
    return out
