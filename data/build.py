"""Datasets, transforms, samplers and mixup, as upstream builds them (timm + torchvision).

DATA.DATASET: 'imagenet' / 'imagenet22K' read an ImageFolder tree `<DATA_PATH>/{train,val}/<class>/*`
(or, with --zip, upstream's `train.zip` + `train_map.txt` layout, see `zipdata.py`);
'synthetic' makes random images in memory (EXTRA.SYNTHETIC_TRAIN_SIZE / _VAL_SIZE) for throughput
and benchmarks.
"""
import os
from typing import Optional

import torch
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from utils import rank as get_rank, world_size

from .samplers import ShardSampler


class DataError(ValueError):
    """The dataset a config points to is missing or unusable."""


def _interp(name: str) -> InterpolationMode:
    return {'bicubic': InterpolationMode.BICUBIC, 'bilinear': InterpolationMode.BILINEAR,
            'nearest': InterpolationMode.NEAREST}.get(name, InterpolationMode.BICUBIC)


def build_transform(is_train: bool, config):
    img_size = config.DATA.IMG_SIZE
    if is_train:
        t = create_transform(
            input_size=img_size, is_training=True,
            color_jitter=config.AUG.COLOR_JITTER if config.AUG.COLOR_JITTER > 0 else None,
            auto_augment=config.AUG.AUTO_AUGMENT if config.AUG.AUTO_AUGMENT not in ('', 'none', None) else None,
            re_prob=config.AUG.REPROB, re_mode=config.AUG.REMODE, re_count=config.AUG.RECOUNT,
            interpolation=config.DATA.INTERPOLATION)
        if img_size <= 32:
            # As upstream: small images get a padded random crop instead of a random-resized crop.
            t.transforms[0] = transforms.RandomCrop(img_size, padding=4)
        _keep_zero_bit_posterize(t)
        return t
    t = []
    if config.TEST.CROP:
        size = int((256 / 224) * img_size)
        t += [transforms.Resize(size, interpolation=_interp(config.DATA.INTERPOLATION)),
              transforms.CenterCrop(img_size)]
    else:
        t += [transforms.Resize((img_size, img_size), interpolation=_interp(config.DATA.INTERPOLATION))]
    t += [transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    return transforms.Compose(t)


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize with its old meaning at every Pillow version: keep the top `bits_to_keep`
    bits of each channel; 0 bits is a black image (Pillow < 13 returned one, Pillow 13 raises).
    RandAugment's increasing posterize asks for 0 bits whenever magnitude noise reaches 10."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def _keep_zero_bit_posterize(transform) -> None:
    """Point every timm posterize op inside `transform` (RandAugment, AutoAugment) at `posterize`."""
    from timm.data import auto_augment
    for t in getattr(transform, 'transforms', [transform]):
        ops = list(getattr(t, 'ops', []))
        for sub_policy in getattr(t, 'policy', []):        # AutoAugment: a list of sub-policies
            ops.extend(sub_policy)
        for op in ops:
            if getattr(op, 'aug_fn', None) is auto_augment.posterize:
                op.aug_fn = posterize


def pil_loader(path: str) -> Image.Image:
    """Open an image as RGB; a corrupt file is an error that names it."""
    try:
        with open(path, 'rb') as f:
            img = Image.open(f)
            return img.convert('RGB')
    except Exception as e:
        raise DataError(f'cannot read image {path}: {e}. Remove or replace the file.') from None


class SyntheticDataset(torch.utils.data.Dataset):
    """Random normalised images with random labels, deterministic per index; nothing on disk.

    Images come from a pool of POOL random images made once per worker (drawing 150K normal
    values per 224px image capped the loader near 1400 img/s, below what one H100 trains);
    labels are drawn per index.
    """
    POOL = 64

    def __init__(self, size: int, img_size: int, num_classes: int, seed: int = 0):
        self.size, self.img_size, self.num_classes, self.seed = size, img_size, num_classes, seed
        self.classes = [str(i) for i in range(num_classes)]
        self._pool = None
        self._labels = torch.randint(num_classes, (size,), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        if self._pool is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003)
            self._pool = torch.randn(min(self.size, self.POOL), 3, self.img_size, self.img_size, generator=g)
        return self._pool[index % len(self._pool)], int(self._labels[index])


def build_dataset(is_train: bool, config):
    """(dataset, class count) for the train or val split."""
    name = config.DATA.DATASET
    if name == 'synthetic':
        size = config.EXTRA.SYNTHETIC_TRAIN_SIZE if is_train else config.EXTRA.SYNTHETIC_VAL_SIZE
        ds = SyntheticDataset(size, config.DATA.IMG_SIZE, config.MODEL.NUM_CLASSES,
                              seed=0 if is_train else 1)
        return ds, config.MODEL.NUM_CLASSES
    if name not in ('imagenet', 'imagenet22K'):
        raise DataError(f"DATA.DATASET {name!r} is not supported: use 'imagenet', 'imagenet22K' "
                        f"(ImageFolder layout) or 'synthetic'")
    root = config.DATA.DATA_PATH
    if not root:
        raise DataError("no data path: pass --data-path <dir> holding train/ and val/ "
                        "(ImageFolder layout), or use --opts DATA.DATASET synthetic")
    split = 'train' if is_train else 'val'
    transform = build_transform(is_train, config)
    if config.DATA.ZIP_MODE:
        from .zipdata import ZipImageDataset
        try:
            ds = ZipImageDataset(root, split, transform, cache_mode=config.DATA.CACHE_MODE if is_train else 'part')
        except (FileNotFoundError, ValueError) as e:
            raise DataError(str(e)) from None
        return ds, len(ds.classes)
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise DataError(f"data folder not found: {path!r}. --data-path must hold train/ and val/ "
                        f"sub-folders with one folder per class (ImageFolder layout)")
    try:
        ds = datasets.ImageFolder(path, transform=transform, loader=pil_loader)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f'{path}: {e}') from None
    return ds, len(ds.classes)


