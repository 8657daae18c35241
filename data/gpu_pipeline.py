"""The fast input pipeline (DATA.PIPELINE 'gpu', CLI --data-pipeline gpu).

Upstream decodes and augments every image in CPU workers with PIL (about 150 images/s per core) and
ships float32 images to the GPU. Here the work is split where each part is cheapest:

- CPU workers read the file, decode it to PIL's convert('RGB') pixels as upstream does
  (EXTRA.JPEG_DECODE 'workers', the default; baseline JPEGs through torchvision's libjpeg-turbo where
  it gives exactly those pixels, checked once a process, else PIL), cut it to its crop box, and draw
  every random choice of upstream's recipe from timm's and torchvision's own samplers: the
  RandomResizedCrop box, the flip, the RandAugment program (timm's ops, probabilities, magnitude
  noise, increasing variants) and the RandomErasing rectangles. They return uint8 pixels and a row
  of parameters: no float32 images, no per-image augmentation on the CPU.
- On the training device, a background thread copies the batch's pixels in one transfer, crops and
  resizes each image (antialiased bicubic, reading the workers' HWC layout in place) and
  applies flip, RandAugment, normalisation and erasing as batched tensor ops (data/tensor_ops.py,
  which match Pillow's ops), on its own CUDA stream, a few batches ahead.
- EXTRA.JPEG_DECODE 'device': the workers send baseline JPEGs (YCbCr or grey) as compressed bytes and
  the background thread decodes the batch with nvJPEG, on the GPU's hardware JPEG engines (slightly
  different pixels; slower than 12+ workers next to a training step, see config.py), called directly
  (data/nvjpeg.py) so that a group of batches is one call writing into each batch's buffer. Files nvJPEG
  does not take (CMYK, progressive, PNG named .JPEG, anything else PIL opens) are decoded in the
  worker with PIL's convert('RGB') either way; a file PIL cannot read is an error naming it. Nothing
  is dropped. EXTRA.DEVICE_DECODE_SHARE below 1 sends only that share of them to nvJPEG; the workers
  decode the rest, and a batch mixes the two.

On a machine without CUDA the same code runs on the CPU (the workers decode, the batch ops run in
the main process): slower, for tests and the demo.

What is not implemented (a clear error at start names it; use --data-pipeline pil): colour jitter
(timm applies it only without an auto-augment policy, or with '3a'), AutoAugment / AugMix policies,
DATA.INTERPOLATION other than bicubic.
"""
import collections
import ctypes
import functools
import io
import itertools
import math
import mmap
import queue
import random
import sys
import threading
from typing import Optional

import numpy as np
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from kernels._utils import upload
from kernels.crop_resize import Packed
from kernels.normalize_erase import normalize_erase_fwd, normalize_erase_ref

from . import tensor_ops as T
from .build import DataError

# RandAugment ops by timm's function name -> (our op name). The id of an op is its index here.
_TIMM_FUNCTIONS = {
    'auto_contrast': 'autocontrast', 'equalize': 'equalize', 'invert': 'invert', 'rotate': 'rotate',
    'posterize': 'posterize', 'solarize': 'solarize', 'solarize_add': 'solarize_add', 'color': 'color',
    'contrast': 'contrast', 'brightness': 'brightness', 'sharpness': 'sharpness', 'shear_x': 'shear_x',
    'shear_y': 'shear_y', 'translate_x_rel': 'translate_x_rel', 'translate_y_rel': 'translate_y_rel',
    'translate_x_abs': 'translate_x_abs', 'translate_y_abs': 'translate_y_abs'}
OPS = list(_TIMM_FUNCTIONS.values())
SKIPPED = -1        # an op whose probability draw said no

# Parameter row of one training image: crop box, flip, then (op id, argument) per RandAugment
# layer, then (top, left, h, w) per erasing rectangle (-1 where none).
BOX, FLIP, PROGRAM = slice(0, 4), 4, 5


class _Record:
    """Stands in for a timm op's image function: returns (op id, level argument) instead of an
    image, so timm's own AugmentOp draws the probability, magnitude noise and level."""

    def __init__(self, op_id: int):
        self.op_id = op_id

    def __call__(self, _img, *level_args, **_kwargs):
        return self.op_id, float(level_args[0]) if level_args else 0.0


def aa_fill() -> tuple:
    """timm's fill colour for geometric ops: the ImageNet mean in 0..255."""
    return tuple(min(255, round(255 * m)) for m in IMAGENET_DEFAULT_MEAN)


