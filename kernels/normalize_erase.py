"""ToTensor's scaling, Normalize and RandomErasing for a whole batch in one kernel.

The input pipeline (--data-pipeline gpu) ends each training batch with upstream's
    x = (x / 255 - mean[c]) / std[c]                       (ToTensor + Normalize)
and then timm's RandomErasing: each image has up to K rectangles (top, left, h, w), drawn on the host
(data.gpu_pipeline.TrainRecipe.erase_rects; h <= 0 where none), applied in order (a later one
overwrites an earlier one where they overlap), each filled by
    mode 'pixel': a standard normal value per pixel and channel,
    mode 'rand':  a standard normal value per channel (the whole rectangle),
    mode 'const': zero.
As torch ops that is three passes over the batch for the normalisation and, per rectangle, a dozen
small kernels (masks, a full-size normal draw, a select): in a chain that waits for SMs behind the
training step. Here one pass does all of it: every program normalises a block of one image channel
and fills what lies inside its rectangles.

The normalisation is bit-identical to upstream's ToTensor + Normalize on the CPU and to the reference:
the divisions are correctly rounded (tl.div_rn; the tests compare bits, and that the compiled kernel
has div.rn.f32, not Triton's default div.full.f32, which is 2 ulp off at times). The normal values come from Philox
(tl.randn) keyed by the batch's seed and the element's (image, channel, rectangle, pixel) index: the
same distribution as torch's draws, other values. Limits: float32 [B, C, H, W] contiguous, in place;
B * C * K * H * W < 2**31.
"""
import torch

from ._utils import cdiv, check_triton_device, triton_available, upload

MODES = ('const', 'rand', 'pixel')


# ----------------------------------------------------------------------------- reference
def normalize_erase_ref(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, rects: torch.Tensor, mode: str,
                        generator: torch.Generator = None) -> torch.Tensor:
    """x: float32 [B, C, H, W] on the 8-bit grid (0..255), in place; mean, std: [C] (0..1 scale);
    rects: [B, K, 4] (top, left, h, w), h <= 0 where none; mode: one of MODES. Torch's own draws from
    `generator` fill 'pixel' and 'rand' rectangles (none are taken when no rectangle is live)."""
    B, C, H, W = x.shape
    # divided by a tensor on x's device: torch on CUDA turns a division by a Python number into a multiply
    # by its reciprocal, an ulp off at times; upstream's ToTensor divides on the CPU, correctly rounded
    x = x.div_(x.new_tensor(255.0)).sub_(mean.reshape(1, C, 1, 1)).div_(std.reshape(1, C, 1, 1))
    if not (rects[:, :, 2] > 0).any():      # nothing to erase: no draws taken
        return x
    rects = rects.to(x.device)
    ys = torch.arange(H, device=x.device).reshape(1, H, 1)
    xs = torch.arange(W, device=x.device).reshape(1, 1, W)
    for k in range(rects.shape[1]):
        top, left, h, w = (rects[:, k, j].reshape(B, 1, 1) for j in range(4))
        inside = (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w) & (h > 0)
        if mode == 'pixel':
            fill = torch.randn(B, C, H, W, device=x.device, generator=generator)
        elif mode == 'rand':
            fill = torch.randn(B, C, 1, 1, device=x.device, generator=generator).expand(B, C, H, W)
        else:
            fill = torch.zeros(1, device=x.device).expand(B, C, H, W)
        x = torch.where(inside[:, None], fill, x)
    return x


# ----------------------------------------------------------------------------- triton kernel
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=['seed'])      # a new seed every batch: one compiled variant
    def _normalize_erase_kernel(x_ptr, mean_ptr, std_ptr, rects_ptr, seed, C, H, W, K,
                                MODE: tl.constexpr, BLOCK: tl.constexpr):
        """Program (b*C + c, block): BLOCK pixels of image b, channel c."""
        plane = tl.program_id(0)
        b = plane // C
        c = plane % C
        pix = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = pix < H * W
        ptr = x_ptr + plane.to(tl.int64) * H * W + pix
        v = tl.load(ptr, mask=ok, other=0.0)
        v = tl.div_rn(v, 255.0)           # correctly rounded (div.rn.f32; '/' and fdiv give div.full, 2 ulp)
        v = v - tl.load(mean_ptr + c)
        v = tl.div_rn(v, tl.load(std_ptr + c))
        y = pix // W
        x = pix % W
        for k in range(K):
            r = rects_ptr + (b * K + k) * 4
            top, left, h, w = tl.load(r), tl.load(r + 1), tl.load(r + 2), tl.load(r + 3)
            inside = (y >= top) & (y < top + h) & (x >= left) & (x < left + w) & (h > 0)
            if MODE == 2:           # pixel: one draw per element and rectangle
                fill = tl.randn(seed, (plane * K + k) * H * W + pix)
            elif MODE == 1:         # rand: one draw per channel and rectangle
                fill = tl.randn(seed, tl.zeros_like(pix) + plane * K + k)
            else:
                fill = tl.zeros_like(v)
            v = tl.where(inside, fill, v)
        tl.store(ptr, v, mask=ok)


# ----------------------------------------------------------------------------- launcher
_BLOCK = 1024


def normalize_erase_fwd(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, rects: torch.Tensor, mode: str,
                        seed: int) -> torch.Tensor:
    """normalize_erase_ref's result in one launch (the fill's values from Philox at `seed`), in place.
    rects: [B, K, 4] integers (any dtype; K may be 0)."""
    check_triton_device(x)
    B, C, H, W = x.shape
    if mode not in MODES:
        raise ValueError(f'erasing mode {mode!r} is not one of {MODES}')
    if not x.is_contiguous() or x.dtype != torch.float32:
        raise ValueError('normalize_erase: x must be a contiguous float32 batch')
    K = rects.shape[1]
    if B * C * max(K, 1) * H * W >= 2 ** 31:
        raise ValueError(f'normalize_erase: {B}x{C}x{K}x{H}x{W} draws exceed the 32-bit Philox offsets; '
                         f'split the batch')
    rects = upload(rects.to(torch.int32).contiguous(), x.device)
    mean = mean.to(device=x.device, dtype=torch.float32).contiguous()
    std = std.to(device=x.device, dtype=torch.float32).contiguous()
    _normalize_erase_kernel[(B * C, cdiv(H * W, _BLOCK))](
        x, mean, std, rects, int(seed) % 2 ** 31, C, H, W, K, MODE=MODES.index(mode), BLOCK=_BLOCK)
    return x