def build_loader(config):
    """-> (dataset_train, dataset_val, loader_train, loader_val, mixup_fn), as upstream.

    MODEL.NUM_CLASSES follows the dataset's class count unless the user set it, in which case
    a mismatch is an error (upstream silently overwrote it). With --eval or --throughput only the
    val split is read (dataset_train and loader_train are None): evaluating a downloaded
    checkpoint needs no training images.
    """
    eval_only = config.EVAL_MODE or config.THROUGHPUT_MODE
    dataset_val, n_val = build_dataset(False, config)
    dataset_train, n_train = (None, n_val) if eval_only else build_dataset(True, config)
    if n_train != n_val:
        raise DataError(f'train has {n_train} classes but val has {n_val}: both need the same class folders')
    if config.MODEL.NUM_CLASSES != n_train:
        if config.EXTRA.NUM_CLASSES_FROM_DATA:
            config.defrost()
            config.MODEL.NUM_CLASSES = n_train
            config.freeze()
        else:
            raise DataError(f'MODEL.NUM_CLASSES is {config.MODEL.NUM_CLASSES} but the dataset has '
                            f'{n_train} classes: remove MODEL.NUM_CLASSES from your config/--opts or fix it')

    world, rank = world_size(), get_rank()
    # Validation: each sample exactly once across ranks (no padding duplicates).
    sampler_val = ShardSampler(len(dataset_val), world, rank, shuffle=config.TEST.SHUFFLE)
    if dataset_train is None:
        sampler_train = None
    elif config.DATA.ZIP_MODE and config.DATA.CACHE_MODE == 'part':
        # as upstream: each rank trains on the shard it caches, reshuffled every epoch
        sampler_train = ShardSampler(len(dataset_train), world, rank, shuffle=True, seed=config.SEED,
                                     fixed_shard=True)
    else:
        sampler_train = torch.utils.data.DistributedSampler(
            dataset_train, num_replicas=world, rank=rank, shuffle=True, seed=config.SEED)
    if dataset_train is not None and len(dataset_train) < config.DATA.BATCH_SIZE * world:
        raise DataError(f'{len(dataset_train)} training images is fewer than one global batch '
                        f'({config.DATA.BATCH_SIZE} x {world} processes): lower --batch-size')

    if config.DATA.PIPELINE == 'gpu':
        return _build_gpu_loaders(config, dataset_train, dataset_val, sampler_train, sampler_val)

    workers = config.DATA.NUM_WORKERS
    # No persistent workers: each epoch's worker seeds come from the main RNG, so a resumed run
    # repeats the uninterrupted run's augmentations exactly.
    loader_train = None if dataset_train is None else torch.utils.data.DataLoader(
        dataset_train, sampler=sampler_train, batch_size=config.DATA.BATCH_SIZE, num_workers=workers,
        pin_memory=config.DATA.PIN_MEMORY and torch.cuda.is_available(), drop_last=True)
    loader_val = torch.utils.data.DataLoader(
        dataset_val, sampler=sampler_val, batch_size=config.DATA.BATCH_SIZE, shuffle=False,
        num_workers=workers, pin_memory=config.DATA.PIN_MEMORY and torch.cuda.is_available(),
        drop_last=False)

    return dataset_train, dataset_val, loader_train, loader_val, build_mixup(config)