class TrainRecipe:
    """Upstream's train recipe as parameters drawn per image (runs in the DataLoader workers)."""

    def __init__(self, config):
        from timm.data.auto_augment import rand_augment_transform
        from timm.data.transforms import str_to_pil_interp
        self.size = config.DATA.IMG_SIZE
        self.small = self.size <= 32          # upstream: RandomCrop(size, padding=4) instead of RRC
        aa = config.AUG.AUTO_AUGMENT if config.AUG.AUTO_AUGMENT not in ('', 'none', None) else None
        if config.DATA.INTERPOLATION != 'bicubic':
            raise DataError(f"--data-pipeline gpu implements DATA.INTERPOLATION 'bicubic' (upstream's), not "
                            f"{config.DATA.INTERPOLATION!r}: use --data-pipeline pil")
        if aa and not aa.startswith('rand'):
            raise DataError(f"--data-pipeline gpu implements RandAugment ('rand-...'), not AUG.AUTO_AUGMENT "
                            f"{aa!r}: use --data-pipeline pil")
        if config.AUG.COLOR_JITTER > 0 and (not aa or '3a' in aa):
            raise DataError('--data-pipeline gpu does not implement colour jitter, which this recipe applies '
                            '(AUG.COLOR_JITTER > 0 without an auto-augment policy): use --data-pipeline pil, '
                            'or set AUG.COLOR_JITTER 0')
        self.randaugment = None
        self.layers = 0
        if aa:
            hparams = dict(translate_const=int(self.size * 0.45), img_mean=aa_fill(),
                           interpolation=str_to_pil_interp('bicubic'))
            ra = rand_augment_transform(aa, hparams)
            for op in ra.ops:
                name = getattr(op.aug_fn, '__name__', str(op.aug_fn))
                if name not in _TIMM_FUNCTIONS:
                    raise DataError(f'--data-pipeline gpu does not implement the RandAugment op {op.name} '
                                    f'(AUG.AUTO_AUGMENT {aa!r}): use --data-pipeline pil')
                op.aug_fn = _Record(OPS.index(_TIMM_FUNCTIONS[name]))
            self.randaugment, self.layers = ra, ra.num_layers
        self.erase_prob = config.AUG.REPROB
        self.erase_max_count = config.AUG.RECOUNT if config.AUG.REPROB > 0 else 0
        self.erase_mode = config.AUG.REMODE.lower()
        if self.erase_mode not in ('pixel', 'rand', 'const', ''):
            raise DataError(f"AUG.REMODE {config.AUG.REMODE!r} is not one of 'pixel', 'rand', 'const'")
        self.n_params = PROGRAM + 2 * self.layers + 4 * self.erase_max_count

    def sample(self, image: Image.Image) -> torch.Tensor:
        """The parameter row for one image; `image` may be a lazily opened PIL image (only its
        size is read)."""
        from timm.data.transforms import RandomResizedCropAndInterpolation
        # built as a list, one tensor at the end: a worker draws one row an image, and tensor
        # assignments cost more than the draws (65 -> 38 us a row on the CPU box)
        w, h = image.size
        if self.small:      # torchvision RandomCrop(size, padding=4).get_params on the padded image
            top = int(torch.randint(0, h + 8 - self.size + 1, (1,)))
            left = int(torch.randint(0, w + 8 - self.size + 1, (1,)))
            row = [top - 4, left - 4, self.size, self.size]
        else:
            row = list(RandomResizedCropAndInterpolation.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3)))
        row.append(float(torch.rand(1) < 0.5))               # torchvision RandomHorizontalFlip(0.5)
        if self.randaugment is not None:
            ra = self.randaugment
            ops = np.random.choice(ra.ops, ra.num_layers, replace=ra.choice_weights is None, p=ra.choice_weights)
            for op in ops:
                rec = op(None)                               # None back: the op's probability said no
                row.extend(rec if rec is not None else (SKIPPED, 0.0))
        for rect in self.erase_rects(self.size, self.size):
            row.extend(rect)
        row.extend([-1.0] * (self.n_params - len(row)))      # no rectangle in the remaining slots
        return torch.tensor(row, dtype=torch.float64)

    def erase_rects(self, img_h: int, img_w: int) -> list:
        """timm's RandomErasing(probability, min_area 0.02, max_area 1/3, aspect 0.3..1/0.3,
        min_count 1, max_count RECOUNT) rectangles, (top, left, h, w) each, drawn as timm draws them."""
        if self.erase_max_count == 0 or random.random() > self.erase_prob:
            return []
        count = 1 if self.erase_max_count == 1 else random.randint(1, self.erase_max_count)
        log_ratio = (math.log(0.3), math.log(1 / 0.3))
        rects = []
        for _ in range(count):
            for _attempt in range(10):
                target_area = random.uniform(0.02, 1 / 3) * img_h * img_w / count
                aspect = math.exp(random.uniform(*log_ratio))
                h = int(round(math.sqrt(target_area * aspect)))
                w = int(round(math.sqrt(target_area / aspect)))
                if w < img_w and h < img_h:
                    rects.append((random.randint(0, img_h - h), random.randint(0, img_w - w), h, w))
                    break
        return rects


# ----------------------------------------------------------------------------- worker side
class RawImages(torch.utils.data.Dataset):
    """Wraps an ImageFolder or ZipImageDataset: item = (payload, kind, params, label, index).

    kind 0: the file's bytes, for the device's JPEG decoder; kind 1: the decoded RGB image, HWC
    uint8 (PIL's convert('RGB')); kind 2: the same, already cut to the training crop box.
    params: TrainRecipe.sample's row (training) or the image's (h, w) (validation)."""

    def __init__(self, source, recipe=None, device_share: float = 0.0):
        self.source, self.recipe, self.device_share = source, recipe, device_share
        self.classes = source.classes

    def __len__(self) -> int:
        return len(self.source)

    def to_device(self, index: int) -> bool:
        """Whether a baseline JPEG goes to the device's decoder: a `device_share` of the indices, spread
        evenly over any run of them (the golden-ratio sequence), so every batch has about that share."""
        return (index * 0.6180339887498949) % 1.0 < self.device_share

    def name(self, index: int) -> str:
        s = self.source
        return s.samples[index][0] if not hasattr(s, 'zip_path') else f'{s.zip_path}@{s.samples[index][0]}'

    def read(self, index: int) -> bytes:
        s = self.source
        if hasattr(s, 'read_bytes'):
            return s.read_bytes(index)
        with open(s.samples[index][0], 'rb') as f:
            return f.read()

    def __getitem__(self, index: int):
        return self._decode(*self._head(index))

    def __getitems__(self, indices) -> list:
        """The items of a batch (the DataLoader's workers call this with the batch's indices), in two
        passes: first the Python work of every item in order (read the file, its header, the recipe's
        draws), then the decodes and crops. The draws come in the same order as item by item; keeping
        the decodes together makes a worker faster (the interpreter's state stays in cache instead of
        being evicted by each decode; measured by `benchmarks/bench_input.py --parts folder worker`)."""
        heads = [self._head(index) for index in indices]
        return [self._decode(*head) for head in heads]

    def _head(self, index: int) -> tuple:
        """(index, the file's bytes, the lazily opened image, the parameter row)."""
        try:
            data = self.read(index)
            image = Image.open(io.BytesIO(data))
            params = self.recipe.sample(image) if self.recipe else torch.tensor(
                [image.size[1], image.size[0]], dtype=torch.float64)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f'cannot read image {self.name(index)}: {e}. Remove or replace the file.') from None
        return index, data, image, params

    def _decode(self, index: int, data: bytes, image: Image.Image, params: torch.Tensor) -> tuple:
        label = self.source.samples[index][1]
        try:
            baseline = _baseline_jpeg(image, data)
            if baseline and self.to_device(index):
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), 0, params, label, index
            chw = _decode_as_pil(data) if baseline else None
            rgb = image.convert('RGB') if chw is None else None
        except Exception as e:
            raise DataError(f'cannot read image {self.name(index)}: {e}. Remove or replace the file.') from None
        # HWC either way (torchvision's CHW result is a view of its HWC buffer): the crop box is a view too,
        # and collate_raw copies it straight into the batch
        hwc = torch.from_numpy(np.array(rgb)) if chw is None else chw.permute(1, 2, 0)
        kind = 1
        if self.recipe is not None and not self.recipe.small:      # send only the crop box's pixels
            top, left, h, w = (int(v) for v in params[BOX])
            hwc, kind = hwc[top:top + h, left:left + w], 2
        return hwc, kind, params, label, index


