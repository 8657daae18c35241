"""Configuration: upstream's yacs keys and defaults, plus the keys of our fast paths.

Config files are YAML with ``BASE: [...]`` inheritance, merged in this order:
defaults -> file (bases first) -> ``--opts KEY VALUE ...`` -> the other command-line flags.
"""
import os
from typing import Any

import yaml
from yacs.config import CfgNode as CN

_C = CN()
_C.BASE = ['']

# ----------------------------------------------------------------------------- data
_C.DATA = CN()
_C.DATA.BATCH_SIZE = 128              # per GPU
_C.DATA.DATA_PATH = ''
_C.DATA.DATASET = 'imagenet'          # 'imagenet', 'imagenet22K' (ImageFolder), or 'synthetic'
_C.DATA.IMG_SIZE = 224
_C.DATA.INTERPOLATION = 'bicubic'     # random, bilinear, bicubic
_C.DATA.ZIP_MODE = False
_C.DATA.CACHE_MODE = 'part'           # no, full, part
_C.DATA.PIN_MEMORY = True
_C.DATA.NUM_WORKERS = 8
# 'pil': upstream's pipeline (PIL decode + per-image transforms in the workers). 'gpu': workers read
# bytes and draw the same random parameters; decode (nvJPEG) and augmentation run batched on the
# training device (data/gpu_pipeline.py). CLI --data-pipeline.
_C.DATA.PIPELINE = 'pil'
_C.DATA.MASK_PATCH_SIZE = 32          # upstream SimMIM keys, kept so upstream files merge
_C.DATA.MASK_RATIO = 0.6

# ----------------------------------------------------------------------------- model
_C.MODEL = CN()
_C.MODEL.TYPE = 'swin'
_C.MODEL.NAME = 'swin_tiny_patch4_window7_224'
_C.MODEL.PRETRAINED = ''
_C.MODEL.RESUME = ''
_C.MODEL.NUM_CLASSES = 1000
_C.MODEL.DROP_RATE = 0.0
_C.MODEL.DROP_PATH_RATE = 0.1
_C.MODEL.LABEL_SMOOTHING = 0.1

_C.MODEL.SWIN = CN()
_C.MODEL.SWIN.PATCH_SIZE = 4
_C.MODEL.SWIN.IN_CHANS = 3
_C.MODEL.SWIN.EMBED_DIM = 96
_C.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
_C.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.SWIN.WINDOW_SIZE = 7
_C.MODEL.SWIN.MLP_RATIO = 4.
_C.MODEL.SWIN.QKV_BIAS = True
_C.MODEL.SWIN.QK_SCALE = None
_C.MODEL.SWIN.APE = False
_C.MODEL.SWIN.PATCH_NORM = True

_C.MODEL.SWINV2 = CN()
_C.MODEL.SWINV2.PATCH_SIZE = 4
_C.MODEL.SWINV2.IN_CHANS = 3
_C.MODEL.SWINV2.EMBED_DIM = 96
_C.MODEL.SWINV2.DEPTHS = [2, 2, 6, 2]
_C.MODEL.SWINV2.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.SWINV2.WINDOW_SIZE = 7
_C.MODEL.SWINV2.MLP_RATIO = 4.
_C.MODEL.SWINV2.QKV_BIAS = True
_C.MODEL.SWINV2.APE = False
_C.MODEL.SWINV2.PATCH_NORM = True
_C.MODEL.SWINV2.PRETRAINED_WINDOW_SIZES = [0, 0, 0, 0]

_C.MODEL.SWIN_MLP = CN()
_C.MODEL.SWIN_MLP.PATCH_SIZE = 4
_C.MODEL.SWIN_MLP.IN_CHANS = 3
_C.MODEL.SWIN_MLP.EMBED_DIM = 96
_C.MODEL.SWIN_MLP.DEPTHS = [2, 2, 6, 2]
_C.MODEL.SWIN_MLP.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.SWIN_MLP.WINDOW_SIZE = 7
_C.MODEL.SWIN_MLP.MLP_RATIO = 4.
_C.MODEL.SWIN_MLP.APE = False
_C.MODEL.SWIN_MLP.PATCH_NORM = True