def workers_hint(config, cores: int = 0, processes: int = 0, cuda: bool = None):
    """A line for the log when --data-pipeline gpu decodes in the workers and DATA.NUM_WORKERS leaves
    most of the host's cores per training process idle (upstream's default is 8 workers; the decode
    scales with them), else None. cores / processes / cuda default to this host and launch."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if (config.DATA.PIPELINE != 'gpu' or config.EXTRA.JPEG_DECODE != 'workers' or not cuda
            or config.DATA.DATASET == 'synthetic'):
        return None
    if not cores:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    per_process = cores // max(1, processes or int(os.environ.get('LOCAL_WORLD_SIZE', '1')))
    workers = config.DATA.NUM_WORKERS
    # the main process's threads (training loop, pipeline stages) need a few of the cores
    if workers >= per_process - 4:
        return None
    return (f'--data-pipeline gpu decodes the images in the {workers} DataLoader workers, and this host has '
            f'{per_process} CPU cores for each training process: --opts DATA.NUM_WORKERS {per_process - 4} '
            f'feeds the GPU faster (EXTRA.JPEG_DECODE device decodes on the GPU instead)')


def input_bound_hint(config, share: float, busy: Optional[float] = None) -> Optional[str]:
    """A line for the log when the training step waited for its input `share` (0..1) of an epoch's
    steady time (over 10%): what to change, for the pipeline in use. busy: the DataLoader workers' mean
    CPU share over that time (workers_busy), where known. None otherwise."""
    if share <= 0.10 or config.DATA.DATASET == 'synthetic':
        return None
    head = f'the training step waited for its input {100 * share:.0f}% of the time: the input pipeline is the limit; '
    if busy is not None and busy < 0.8:
        return head + (f'its {config.DATA.NUM_WORKERS} DataLoader workers were busy only {100 * busy:.0f}% of that '
                       f'time, so more of them will not help: the training process\'s own handling of the batches '
                       f'(receiving and copying them; with --data-pipeline gpu, its device stages), or CPU cores '
                       f'shared with other processes, is what to look at')
    if config.DATA.PIPELINE != 'gpu':
        return head + ('--data-pipeline gpu augments on the GPU (upstream\'s recipe, upstream\'s pixels), or give '
                       'DATA.NUM_WORKERS more of the host\'s cores')
    if config.EXTRA.JPEG_DECODE == 'workers':
        # one H100 host, 16 cores, 14 workers busy 92% (2026-12-07): 4874 img/s on JPEGs, 5530 with 15% of the
        # files to nvJPEG's engines, 5269 with 25%, against 5934 on synthetic inputs
        return head + (f'more DATA.NUM_WORKERS ({config.DATA.NUM_WORKERS} now) if the host has idle cores, else '
                       f'EXTRA.JPEG_DECODE device with EXTRA.DEVICE_DECODE_SHARE 0.15 (that share of the files to '
                       f'nvJPEG, the rest still decoded in the workers)')
    return head + (f'EXTRA.DEVICE_DECODE_SHARE below 1 ({config.EXTRA.DEVICE_DECODE_SHARE} now) has the workers '
                   f'decode the rest of the files, with more DATA.NUM_WORKERS ({config.DATA.NUM_WORKERS} now)')


def worker_cpu_seconds() -> dict:
    """{pid: CPU seconds (user + system) so far} of this process's DataLoader workers, which torch names
    pt_data_worker: read from /proc (Linux); an empty dict elsewhere. Costs a read of every process's
    stat file (a few ms), so take it a few times an epoch, not every step."""
    me, out = os.getpid(), {}
    try:
        pids, tick = [p for p in os.listdir('/proc') if p.isdigit()], os.sysconf('SC_CLK_TCK')
    except (OSError, ValueError, AttributeError):
        return out
    for pid in pids:
        try:
            with open(f'/proc/{pid}/stat') as f:
                stat = f.read()
        except OSError:                     # gone meanwhile
            continue
        name, fields = stat[stat.find('(') + 1:stat.rfind(')')], stat[stat.rfind(')') + 2:].split()
        if name == 'pt_data_worker' and int(fields[1]) == me:      # fields: state, ppid, ... utime, stime
            out[int(pid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def workers_busy(before: dict, after: dict, seconds: float) -> Optional[float]:
    """The workers' mean CPU share (0..1) over `seconds` between two worker_cpu_seconds() snapshots,
    counting the workers present in both; None where there are none."""
    both = before.keys() & after.keys()
    if not both or seconds <= 0:
        return None
    return sum(after[p] - before[p] for p in both) / (len(both) * seconds)


def queued_batches(loader) -> int:
    """How many batches a loader holds ready ahead of the training loop: its workers' prefetch
    (DATA.NUM_WORKERS x prefetch_factor) and, for --data-pipeline gpu, the device stages' queues. They
    fill while the first step runs (minutes, when it compiles), so an epoch's img/s starts after them."""
    inner = getattr(loader, 'loader', loader)            # a DeviceLoader wraps a DataLoader
    workers = getattr(inner, 'num_workers', 0)
    prefetched = workers * (inner.prefetch_factor or 2) if workers else 0
    return prefetched + getattr(loader, 'queued', 0)