def _baseline_jpeg(image: Image.Image, data: bytes) -> bool:
    """Baseline JPEGs in YCbCr or grey, complete (ending in the EOI marker): the files nvJPEG
    decodes, and libjpeg-turbo through torchvision on the host."""
    return (image.format == 'JPEG' and image.mode in ('RGB', 'L') and not image.info.get('progressive')
            and not image.info.get('progression') and data.rstrip(b'\0')[-2:] == b'\xff\xd9')


def _decode_as_pil(data: bytes) -> Optional[torch.Tensor]:
    """A baseline JPEG -> [3, H, W] uint8 through torchvision's libjpeg-turbo decode, where that gives
    PIL's convert('RGB') pixels (_libjpeg_is_pils); None where it does not or the decode fails (the
    caller then decodes with PIL, whose result or error is upstream's). Pillow's wheels decode with
    libjpeg-turbo too, with more copies around it: a worker's training item took 1.43-1.53 ms against
    1.51-1.59, 2.2-2.65 against 2.4-3.5 on a busy box (2-core CPU box, 2026-11-29; bench_input.py's
    worker part), and the crop is then a slice."""
    if not _libjpeg_is_pils():
        return None
    try:
        return _torchvision_decode(data)
    except Exception:
        return None


def _torchvision_decode(data: bytes) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


@functools.lru_cache(maxsize=1)
def _libjpeg_is_pils() -> bool:
    """Whether torchvision's host JPEG decode equals PIL's convert('RGB') here, checked once per
    process on small JPEGs of each kind it would take (4:2:0 and 4:4:4 colour, grey; odd sizes, so
    partial blocks and the chroma upsampling's edges count). A Pillow built on IJG's libjpeg 9, which
    upsamples chroma another way, fails it, and then PIL decodes everything."""
    try:
        rng = np.random.default_rng(0)
        ramp = np.linspace(0, 255, 45 * 37 * 3).reshape(37, 45, 3)
        pixels = np.clip(ramp + rng.normal(0, 40, ramp.shape), 0, 255).astype(np.uint8)
        for image, subsampling in ((Image.fromarray(pixels), 2), (Image.fromarray(pixels), 0),
                                   (Image.fromarray(pixels[..., 0]), 0)):
            buf = io.BytesIO()
            image.save(buf, 'JPEG', quality=90, subsampling=subsampling)
            data = buf.getvalue()
            pils = np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))
            if not np.array_equal(_torchvision_decode(data).permute(1, 2, 0).numpy(), pils):
                return False
    except Exception:
        return False
    return True


def collate_raw(batch):
    """-> (blob, sizes, shapes, kinds, params, labels, indices, seed). Every payload goes into one
    uint8 tensor `blob` (sizes: bytes per image; shapes: HWC of decoded payloads), which reaches the
    main process as one shared-memory segment. The rest is small and goes as numpy arrays and an int,
    pickled with the batch: each tensor would be a shared-memory segment of its own, each with a file
    descriptor to pass and map (about 1 ms of the main process's GIL a batch for seven of them, 16-core
    H100 host, 2026-12-07, py-spy). seed drives the batch's device RNG."""
    payloads, kinds, params, labels, indices = zip(*batch)
    sizes = np.array([p.numel() for p in payloads], dtype=np.int64)
    shapes = np.array([list(p.shape) if p.dim() == 3 else [0, 0, 0] for p in payloads], dtype=np.int64)
    total = int(sizes.sum())
    # in a worker the batch is made in shared memory, as torch's default_collate does, so that sending it
    # copies nothing; each payload (a view: a crop box of a decoded image) is copied into it once
    blob = _SegmentPool.blob(total) if torch.utils.data.get_worker_info() is not None else torch.empty(
        total, dtype=torch.uint8)
    offset = 0
    for p, n in zip(payloads, sizes.tolist()):
        blob[offset:offset + n].view(p.shape).copy_(p)
        offset += n
    return (blob, sizes, shapes, np.array(kinds, dtype=np.int64), torch.stack(params).numpy(),
            np.array(labels, dtype=np.int64), np.array(indices, dtype=np.int64), int(torch.randint(0, 2 ** 62, ())))


# batches each DataLoader worker prepares ahead (torch's prefetch_factor; its default). An experiment
# may raise it before the loaders are built (bench_input.py --main-prelude); _SegmentPool follows it
WORKER_PREFETCH = 2