# ----------------------------------------------------------------------------- training
_C.TRAIN = CN()
_C.TRAIN.START_EPOCH = 0
_C.TRAIN.EPOCHS = 300
_C.TRAIN.WARMUP_EPOCHS = 20
_C.TRAIN.WEIGHT_DECAY = 0.05
_C.TRAIN.BASE_LR = 5e-4
_C.TRAIN.WARMUP_LR = 5e-7
_C.TRAIN.MIN_LR = 5e-6
_C.TRAIN.CLIP_GRAD = 5.0
_C.TRAIN.AUTO_RESUME = True
_C.TRAIN.ACCUMULATION_STEPS = 1
_C.TRAIN.USE_CHECKPOINT = False
_C.TRAIN.LAYER_DECAY = 1.0

_C.TRAIN.LR_SCHEDULER = CN()
_C.TRAIN.LR_SCHEDULER.NAME = 'cosine'
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1
_C.TRAIN.LR_SCHEDULER.WARMUP_PREFIX = True
_C.TRAIN.LR_SCHEDULER.GAMMA = 0.1
_C.TRAIN.LR_SCHEDULER.MULTISTEPS = []

_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = 'adamw'
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9

# ----------------------------------------------------------------------------- augmentation
_C.AUG = CN()
_C.AUG.COLOR_JITTER = 0.4
_C.AUG.AUTO_AUGMENT = 'rand-m9-mstd0.5-inc1'
_C.AUG.REPROB = 0.25
_C.AUG.REMODE = 'pixel'
_C.AUG.RECOUNT = 1
_C.AUG.MIXUP = 0.8
_C.AUG.CUTMIX = 1.0
_C.AUG.CUTMIX_MINMAX = None
_C.AUG.MIXUP_PROB = 1.0
_C.AUG.MIXUP_SWITCH_PROB = 0.5
_C.AUG.MIXUP_MODE = 'batch'

# ----------------------------------------------------------------------------- testing
_C.TEST = CN()
_C.TEST.CROP = True
_C.TEST.SEQUENTIAL = False
_C.TEST.SHUFFLE = False

# ----------------------------------------------------------------------------- misc (upstream)
_C.AMP_ENABLE = True
_C.AMP_OPT_LEVEL = ''                 # '' (follow AMP_ENABLE), O0, O1, O2, O3
_C.OUTPUT = ''
_C.TAG = 'default'
_C.SAVE_FREQ = 1
_C.PRINT_FREQ = 10
_C.SEED = 0
_C.EVAL_MODE = False
_C.THROUGHPUT_MODE = False
_C.LOCAL_RANK = 0
_C.FUSED_WINDOW_PROCESS = False
_C.FUSED_LAYERNORM = False

# ----------------------------------------------------------------------------- fast paths (ours)
# One key per flag (docs/compatibility.md). A flag changes speed, never the math or the checkpoint format.
_C.FUSED_MLP = False
_C.FUSED_DENSE = False
_C.UNFUSED_MHA = False                # fused window attention (the seed fork's flag name)
_C.AMP_DTYPE = 'float16'              # 'float16' or 'bfloat16'
_C.KERNEL_BACKEND = 'auto'            # 'auto', 'triton', 'apex', 'torch'
_C.COMPILE = False                    # torch.compile the model
_C.CUDA_GRAPH = False                 # capture the whole training step as a CUDA graph (cuda_graph.py)
_C.FP8 = False                        # float8 GEMMs in qkv / proj / MLP / reduction (torchao; amp.py)