def build_mixup(config):
    """timm's Mixup/CutMix on the batch, or None when both are off (as upstream)."""
    mixup_fn = None
    if config.AUG.MIXUP > 0 or config.AUG.CUTMIX > 0. or config.AUG.CUTMIX_MINMAX is not None:
        mixup_fn = Mixup(
            mixup_alpha=config.AUG.MIXUP, cutmix_alpha=config.AUG.CUTMIX, cutmix_minmax=config.AUG.CUTMIX_MINMAX,
            prob=config.AUG.MIXUP_PROB, switch_prob=config.AUG.MIXUP_SWITCH_PROB, mode=config.AUG.MIXUP_MODE,
            label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=config.MODEL.NUM_CLASSES)
    return mixup_fn


def _build_gpu_loaders(config, dataset_train, dataset_val, sampler_train, sampler_val):
    """--data-pipeline gpu: workers read bytes and draw parameters; decode and augmentation run as
    batched ops on this process's device (data/gpu_pipeline.py)."""
    from .gpu_pipeline import SyntheticOnDevice, build_gpu_loader
    device = torch.device('cuda', config.LOCAL_RANK) if torch.cuda.is_available() else torch.device('cpu')
    loader_train = None
    if isinstance(dataset_val, SyntheticDataset):
        if dataset_train is not None:
            loader_train = SyntheticOnDevice(dataset_train, config.DATA.BATCH_SIZE, sampler_train, device, True)
        loader_val = SyntheticOnDevice(dataset_val, config.DATA.BATCH_SIZE, sampler_val, device, False)
        return dataset_train, dataset_val, loader_train, loader_val, build_mixup(config)
    if dataset_train is not None:
        dataset_train, loader_train = build_gpu_loader(dataset_train, config, device, True, sampler_train)
    dataset_val, loader_val = build_gpu_loader(dataset_val, config, device, False, sampler_val)
    return dataset_train, dataset_val, loader_train, loader_val, build_mixup(config)