class _SegmentPool:
    """A DataLoader worker's shared-memory segments for its batches, reused once the training process
    has copied a batch out (host_copy with release). Writing a batch into a new segment has the kernel
    zero every page as it is first touched: 150 us an image against 40 into a reused one (2-core CPU
    box, 2026-12-07). A pooled segment is one byte longer than the largest batch it held; that last byte
    is 1 while the training process may read it and 0 once it has released it (shared memory: both
    processes see it). A segment nobody releases is never reused; past `size` of them in use a batch
    gets a segment of its own, as without the pool (so also where the DeviceLoader does not pin, a CPU
    run: nothing is released there). One pool a worker process."""
    size: Optional[int] = None      # None: a worker's batches in flight (WORKER_PREFETCH queued, one
    segments: list = []             # copied, one built); the UntypedStorages, this process's

    @classmethod
    def limit(cls) -> int:
        return WORKER_PREFETCH + 2 if cls.size is None else cls.size

    @classmethod
    def blob(cls, total: int) -> torch.Tensor:
        k = next((k for k, seg in enumerate(cls.segments) if seg[seg.nbytes() - 1] == 0), None)
        if k is not None:
            if cls.segments[k].nbytes() <= total:              # too small: a larger one in its place
                cls.segments[k] = torch.UntypedStorage._new_shared(total + total // 8 + 1)
        elif len(cls.segments) < cls.limit():
            k = len(cls.segments)
            cls.segments.append(torch.UntypedStorage._new_shared(total + total // 8 + 1))
        else:
            return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(total))
        seg = cls.segments[k]
        seg[seg.nbytes() - 1] = 1
        return torch.empty(0, dtype=torch.uint8).set_(seg, 0, (total,))


def _release(blob: torch.Tensor) -> bool:
    """Hands a pooled worker segment back to its worker (see _SegmentPool): False for any other blob."""
    if not _pooled(blob):
        return False
    storage = blob.untyped_storage()
    storage[storage.nbytes() - 1] = 0
    return True


_PAGE, _MADV_REMOVE = mmap.PAGESIZE, 9


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith('linux') else None
    except OSError:
        return None


def host_copy(blob: torch.Tensor, pin: bool = True, release: bool = False) -> torch.Tensor:
    """A copy of a raw batch's blob, page-locked (pin; from torch's caching host allocator) so that its
    copy to the GPU is truly asynchronous. release: blob came from a DataLoader worker (shared memory)
    and is not read again: a pooled segment goes back to its worker (_SegmentPool), any other has its
    pages freed here, in a ctypes call, which drops the GIL. Left to the tensor's destructor, the free
    holds the GIL: about 5 ms for a 38 MB batch on a 16-core H100 host (2026-12-07, py-spy), the
    training step's launches stalled meanwhile."""
    out = torch.empty(blob.shape, dtype=blob.dtype, pin_memory=pin)
    out.copy_(blob)
    if release and _release(blob):
        return out
    libc = _libc()
    if release and blob.is_shared() and libc is not None:
        storage = blob.untyped_storage()
        start = -(-storage.data_ptr() // _PAGE) * _PAGE       # whole pages inside the storage only
        end = (storage.data_ptr() + storage.nbytes()) // _PAGE * _PAGE
        if end > start:
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_REMOVE)
    return out


# whether the DeviceLoader page-locks pooled worker segments where they lie (_LockedSegments) instead of
# copying each batch into pinned memory (host_copy): True, False, or 'nvjpeg' (the default: where nvJPEG
# decodes some of the files, EXTRA.JPEG_DECODE device). One H100 host, 2026-12-07, the pipelines alone:
# val with nvJPEG 12316 img/s against 10900 (1.13x), with nvJPEG taking 70% 12226 against 8254; with the
# workers' decode no gain (train 4270 / 3744 against 4131 / 4081, val 3895 / 3833 against 4267 / 3950:
# their decode is the limit, and each epoch's new workers bring new segments to register), so there the
# copy stays. An experiment sets it (bench_input.py --segments, or --main-prelude for main.py)
LOCK_SEGMENTS = 'nvjpeg'

# whether JPEGs for the device go to nvJPEG's hardware engines through data/nvjpeg.py (one call a group,
# straight into the batch's buffer), else through torchvision's decode_jpeg; where there are no engines
# (or nvJPEG refuses a call) torchvision's call decodes them anyway. An experiment sets it
# (bench_input.py --main-prelude)
HARDWARE_DECODE = True
_PORTABLE = 1          # CU_MEMHOSTREGISTER_PORTABLE: page-locked for every CUDA context of the process


@functools.lru_cache(maxsize=1)
def _libcuda():
    try:
        return ctypes.CDLL('libcuda.so.1') if sys.platform.startswith('linux') else None
    except OSError:
        return None


def _pooled(blob: torch.Tensor) -> bool:
    """Whether blob lies in a pooled worker segment not yet released (see _SegmentPool)."""
    storage = blob.untyped_storage()
    return blob.is_shared() and storage.nbytes() > blob.numel() and storage[storage.nbytes() - 1] == 1


class _LockedSegments:
    """The training process's side of the workers' segment pools on CUDA: each pooled segment is
    page-locked once, where it lies (cuMemHostRegister), and kept mapped, so that a batch reaches the
    GPU in one DMA from the worker's own memory: no copy into pinned memory on the host (host_copy:
    about 72 MB a val batch of whole decoded images, 38 MB a train batch of crop boxes, on one thread).
    Kept mapped, a segment that comes back with a later batch is the same storage (torch's sharing
    looks a received segment up by its inode), at the same address: registered once. A segment goes
    back to its worker only once the copies reading it are done (an event on the decode stream,
    `copied` / `reap`). At most `capacity` segments stay registered (the least recently used are let
    go: a worker replaces a segment grown too small, and the old one never comes back). If the driver
    refuses to register (or has no driver API here), every batch takes host_copy's path."""

    def __init__(self, capacity: int):
        self.capacity, self.storages, self.pending = capacity, {}, []     # storages: address -> storage
        self.held = collections.Counter()            # addresses of the segments taken and not given back
        # why every batch takes host_copy's path, where it does: main.py says so once a run (refusal_note)
        self.refused = None if _libcuda() is not None else 'no CUDA driver library (libcuda.so.1) found'
        self.registered = self.taken = 0             # segments registered, batches taken (tests, benchmarks)

    def take(self, blob: torch.Tensor) -> bool:
        """True when blob lies in a registered pooled segment (registering it now if new): it may then
        be copied to the GPU asynchronously as it is, and must be handed to `copied` after."""
        if self.refused or not _pooled(blob):
            return False
        storage = blob.untyped_storage()
        key = storage.data_ptr()
        if key in self.storages:
            self.storages[key] = self.storages.pop(key)          # most recently used last
            self.taken, self.held[key] = self.taken + 1, self.held[key] + 1
            return True
        # a runtime call first: it makes the device's primary context current in this thread, which the
        # driver's register needs (a thread whose only CUDA work so far was taking streams may have none)
        torch.cuda.current_stream().query()
        status = _libcuda().cuMemHostRegister_v2(ctypes.c_void_p(key), ctypes.c_size_t(storage.nbytes()), _PORTABLE)
        if status:
            self.refused = f'the driver refused to page-lock a {storage.nbytes() >> 20} MB segment (CUresult {status})'
            return False
        self.storages[key] = storage
        self.registered, self.taken, self.held[key] = self.registered + 1, self.taken + 1, self.held[key] + 1
        for old in [k for k in self.storages if not self.held[k]][:max(0, len(self.storages) - self.capacity)]:
            _libcuda().cuMemHostUnregister(ctypes.c_void_p(old))
            del self.storages[old]
        return True

    def refusal_note(self) -> Optional[str]:
        """A line for the log where the segments could not be page-locked, else None."""
        if self.refused is None:
            return None
        return (f"Note: the input workers' batches are copied into pinned memory one by one: {self.refused}. "
                'Correct, but slower with EXTRA.JPEG_DECODE device (nvJPEG)')

    def copied(self, blobs: list, stream: torch.cuda.Stream) -> None:
        """The work reading `blobs` is queued on `stream`: they go back to their workers once it is done.
        The group before is waited for if still pending, so that a worker's segments in flight stay
        those its pool counts on (the prefetched, the one being built, one here)."""
        if blobs:
            event = torch.cuda.Event()
            event.record(stream)
            self.pending.append((event, blobs))
        self.reap(keep=1)

    def reap(self, keep: int = 0) -> None:
        """Gives back the segments whose copies are done, and waits for all but the newest `keep` groups."""
        while self.pending and (len(self.pending) > keep or self.pending[0][0].query()):
            event, blobs = self.pending.pop(0)
            event.synchronize()
            for blob in blobs:
                _release(blob)
                self.held[blob.untyped_storage().data_ptr()] -= 1

    def close(self) -> None:
        self.reap()
        for key in self.storages:
            _libcuda().cuMemHostUnregister(ctypes.c_void_p(key))
        self.storages.clear()


# RandAugment ops by how they run on a batch: one affine resample per layer for every geometric op,
# one table lookup per layer for every per-pixel op, one call per layer for each of the others.
_GEOMETRIC, _TABLE = set(T.AFFINE_OPS), set(T.TABLE_OPS)


class _Plan:
    """Host-side segments of one flat buffer, uploaded in one copy: add() returns a segment's slice."""

    def __init__(self):
        self.parts, self.size = [], 0

    def add(self, values) -> slice:
        a = np.asarray(values).reshape(-1)
        self.parts.append(a)
        self.size += a.size
        return slice(self.size - a.size, self.size)

    def upload(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        host = torch.from_numpy(np.concatenate(self.parts)) if self.parts else torch.empty(0)
        return upload(host.to(dtype), device)


class DeviceTransform:
    """A raw batch -> (normalised float32 images [B, 3, S, S], labels), on `device`, in two
    stages: `decode` (nvJPEG) and `finish` (crop + resize, flip, RandAugment, normalise, erase)."""

    def __init__(self, dataset: RawImages, device: torch.device, img_size: int, train: bool,
                 test_crop: bool = True):
        self.dataset, self.device, self.size, self.train, self.test_crop = dataset, device, img_size, train, test_crop
        self.recipe = dataset.recipe
        self.mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device)
        self.std = torch.tensor(IMAGENET_DEFAULT_STD, device=device)
        self.fill = aa_fill()
        # RandAugment's layers through kernels/colour_ops.py (three launches a layer) on CUDA; the
        # per-op torch path elsewhere (tests turn the kernels on under Triton's CPU interpreter)
        self.colour_kernels = device.type == 'cuda'
        self.normalize_kernel = device.type == 'cuda'      # the same for kernels/normalize_erase.py
        self._hardware, self.engines_note = None, None     # see _engines

    def __call__(self, *raw):
        return self.finish(self.decode(*raw))

    def decode(self, blob, sizes, shapes, kinds, params, labels, indices, seed):
        """-> (images, kind, params, labels, indices, seed); images: [3, h, w] uint8 tensors on the device,
        or a Packed batch of them (every image decoded in the workers)."""
        return self.decode_batches([(blob, sizes, shapes, kinds, params, labels, indices, seed)])[0]

    def decode_batches(self, raws: list) -> list:
        """decode() for several raw batches, with one nvJPEG call for all their JPEGs. A call has a
        fixed cost besides its per-image one (one H100, 2026-11-28: 14,298 img/s at 128 files a
        call, 17,822 at 256, i.e. ~3.6 ms a call + ~42 us an image)."""
        batches, pending = [None] * len(raws), []
        for k, (blob, sizes, shapes, kinds, params, labels, indices, seed) in enumerate(raws):
            params, labels, indices = torch.as_tensor(params), torch.as_tensor(labels), torch.as_tensor(indices)
            kind = kinds.tolist()
            if 0 not in kind:
                # the workers decoded every image (the default): the batch reaches the device in one copy
                # and stays one buffer, which the resize kernels read in place (HWC)
                offsets = [0] + list(itertools.accumulate(sizes.tolist()))[:-1]
                hw = [s[:2] for s in shapes.tolist()]
                batches[k] = (Packed(blob.to(self.device, non_blocking=True), offsets, hw), kind, params, labels,
                              indices, seed)
            else:
                pending.append((k, (blob, sizes, shapes, kind, params, labels, indices, seed)))
        if pending:
            decoded = self._decode_engines(pending) if HARDWARE_DECODE else None
            if decoded is None:
                decoded = self._decode_torchvision(pending)
            for k, batch in decoded:
                batches[k] = batch
        return batches

    def _engines(self):
        """This transform's HardwareDecoder (data/nvjpeg.py), made on first use; None where there is none
        (`engines_note` says why)."""
        if self._hardware is None:          # not asked yet (False: asked, none)
            if self.device.type != 'cuda':
                decoder, self.engines_note = None, 'not a CUDA device'
            else:
                from .nvjpeg import hardware_decoder
                with torch.cuda.device(self.device):
                    decoder, self.engines_note = hardware_decoder()
            self._hardware = decoder or False
        return self._hardware or None

    def _decode_engines(self, pending: list) -> Optional[list]:
        """The batches with JPEGs for the device, each as one Packed buffer: the workers' decoded images
        where the batch's copy put them, and every JPEG the engines take decoded in one nvJPEG call
        into its place after them; JPEGs they do not take go through torchvision's decode_jpeg and a
        copy. None where there are no engines or nvJPEG refuses the call (the caller then decodes
        the batches with torchvision's call)."""
        engines = self._engines()
        if engines is None:
            return None
        try:
            return self._decode_engines_or_raise(engines, pending)
        except RuntimeError:        # a header nvJPEG cannot read, or a call it refuses
            return None

    def _decode_engines_or_raise(self, engines, pending: list) -> list:
        from .nvjpeg import aligned
        stream = torch.cuda.current_stream(self.device)
        out, sources, lengths, targets, widths, others = [], [], [], [], [], []
        for k, (blob, sizes, shapes, kind, params, labels, indices, seed) in pending:
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
            base = blob.data_ptr()
            end = aligned(blob.numel()) if any(kind) else 0       # the workers' pixels, as the batch holds them
            offsets, hw, jpegs = [], [], []
            for i, (k_i, start, size) in enumerate(zip(kind, starts, sizes.tolist())):
                if k_i:
                    offsets.append(start)
                    hw.append(shapes[i][:2].tolist())
                    continue
                h, w, css = engines.info(base + start, size)
                offsets.append(end)
                hw.append([h, w])
                jpegs.append((i, start, size, css, end, h, w))
                end = aligned(end + h * w * 3)
            buf = torch.empty(end, dtype=torch.uint8, device=self.device)
            if any(kind):
                buf[:blob.numel()].copy_(blob, non_blocking=True)
            for i, start, size, css, offset, h, w in jpegs:
                if engines.supported(base + start, size, css):
                    sources.append(base + start)
                    lengths.append(size)
                    targets.append(buf.data_ptr() + offset)
                    widths.append(w)
                else:
                    others.append((blob[start:start + size], buf, offset, h, w, indices[i]))
            out.append((k, (Packed(buf, offsets, hw), kind, params, labels, indices, seed)))
        if sources:
            engines.decode(sources, lengths, targets, widths, stream.cuda_stream)
        if others:
            for (_, buf, offset, h, w, _), img in zip(others, self._jpegs([o[0] for o in others],
                                                                           [o[5] for o in others])):
                buf[offset:offset + h * w * 3].view(h, w, 3).copy_(img.permute(1, 2, 0))
        # nvJPEG reads the JPEGs from the host buffers as its work runs on the stream: they must outlive
        # it (the batch's pinned memory may be reused, or its worker segment handed back, once we return)
        stream.synchronize()
        return out

    def _jpegs(self, payloads: list, indices: list) -> list:
        """torchvision's nvJPEG call for these JPEGs ([3, H, W] uint8 on the device); where it fails (one
        bad file fails the whole call) each one on the host, whose error names the file."""
        from torchvision.io import ImageReadMode, decode_jpeg
        try:
            return decode_jpeg(payloads, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return [self._decode_on_host(payload, int(index)) for payload, index in zip(payloads, indices)]

    def _decode_torchvision(self, pending: list) -> list:
        """The batches with JPEGs for the device, each image a tensor: the workers' decoded pixels as views
        of the batch's copy, the JPEGs through one torchvision decode_jpeg call."""
        out, jobs = [], []       # jobs: (images list, position, payload, index) for nvJPEG
        for k, (blob, sizes, shapes, kind, params, labels, indices, seed) in pending:
            host = torch.split(blob, sizes.tolist())
            # decoded pixels reach the device in one copy of the whole batch (with the compressed bytes of
            # the images nvJPEG takes: small next to pixels), each image an HWC view of it; nvJPEG reads
            # its files from the host
            pixels = torch.split(blob.to(self.device, non_blocking=True), sizes.tolist()) if any(kind) else host
            images = [None] * len(host)
            for i, k_i in enumerate(kind):
                if k_i == 0:
                    jobs.append((images, i, host[i], indices[i]))
                else:
                    images[i] = pixels[i].view(shapes[i].tolist()).permute(2, 0, 1)
            out.append((k, (images, kind, params, labels, indices, seed)))
        for (images, i, _, _), img in zip(jobs, self._jpegs([j[2] for j in jobs], [j[3] for j in jobs])):
            images[i] = img
        return out

    def _decode_on_host(self, payload: torch.Tensor, index: int) -> torch.Tensor:
        try:
            rgb = Image.open(io.BytesIO(payload.numpy().tobytes())).convert('RGB')
        except Exception as e:
            raise DataError(f'cannot read image {self.dataset.name(index)}: {e}. Remove or replace the file.') from None
        return torch.from_numpy(np.asarray(rgb).copy()).to(self.device).permute(2, 0, 1)

    def finish(self, decoded):
        images, kind, params, labels, indices, seed = decoded
        if self.train and self.recipe.small:        # padded random crop, no resampling, then the flip
            rows = params.tolist()
            crops = [T.crop_padded(img, *(int(v) for v in row[:4])) for img, row in zip(images, rows)]
            x = torch.stack([c.flip(-1) if row[FLIP] > 0 else c for c, row in zip(crops, rows)]).float()
        else:
            x = self._resize(images, kind, params)
        if self.train:
            x = self._augment(x, params)
        return self._normalize_erase(x, params, int(seed)), upload(labels, self.device)

    def _normalize_erase(self, x: torch.Tensor, params: torch.Tensor, seed: int) -> torch.Tensor:
        """ToTensor + Normalize, then (training) RandomErasing with the rectangles in params: one kernel
        on CUDA (kernels/normalize_erase.py), the torch ops elsewhere."""
        B, count, mode = x.shape[0], 0, 'const'
        if self.train and self.recipe.erase_max_count:
            count, mode = self.recipe.erase_max_count, self.recipe.erase_mode or 'const'
        rects = params[:, PROGRAM + 2 * self.recipe.layers:] if count else params.new_empty(B, 0)
        rects = rects.reshape(B, count, 4)
        if self.normalize_kernel:
            return normalize_erase_fwd(x, self.mean, self.std, rects, mode, seed)
        return normalize_erase_ref(x, self.mean, self.std, rects, mode, torch.Generator(self.device).manual_seed(seed))

    def _resize(self, images: list, kind: list, params: torch.Tensor) -> torch.Tensor:
        """Train: each crop box resized to S x S. Val: resize the shorter side to 256/224 S, then the
        centre S x S (TEST.CROP), or resize to S x S. On CUDA one batched kernel pair
        (kernels/crop_resize.py) for the whole batch; elsewhere one interpolate per image."""
        from kernels.crop_resize import crop_resize_fwd, crop_resize_ref
        S, rows = self.size, params.tolist()
        hw = images.hw if isinstance(images, Packed) else [img.shape[1:] for img in images]
        meta = []
        for (H, W), k, row in zip(hw, kind, rows):
            if self.train:              # the crop box, resized to S x S and flipped as drawn
                top, left, h, w = (0, 0, H, W) if k == 2 else (int(v) for v in row[:4])
                meta.append([0, H, W, top, left, h, w, S, S, 0, 0, int(row[FLIP] > 0)])
            elif self.test_crop:
                rh, rw = T.resize_shorter(H, W, int((256 / 224) * S))
                meta.append([0, H, W, 0, 0, H, W, rh, rw, *T.center_crop_box(rh, rw, S), 0])
            else:
                meta.append([0, H, W, 0, 0, H, W, S, S, 0, 0, 0])
        if self.device.type == 'cuda':
            return crop_resize_fwd(images, meta, S)
        return crop_resize_ref(images, meta, S)

    def _augment(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Each RandAugment layer (the flip that comes first is done: the resize writes flipped images).
        Within a layer every image gets its own op; on CUDA the whole layer, geometric ops included,
        is the three kernels of kernels/colour_ops.py for the batch; elsewhere ops are grouped: one
        affine resample for all the geometric ops, one table lookup for all the per-pixel ops and one
        call per other op.
        The batch's whole plan (which images each group takes, and their arguments, tables and
        affine coefficients) is built on the host and reaches the device in two copies: one
        pageable copy costs about as much host time as a launch, and there were about 40 a batch."""
        from kernels.colour_ops import AFFINE, CODES, NONE, TABLE, colour_ops
        B, S_h, S_w = x.shape[0], x.shape[2], x.shape[3]
        index, value = _Plan(), _Plan()
        groups = []            # (kind, op, slice of its images, slice of its values)
        for layer in range(self.recipe.layers):
            col = PROGRAM + 2 * layer
            ids, args = params[:, col].long().tolist(), params[:, col + 1].tolist()
            names = [OPS[i] if i != SKIPPED else None for i in ids]
            if self.colour_kernels:
                # the whole layer in three launches for the batch (kernels/colour_ops.py): an op code, a
                # blend factor, a table (table ops) and six affine coefficients (geometric ops) per image
                codes = [AFFINE if n in _GEOMETRIC else CODES.get(n, NONE) for n in names]
                if any(codes):
                    tables, matrix = np.zeros((B, 256)), np.zeros((B, 6))
                    for i, c in enumerate(codes):
                        if c == TABLE:
                            tables[i] = T.lookup_table(names[i], args[i])
                        elif c == AFFINE:
                            matrix[i] = T.affine_coefficients(names[i], args[i], S_w, S_h)
                    groups.append(('layer', None, index.add(codes), value.add(np.concatenate(
                        [args, tables.ravel(), matrix.ravel()]))))
                continue
            geo = [i for i, n in enumerate(names) if n in _GEOMETRIC]
            if geo:
                coef = [c for i in geo for c in T.affine_coefficients(names[i], args[i], S_w, S_h)]
                groups.append(('affine', None, index.add(geo), value.add(coef)))
            table = [i for i, n in enumerate(names) if n in _TABLE]
            if table:
                luts = np.concatenate([T.lookup_table(names[i], args[i]) for i in table])
                groups.append(('lookup', None, index.add(table), value.add(luts)))
            for op in sorted({n for n in names if n is not None} - _GEOMETRIC - _TABLE):
                sel = [i for i, n in enumerate(names) if n == op]
                groups.append(('op', op, index.add(sel), value.add([args[i] for i in sel])))
        idx_dev, val_dev = index.upload(torch.int64, self.device), value.upload(torch.float64, self.device)
        for kind, op, images, values in groups:
            idx, val = idx_dev[images], val_dev[values]
            if kind == 'layer':
                x = colour_ops(x, idx, val[:B], val[B:257 * B].view(B, 256), val[257 * B:].view(B, 6), self.fill)
            elif kind == 'affine':
                x[idx] = T.affine(x[idx], val.view(-1, 6), self.fill)
            elif kind == 'lookup':
                x[idx] = T.lookup(x[idx], val.view(-1, 256).float())       # the tables are whole numbers
            else:
                x[idx] = getattr(T, op)(x[idx], val)
        return x

    def apply(self, op: str, x: torch.Tensor, arg: torch.Tensor) -> torch.Tensor:
        """One RandAugment op on a sub-batch with per-image level arguments, by the same route
        `_augment` takes (tests call it op by op)."""
        S_h, S_w = x.shape[2], x.shape[3]
        a = arg.tolist()
        if op in _GEOMETRIC:
            m = torch.tensor([T.affine_coefficients(op, v, S_w, S_h) for v in a], dtype=torch.float64)
            return T.affine(x, m.to(x.device), self.fill)
        if op in _TABLE:
            return T.lookup(x, torch.from_numpy(np.stack([T.lookup_table(op, v) for v in a])).to(x.device))
        return getattr(T, op)(x, arg)


class DeviceLoader:
    """Iterates a DataLoader of raw batches and yields (images, labels) on the device.

    On CUDA two background threads, each on its own stream, run the transform's stages a few
    batches ahead of the training step: one decodes (nvJPEG blocks its thread, not the others),
    one crops, resizes and augments. Each hand-over waits on the producer's event, and tensors
    made on one stream are marked (record_stream) for the one that uses them. Elsewhere it
    runs inline."""

    # the augment stage's streams, used in turn, and their priority (lower is higher). One stream at the
    # default priority: two at high priority let batches' chains of small kernels wait for SMs side by
    # side, but main.py on JPEGs did not gain (one H200, 2026-12-07: 5314 img/s against 5707-6424 in the
    # same call; run_all.sh input-streams)
    finish_streams, finish_priority = 1, 0

    def __init__(self, loader, transform: DeviceTransform, prefetch: int = 3, decode_batches: int = 1,
                 pin_memory: bool = True):
        self.loader, self.transform, self.prefetch, self.pin_memory = loader, transform, prefetch, pin_memory
        self.decode_batches = decode_batches       # raw batches per nvJPEG call (EXTRA.DECODE_BATCHES)
        self.locked = None                         # the last iteration's _LockedSegments, where it had one
        self.dataset, self.sampler, self.batch_size = loader.dataset, loader.sampler, loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def notes(self) -> list:
        """Lines for the log where this loader runs slower than it could, and why: the workers' segments not
        page-locked, nvJPEG's engines absent (torchvision's call decodes instead)."""
        lines = [self.locked.refusal_note()] if self.locked is not None else []
        if self.transform.engines_note is not None and self.transform.device.type == 'cuda':
            lines.append(f"nvJPEG's hardware engines are not used here ({self.transform.engines_note}): "
                         f"torchvision's decode_jpeg decodes the JPEGs for the GPU, more slowly")
        return [line for line in lines if line]

    @property
    def queued(self) -> int:
        """Batches the two device stages hold ahead of the consumer (a queue and one in hand each; none
        where the transform runs inline)."""
        return 2 * (self.prefetch + 1) if self.transform.device.type == 'cuda' else 0

    def __iter__(self):
        device = self.transform.device
        if device.type != 'cuda':
            for raw in self.loader:
                yield self.transform(*raw)
            return
        stop = threading.Event()
        decoded, ready = queue.Queue(maxsize=self.prefetch), queue.Queue(maxsize=self.prefetch)
        done = object()

        def put(q, item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def get(q):
            while not stop.is_set():
                try:
                    return q.get(timeout=0.1)
                except queue.Empty:
                    continue
            return done

        def stage(source, fn, sink, streams: int = 1, priority: int = 0):
            """Runs fn over source's items on `streams` streams in turn: a stage whose kernels are small
            and wait for SMs behind the training step's has its batches in flight side by side."""
            try:
                # one intra-op thread here, as torch's own pin-memory thread: a large host copy (host_copy)
                # would otherwise wake an OpenMP team of every core, beside the DataLoader's workers
                torch.set_num_threads(1)
                with torch.cuda.device(device):
                    pool = [torch.cuda.Stream(device, priority=priority) for _ in range(streams)]
                    for k, item in enumerate(source()):
                        if item is done:
                            break
                        if isinstance(item, BaseException):
                            raise item
                        stream = pool[k % streams]
                        with torch.cuda.stream(stream):
                            outs = fn(item, stream)            # a list: one item per batch
                            event = torch.cuda.Event()
                            event.record(stream)
                        for out in outs:
                            if not put(sink, (out, event)):
                                return
                put(sink, done)
            except BaseException as e:     # handed on, raised in the consumer
                put(sink, e)

        def read_raw():                # groups of decode_batches raw batches (the last may be short)
            group = []
            for raw in self.loader:
                # pinned here, not in the DataLoader's pin thread: see host_copy, and _LockedSegments
                if self.pin_memory and not (locked is not None and locked.take(raw[0])):
                    raw = (host_copy(raw[0], release=True),) + tuple(raw[1:])
                group.append(raw)
                if len(group) == self.decode_batches:
                    yield group
                    group = []
            if group:
                yield group

        def read_decoded():
            while True:
                yield get(decoded)

        def decode(group, stream):
            out = self.transform.decode_batches(group)
            if locked is not None:      # the segments read by this group's copies and decodes, once done
                locked.copied([raw[0] for raw in group if _pooled(raw[0])], stream)
            return out

        def finish(item, stream):
            out, event = item
            stream.wait_event(event)
            for img in ([out[0].buf] if isinstance(out[0], Packed) else out[0]):
                img.record_stream(stream)
            return [self.transform.finish(out)]

        # a worker's pooled segments (_SegmentPool.limit()), twice over: room for the ones a worker replaced
        lock = self.dataset.device_share > 0 if LOCK_SEGMENTS == 'nvjpeg' else LOCK_SEGMENTS
        locked = _LockedSegments(2 * _SegmentPool.limit() * max(1, self.loader.num_workers)) if (
            self.pin_memory and lock) else None
        self.locked = locked
        threads = [threading.Thread(target=stage, args=(read_raw, decode, decoded), daemon=True),
                   threading.Thread(target=stage, args=(read_decoded, finish, ready, self.finish_streams,
                                                        self.finish_priority), daemon=True)]
        for t in threads:
            t.start()
        try:
            while True:
                item = get(ready)
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                (images, labels), event = item
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                images.record_stream(current)
                labels.record_stream(current)
                yield images, labels
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=10)
            if locked is not None:
                with torch.cuda.device(device):
                    locked.close()


def build_gpu_loader(dataset, config, device: torch.device, train: bool, sampler):
    """The DataLoader over raw items, wrapped in a DeviceLoader."""
    recipe = TrainRecipe(config) if train else None
    share = config.EXTRA.DEVICE_DECODE_SHARE if device.type == 'cuda' and config.EXTRA.JPEG_DECODE == 'device' else 0.0
    raw = RawImages(dataset, recipe, share)
    # DATA.PIN_MEMORY: the DeviceLoader pins each batch itself (host_copy)
    loader = torch.utils.data.DataLoader(
        raw, sampler=sampler, batch_size=config.DATA.BATCH_SIZE, num_workers=config.DATA.NUM_WORKERS,
        pin_memory=False, drop_last=train, collate_fn=collate_raw, persistent_workers=False,
        prefetch_factor=WORKER_PREFETCH if config.DATA.NUM_WORKERS else None)
    transform = DeviceTransform(raw, device, config.DATA.IMG_SIZE, train, config.TEST.CROP)
    batches_a_call = config.EXTRA.DECODE_BATCHES if train else config.EXTRA.VAL_DECODE_BATCHES
    return raw, DeviceLoader(loader, transform, decode_batches=batches_a_call,
                             pin_memory=config.DATA.PIN_MEMORY and device.type == 'cuda')


class SyntheticOnDevice:
    """DATA.DATASET synthetic with --data-pipeline gpu: the synthetic images made once on the device
    (a pool, as SyntheticDataset), labels per index; no workers, no host-to-device copies."""

    def __init__(self, dataset, batch_size: int, sampler, device: torch.device, drop_last: bool):
        self.dataset, self.batch_size, self.sampler, self.device, self.drop_last = (
            dataset, batch_size, sampler, device, drop_last)
        g = torch.Generator().manual_seed(dataset.seed * 1_000_003)
        n, s = min(dataset.size, dataset.POOL), dataset.img_size
        self.pool = torch.randn(n, 3, s, s, generator=g).to(device)
        self.labels = dataset._labels.to(device)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        # the epoch's order reaches the device once: no host-to-device copy per step
        order = torch.tensor(list(iter(self.sampler)), dtype=torch.long).to(self.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.pool[idx % len(self.pool)], self.labels[idx]