# ----------------------------------------------------------------------------- other keys of ours
_C.EXTRA = CN()
FP8_RECIPES = ('tensorwise', 'rowwise', 'rowwise_with_gw_hp')      # torchao's float8 recipe names
FP8_LAYER_NAMES = ('qkv', 'proj', 'fc1', 'fc2', 'reduction')      # the Linears --fp8 may swap (amp.py)
_C.EXTRA.SYNTHETIC_TRAIN_SIZE = 1280  # images per epoch for DATA.DATASET synthetic
_C.EXTRA.SYNTHETIC_VAL_SIZE = 256
_C.EXTRA.MAX_NONFINITE_STEPS = 10     # consecutive non-finite losses before the run stops
_C.EXTRA.TF32 = False                 # allow TF32 matmuls at O0 (off, as in PyTorch)
_C.EXTRA.NUM_CLASSES_FROM_DATA = True  # NUM_CLASSES follows the dataset unless set explicitly
_C.EXTRA.TENSORBOARD = False         # also write scalars to <output>/tensorboard (rank 0)
_C.EXTRA.FP8_RECIPE = 'tensorwise'   # torchao float8 recipe with --fp8: tensorwise, rowwise, rowwise_with_gw_hp
_C.EXTRA.FP8_LAYERS = list(FP8_LAYER_NAMES)   # which Linears --fp8 swaps (a subset of FP8_LAYER_NAMES)
# --data-pipeline gpu on CUDA: raw batches decoded per nvJPEG call (each call has a fixed cost), in training
# and in validation. The val pipeline alone with nvJPEG (one H100 host, 16 cores, 2026-12-07): 14520 /
# 14954 / 17278 img/s at 1 / 2 / 4 batches a call; training beside the step measured at 1
_C.EXTRA.DECODE_BATCHES = 1
_C.EXTRA.VAL_DECODE_BATCHES = 4
# --data-pipeline gpu: where JPEGs are decoded. 'workers': in the DataLoader workers, with upstream's
# pixels (PIL's convert('RGB'); baseline JPEGs through torchvision's libjpeg-turbo, a few to 25% less
# worker time, where a check at start finds it identical to PIL's), each training image cut to its
# crop box before it is sent; 'device': nvJPEG on the training GPU (its pixels differ slightly from
# libjpeg-turbo's: sharper, another chroma upsampling; it learns faster in the first epochs of the
# convergence check, then the same). On one H200 host (16 cores, 12 workers, 2026-12-07, 203-step
# epochs) main.py trained Swin-T on JPEGs at 5707-6424 img/s with 'workers' (synthetic inputs: 6731);
# on one H100 host the same day, before the decode thread ran on one intra-op thread, 4266-4282 with
# 'workers' and 3759 with 'device': 'device' is for hosts with few CPU cores a GPU. The augmentation
# runs on the device either way.
_C.EXTRA.JPEG_DECODE = 'workers'
# with EXTRA.JPEG_DECODE 'device': the share of the baseline JPEGs (spread evenly over the indices) sent
# to nvJPEG; the workers decode the rest as with 'workers', at the same time (the train pipeline alone:
# 4808 / 6127 / 7896 img/s at 0.3 / 0.5 / 0.7 on the host above; main.py no faster than either alone).
# With nvJPEG's engines called directly (data/nvjpeg.py), main.py on JPEGs, one H100 host, 14 workers,
# 2026-12-07: 4874 img/s with the workers alone, 5530 at 0.15, 5269 at 0.25; 5934 on synthetic inputs
_C.EXTRA.DEVICE_DECODE_SHARE = 1.0
_C.EXTRA.COMPILE_MODE = ''            # torch.compile mode with --compile: '' (default), 'reduce-overhead'
                                      # (CUDA graphs: fastest with the fused ops), 'max-autotune', ...


AMP_OPT_LEVELS = ('O0', 'O1', 'O2', 'O3')
AMP_DTYPES = ('float16', 'bfloat16')
KERNEL_BACKENDS = ('auto', 'triton', 'apex', 'torch')


