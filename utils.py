"""Checkpoints (save / resume / pretrained adaptation), the loss scaler, distributed helpers."""
import os
import pickle
import random
import re
from collections import OrderedDict
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from optimizer import adapt_optimizer_state


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model or cannot be read."""


# ----------------------------------------------------------------------------- distributed
def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def reduce_tensor(tensor: torch.Tensor, average: bool = True) -> torch.Tensor:
    rt = tensor.clone()
    if is_dist():
        dist.all_reduce(rt, op=dist.ReduceOp.SUM)
        if average:
            rt /= dist.get_world_size()
    return rt


def broadcast_weights(model: torch.nn.Module) -> None:
    """Every rank takes rank 0's parameters and buffers. DDP does this only for the module it wraps,
    which at O2 is the half-precision copy: the fp32 master weights the optimizer steps would keep each
    rank's own initialisation (seeded with SEED + rank) and the replicas would part from the first step.
    So the fp32 model is made the same everywhere before the copies are taken."""
    if is_dist():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def replicas_differ(model: torch.nn.Module) -> Optional[str]:
    """None when every rank holds the same weights (DDP replicas must: same averaged gradients, same
    optimizer), else the first parameter that differs. One float64 sum a tensor, two all-reduces."""
    if not is_dist():
        return None
    named = list(model.named_parameters())
    low = torch.stack([p.detach().sum(dtype=torch.float64) for _, p in named])
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    differ = ((low != high) & ~(low.isnan() & high.isnan())).nonzero()
    if differ.numel() == 0:
        return None
    i = int(differ[0, 0])
    return f'{named[i][0]} (sums over the ranks from {low[i].item():.9g} to {high[i].item():.9g})'


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """Every RNG the training loop draws from, in a form torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'torch': torch.get_rng_state(), 'python': list(random.getstate()[1]),
             'numpy': {'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                       'has_gauss': int(has_gauss), 'cached': float(cached)}}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def all_rng_states() -> list:
    """Every rank's RNG state, in rank order (a collective: call it on every rank)."""
    state = rng_state()
    if not is_dist():
        return [state]
    states = [None] * world_size()
    dist.all_gather_object(states, state)
    return states


def restore_rank_rng(states, logger=None) -> None:
    """Restore this rank's state from a checkpoint's list of per-rank states (or one old-style dict)."""
    if isinstance(states, dict):
        states = [states]
    if len(states) != world_size() and logger is not None:
        logger.warning(f'the checkpoint holds RNG states of {len(states)} processes, this run has '
                       f'{world_size()}: random streams will not repeat the original run exactly')
    set_rng_state(states[rank() % len(states)])


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    random.setstate((3, tuple(state['python']), None))
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['cached']))
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


# ----------------------------------------------------------------------------- reading checkpoints
def _checkpoint_globals() -> list:
    """The only class a checkpoint may name besides tensors and plain containers: yacs' CfgNode,
    which upstream's training checkpoints pickle as their 'config' entry. Released Swin files hold
    {'model': state_dict}; upstream's own checkpoints add optimizer / lr_scheduler / scaler (or
    apex 'amp') state dicts, max_accuracy and epoch, all plain values torch's safe loader reads.

    torch's safe loader fills only plain dicts, and a CfgNode is a dict subclass, so the name
    'yacs.config.CfgNode' is rebuilt as an OrderedDict (its items and attributes, no code of
    yacs runs) and turned back into a CfgNode by read_checkpoint."""
    return [(OrderedDict, 'yacs.config.CfgNode')]


_GLOBAL_RE = re.compile(r'GLOBAL ([\w.]+)|global[^`\n]*`([\w.]+)`|Unsupported class ([\w.]+)')


def _refused_global(message: str) -> Optional[str]:
    m = _GLOBAL_RE.search(message)
    return next((g for g in m.groups() if g), None) if m else None


def read_checkpoint(path: str, mmap: bool = False) -> dict:
    """Load a checkpoint file on the CPU without ever running code from it.

    torch.load(weights_only=True) rebuilds only tensors, plain containers and scalars, plus the
    classes `_checkpoint_globals` allows. Anything else (a pickled function, an object whose
    reduction calls os.system, ...) is refused before it is built, with the global it asked for.
    There is no fallback to a full unpickle. mmap: map the tensors' storage instead of reading it
    (zip-format files; for reading one small entry of a large file).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint not found: {path!r}')
    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap or None)
    except pickle.UnpicklingError as e:
        name = _refused_global(str(e))
        if name:
            raise CheckpointError(
                f'refused to load {path}: it asks for {name!r}, which no checkpoint needs '
                f'(loading it could run code from the file). Only tensors, plain containers and '
                f'yacs CfgNode configs are accepted.') from None
        raise CheckpointError(f'cannot read {path}: not a checkpoint, or truncated '
                              f'({str(e).splitlines()[0] if str(e) else type(e).__name__})') from None
    except Exception as e:      # zip/storage errors, EOF, wrong magic: a damaged or foreign file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f'cannot read {path}: not a checkpoint, or truncated ({first})') from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get('config'), OrderedDict):
        from yacs.config import CfgNode
        ckpt['config'] = CfgNode(ckpt['config'])
    return ckpt


_BUFFER_KEYS = ('relative_position_index', 'relative_coords_table', 'attn_mask')   # rebuilt by the model


def _model_state(ckpt: dict) -> dict:
    sd = ckpt.get('model', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError("the checkpoint holds no state dict (expected {'model': state_dict} or a state dict)")
    return sd


def load_model_state(model: torch.nn.Module, state_dict: dict, what: str) -> None:
    """Strict load, except that index/mask buffers the model recomputes may be absent (old files).
    Any other difference is an error that lists the keys and shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.endswith(_BUFFER_KEYS)]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
             for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or wrong:
        lines = ([f'missing: {missing[:8]}{" ..." if len(missing) > 8 else ""}'] if missing else []) + \
                ([f'unexpected: {unexpected[:8]}{" ..." if len(unexpected) > 8 else ""}'] if unexpected else []) + \
                ([f'shape mismatch: {wrong[:8]}{" ..." if len(wrong) > 8 else ""}'] if wrong else [])
        raise CheckpointError(f'{what} does not fit this model (another architecture or size?):\n  '
                              + '\n  '.join(lines) + '\nUse --pretrained to adapt windows, resolution and '
                              'class count; check --cfg matches the checkpoint.')
    model.load_state_dict(state_dict, strict=False)


def load_checkpoint(config, model, optimizer, lr_scheduler, loss_scaler, logger,
                    checkpoint: Optional[dict] = None) -> float:
    """Resume (or, for --eval, just load) MODEL.RESUME; returns the max accuracy it recorded.
    `checkpoint`: the file's contents when the caller has already read it (read_checkpoint)."""
    logger.info(f'==============> Resuming from {config.MODEL.RESUME}....................')
    ckpt = checkpoint if checkpoint is not None else read_checkpoint(config.MODEL.RESUME)
    load_model_state(model, _model_state(ckpt), f'checkpoint {config.MODEL.RESUME}')
    max_accuracy = 0.0
    if not config.EVAL_MODE and 'optimizer' in ckpt and 'lr_scheduler' in ckpt and 'epoch' in ckpt:
        optimizer.load_state_dict(adapt_optimizer_state(optimizer, ckpt['optimizer']))
        lr_scheduler.load_state_dict(ckpt['lr_scheduler'])
        if 'scaler' in ckpt and ckpt['scaler']:
            loss_scaler.load_state_dict(ckpt['scaler'])
        config.defrost()
        config.TRAIN.START_EPOCH = ckpt['epoch'] + 1
        config.freeze()
        if 'rng' in ckpt:
            restore_rank_rng(ckpt['rng'], logger)
        logger.info(f"=> loaded successfully '{config.MODEL.RESUME}' (epoch {ckpt['epoch']})")
    if 'max_accuracy' in ckpt:
        max_accuracy = float(ckpt['max_accuracy'])
    return max_accuracy


def save_checkpoint(config, epoch: int, model, max_accuracy: float, optimizer, lr_scheduler,
                    loss_scaler, logger, name: Optional[str] = None, rng_states: Optional[list] = None) -> str:
    """Write ckpt_epoch_{epoch}.pth atomically (temp file, then rename). The config is stored as
    YAML text so the file loads with torch.load(weights_only=True). `rng_states`: every rank's RNG
    state (from all_rng_states(), gathered on all ranks); by default this process's."""
    state = {'model': model_state_fp32(model),
             'optimizer': optimizer.state_dict(),
             'lr_scheduler': lr_scheduler.state_dict(),
             'max_accuracy': max_accuracy,
             'scaler': loss_scaler.state_dict(),
             'epoch': epoch,
             'config': config.dump(),
             'rng': rng_states if rng_states is not None else [rng_state()]}
    path = os.path.join(config.OUTPUT, name or f'ckpt_epoch_{epoch}.pth')
    tmp = path + '.tmp'
    torch.save(state, tmp)
    os.replace(tmp, path)
    logger.info(f'{path} saved !!!')
    return path


def model_state_fp32(model) -> dict:
    """The model's state dict with floating tensors in fp32 (the checkpoint layout at every level)."""
    return {k: (v.float() if v.is_floating_point() else v) for k, v in model.state_dict().items()}