class ConfigError(ValueError):
    """A config file, an --opts pair or a flag that cannot be used as given."""


def _load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path!r} (give --cfg a YAML file, e.g. "
                          f"configs/swin/swin_tiny_patch4_window7_224.yaml)")
    with open(path) as f:
        return yaml.safe_load(f) or {}


def _update_config_from_file(config: CN, cfg_file: str) -> None:
    """Merge `cfg_file` into `config`, its BASE files first (paths relative to the file)."""
    cfg = _load_yaml(cfg_file)
    for base in cfg.setdefault('BASE', ['']):
        if base:
            _update_config_from_file(config, os.path.join(os.path.dirname(cfg_file), base))
    print(f'=> merge config from {cfg_file}')
    try:
        config.merge_from_file(cfg_file)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{cfg_file}: {e}. Check the key's spelling against config.py.") from None


def _merge_opts(config: CN, opts: list) -> None:
    if len(opts) % 2:
        raise ConfigError(f"--opts takes KEY VALUE pairs, got an odd count: {opts}")
    try:
        config.merge_from_list(opts)
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(f"--opts {' '.join(map(str, opts))}: {e}. "
                          f"Keys are upper-case dotted paths from config.py, e.g. TRAIN.EPOCHS.") from None


def _arg(args: Any, name: str):
    """The value of an argparse flag, or None when it is absent or unset."""
    return getattr(args, name, None)


def update_config(config: CN, args: Any) -> None:
    """Merge the config file, --opts and every command-line flag into `config` (in place)."""
    config.defrost()
    if _arg(args, 'cfg'):
        _update_config_from_file(config, args.cfg)
    if _arg(args, 'opts'):
        _merge_opts(config, args.opts)
    config.defrost()

    if _arg(args, 'batch_size'):
        config.DATA.BATCH_SIZE = args.batch_size
    if _arg(args, 'data_path'):
        config.DATA.DATA_PATH = args.data_path
    if _arg(args, 'data_pipeline'):
        config.DATA.PIPELINE = args.data_pipeline
    if _arg(args, 'zip'):
        config.DATA.ZIP_MODE = True
    if _arg(args, 'cache_mode'):
        config.DATA.CACHE_MODE = args.cache_mode
    if _arg(args, 'pretrained'):
        config.MODEL.PRETRAINED = args.pretrained
    if _arg(args, 'resume'):
        config.MODEL.RESUME = args.resume
    if _arg(args, 'accumulation_steps'):
        config.TRAIN.ACCUMULATION_STEPS = args.accumulation_steps
    if _arg(args, 'use_checkpoint'):
        config.TRAIN.USE_CHECKPOINT = True
    if _arg(args, 'disable_amp'):
        config.AMP_ENABLE = False
    if _arg(args, 'amp_opt_level'):
        if _arg(args, 'disable_amp') and args.amp_opt_level != 'O0':
            raise ConfigError(f"--disable_amp contradicts --amp-opt-level {args.amp_opt_level}: "
                              f"give one of them (--amp-opt-level O0 is the same as --disable_amp)")
        config.AMP_OPT_LEVEL = args.amp_opt_level
    if _arg(args, 'amp_dtype'):
        config.AMP_DTYPE = args.amp_dtype
    if _arg(args, 'output'):
        config.OUTPUT = args.output
    if _arg(args, 'tag'):
        config.TAG = args.tag
    if _arg(args, 'eval'):
        config.EVAL_MODE = True
    if _arg(args, 'throughput'):
        config.THROUGHPUT_MODE = True
    if _arg(args, 'optim'):
        config.TRAIN.OPTIMIZER.NAME = args.optim
    if _arg(args, 'fused_adam'):
        config.TRAIN.OPTIMIZER.NAME = 'fused_adam'
    if _arg(args, 'fused_window_process'):
        config.FUSED_WINDOW_PROCESS = True
    if _arg(args, 'fused_layernorm'):
        config.FUSED_LAYERNORM = True
    if _arg(args, 'fused_mlp'):
        config.FUSED_MLP = True
    if _arg(args, 'fused_dense'):
        config.FUSED_DENSE = True
    if _arg(args, 'unfused_mha'):
        config.UNFUSED_MHA = True
    if _arg(args, 'kernel_backend'):
        config.KERNEL_BACKEND = args.kernel_backend
    if _arg(args, 'compile'):
        config.COMPILE = True
    if _arg(args, 'cuda_graph'):
        config.CUDA_GRAPH = True
    if _arg(args, 'fp8'):
        config.FP8 = True

    # The old launcher passes --local_rank; torchrun sets LOCAL_RANK.
    local_rank = _arg(args, 'local_rank')
    config.LOCAL_RANK = int(os.environ.get('LOCAL_RANK', local_rank if local_rank is not None else 0))

    # An explicit NUM_CLASSES (file or --opts) is the user's choice; otherwise it follows the data.
    if _num_classes_was_set(args):
        config.EXTRA.NUM_CLASSES_FROM_DATA = False

    config.OUTPUT = os.path.join(config.OUTPUT or 'output', config.MODEL.NAME, config.TAG)
    _validate(config)
    config.freeze()