def auto_resume_helper(output_dir: str) -> Optional[str]:
    """The newest ckpt_epoch_*.pth in output_dir (by epoch number), or None."""
    if not os.path.isdir(output_dir):
        return None
    found = []
    for f in os.listdir(output_dir):
        if f.startswith('ckpt_epoch_') and f.endswith('.pth'):
            try:
                found.append((int(f[len('ckpt_epoch_'):-len('.pth')]), f))
            except ValueError:
                continue
    return os.path.join(output_dir, max(found)[1]) if found else None


# ----------------------------------------------------------------------------- pretrained adaptation
def imagenet_22k_to_1k_indices() -> list:
    """Row of the 21841-class head for each ImageNet-1k class, from timm's shipped synset lists:
    the 1k synset's position in the 22k (Google) list; n04399382 (class 850), absent there, maps
    to row 5564 as upstream's map does."""
    from importlib import resources
    info = resources.files('timm.data') / '_info'
    synsets_1k = (info / 'imagenet_synsets.txt').read_text().split()
    position = {s: i for i, s in enumerate((info / 'imagenet21k_goog_synsets.txt').read_text().split())}
    indices = []
    for i, s in enumerate(synsets_1k):
        if s == 'n04399382':
            indices.append(5564)
        elif s in position:
            indices.append(position[s])
        else:
            raise CheckpointError(f'ImageNet-1k synset {s} (class {i}) is not in the 22k list')
    return indices


def _resize_square(t: torch.Tensor, new_side: int) -> torch.Tensor:
    """[L, C] with L = side^2 -> [new_side^2, C], bicubic over the side x side grid."""
    L, C = t.shape
    side = int(round(L ** 0.5))
    grid = t.float().T.reshape(1, C, side, side)
    out = F.interpolate(grid, size=(new_side, new_side), mode='bicubic', align_corners=False)
    return out.reshape(C, new_side * new_side).T.to(t.dtype)


def adapt_pretrained_state(state_dict: dict, model: torch.nn.Module) -> tuple:
    """(adapted state dict, list of what changed) for a Swin V1 or V2 `model`: drops the buffers
    the model rebuilds for its own window (index, mask, V2's coordinate table: V2's cpb MLP is
    continuous, so it needs no resizing), resizes V1's bias tables and absolute_pos_embed, maps a
    22k head to 1k, drops a head of another size (the model keeps its fresh head). Anything else
    must already fit."""
    own = model.state_dict()
    out, notes = {}, []
    head_mismatch = False
    for k, v in state_dict.items():
        if k.endswith(_BUFFER_KEYS):
            continue
        if k not in own:
            out[k] = v          # reported by load_model_state as unexpected
            continue
        target = own[k].shape
        if v.shape == target:
            out[k] = v
        elif k.endswith('relative_position_bias_table'):
            if v.shape[1] != target[1]:
                raise CheckpointError(f'{k}: {v.shape[1]} heads in the checkpoint, {target[1]} in the model')
            out[k] = _resize_square(v, int(round(target[0] ** 0.5)))
            notes.append(f'{k}: bicubic {tuple(v.shape)} -> {tuple(target)}')
        elif k == 'absolute_pos_embed':
            if v.shape[-1] != target[-1]:
                raise CheckpointError(f'{k}: width {v.shape[-1]} vs {target[-1]}')
            out[k] = _resize_square(v[0], int(round(target[1] ** 0.5)))[None]
            notes.append(f'{k}: bicubic {tuple(v.shape)} -> {tuple(target)}')
        elif k in ('head.weight', 'head.bias'):
            head_mismatch = True
            if v.shape[0] == 21841 and target[0] == 1000 and v.shape[1:] == target[1:]:
                out[k] = v[imagenet_22k_to_1k_indices()]
                notes.append(f'{k}: 21841 -> 1000 classes by the 22k->1k synset map')
            else:
                notes.append(f'{k}: {tuple(v.shape)} does not fit {tuple(target)}; head re-initialised')
        else:
            out[k] = v          # reported by load_model_state as a shape mismatch
    if head_mismatch:
        for k in ('head.weight', 'head.bias'):
            out.setdefault(k, own[k])
    return out, notes


def load_pretrained(config, model, logger, checkpoint: Optional[dict] = None) -> None:
    """Fine-tune start: load MODEL.PRETRAINED into `model`, adapting what upstream adapts.
    `checkpoint`: the file's contents when the caller has already read it (read_checkpoint)."""
    logger.info(f'==============> Loading weight {config.MODEL.PRETRAINED} for fine-tuning......')
    state_dict = _model_state(checkpoint if checkpoint is not None else read_checkpoint(config.MODEL.PRETRAINED))
    adapted, notes = adapt_pretrained_state(state_dict, model)
    load_model_state(model, adapted, f'pretrained weights {config.MODEL.PRETRAINED}')
    for n in notes:
        logger.info(f'adapted {n}')
    logger.info(f"=> loaded successfully '{config.MODEL.PRETRAINED}'")