def _num_classes_was_set(args: Any) -> bool:
    opts = _arg(args, 'opts') or []
    if 'MODEL.NUM_CLASSES' in opts[0::2]:
        return True
    cfg = _arg(args, 'cfg')
    return bool(cfg) and _file_sets(cfg, ('MODEL', 'NUM_CLASSES'))


def _file_sets(cfg_file: str, key: tuple) -> bool:
    cfg = _load_yaml(cfg_file)
    node = cfg
    for k in key:
        if not isinstance(node, dict) or k not in node:
            break
        node = node[k]
    else:
        return True
    return any(_file_sets(os.path.join(os.path.dirname(cfg_file), b), key)
               for b in cfg.get('BASE', ['']) if b)


def _validate(config: CN) -> None:
    """Reject values no code path accepts, naming the key and the choices."""
    checks = [
        ('AMP_OPT_LEVEL', config.AMP_OPT_LEVEL, ('',) + AMP_OPT_LEVELS),
        ('AMP_DTYPE', config.AMP_DTYPE, AMP_DTYPES),
        ('EXTRA.FP8_RECIPE', config.EXTRA.FP8_RECIPE, FP8_RECIPES),
        ('KERNEL_BACKEND', config.KERNEL_BACKEND, KERNEL_BACKENDS),
        ('DATA.CACHE_MODE', config.DATA.CACHE_MODE, ('no', 'full', 'part')),
        ('DATA.PIPELINE', config.DATA.PIPELINE, ('pil', 'gpu')),
        ('EXTRA.JPEG_DECODE', config.EXTRA.JPEG_DECODE, ('device', 'workers')),
        ('TRAIN.OPTIMIZER.NAME', config.TRAIN.OPTIMIZER.NAME.lower(),
         ('adamw', 'sgd', 'fused_adam', 'fused_lamb')),
        ('TRAIN.LR_SCHEDULER.NAME', config.TRAIN.LR_SCHEDULER.NAME, ('cosine', 'linear', 'step', 'multistep')),
    ]
    for key, value, choices in checks:
        if value not in choices:
            raise ConfigError(f"{key} = {value!r} is not one of {list(choices)}")
    if not 0.0 <= config.EXTRA.DEVICE_DECODE_SHARE <= 1.0:
        raise ConfigError(f'EXTRA.DEVICE_DECODE_SHARE = {config.EXTRA.DEVICE_DECODE_SHARE} must be between 0 and 1')
    if config.EXTRA.DEVICE_DECODE_SHARE != 1.0 and config.EXTRA.JPEG_DECODE != 'device':
        raise ConfigError(f'EXTRA.DEVICE_DECODE_SHARE = {config.EXTRA.DEVICE_DECODE_SHARE} splits the decode between '
                          f"nvJPEG and the workers: it needs EXTRA.JPEG_DECODE device (it is "
                          f"{config.EXTRA.JPEG_DECODE!r}; 'workers' decodes every file in the workers)")
    for key in ('DECODE_BATCHES', 'VAL_DECODE_BATCHES'):
        if config.EXTRA[key] < 1:
            raise ConfigError(f'EXTRA.{key} = {config.EXTRA[key]} must be 1 or more')
    fp8_layers = list(config.EXTRA.FP8_LAYERS)
    if not fp8_layers or not set(fp8_layers) <= set(FP8_LAYER_NAMES):
        raise ConfigError(f"EXTRA.FP8_LAYERS = {fp8_layers!r} must be a non-empty subset of "
                          f"{list(FP8_LAYER_NAMES)} (e.g. --opts EXTRA.FP8_LAYERS \"['fc1', 'fc2']\")")
    positive = [('TRAIN.ACCUMULATION_STEPS', config.TRAIN.ACCUMULATION_STEPS), ('SAVE_FREQ', config.SAVE_FREQ),
                ('PRINT_FREQ', config.PRINT_FREQ), ('DATA.BATCH_SIZE', config.DATA.BATCH_SIZE),
                ('DATA.IMG_SIZE', config.DATA.IMG_SIZE), ('TRAIN.EPOCHS', config.TRAIN.EPOCHS),
                ('MODEL.NUM_CLASSES', config.MODEL.NUM_CLASSES)]
    non_negative = [('DATA.NUM_WORKERS', config.DATA.NUM_WORKERS), ('TRAIN.WARMUP_EPOCHS', config.TRAIN.WARMUP_EPOCHS),
                    ('TRAIN.START_EPOCH', config.TRAIN.START_EPOCH), ('TRAIN.BASE_LR', config.TRAIN.BASE_LR),
                    ('TRAIN.WARMUP_LR', config.TRAIN.WARMUP_LR), ('TRAIN.MIN_LR', config.TRAIN.MIN_LR),
                    ('TRAIN.WEIGHT_DECAY', config.TRAIN.WEIGHT_DECAY), ('TRAIN.CLIP_GRAD', config.TRAIN.CLIP_GRAD or 0),
                    ('AUG.REPROB', config.AUG.REPROB), ('AUG.RECOUNT', config.AUG.RECOUNT),
                    ('MODEL.DROP_PATH_RATE', config.MODEL.DROP_PATH_RATE), ('MODEL.DROP_RATE', config.MODEL.DROP_RATE)]
    for key, value in positive:
        if not value >= 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    for key, value in non_negative:
        if not value >= 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    for key, value in (('AUG.REPROB', config.AUG.REPROB), ('AUG.MIXUP_PROB', config.AUG.MIXUP_PROB),
                       ('AUG.MIXUP_SWITCH_PROB', config.AUG.MIXUP_SWITCH_PROB),
                       ('MODEL.LABEL_SMOOTHING', config.MODEL.LABEL_SMOOTHING),
                       ('MODEL.DROP_PATH_RATE', config.MODEL.DROP_PATH_RATE)):
        if not 0 <= value <= 1:
            raise ConfigError(f"{key} is a probability in [0, 1], got {value}")


def amp_opt_level(config: CN) -> str:
    """The precision level in force: AMP_OPT_LEVEL if set, else O1 with AMP on and O0 without."""
    if config.AMP_OPT_LEVEL:
        return config.AMP_OPT_LEVEL
    return 'O1' if config.AMP_ENABLE else 'O0'


def get_config(args: Any) -> CN:
    """The frozen config for `args` (an argparse Namespace, or anything with those attributes)."""
    config = _C.clone()
    update_config(config, args)
    return config
