"""Optimizers with upstream's parameter groups: no weight decay for 1-D parameters, biases,
`absolute_pos_embed` and `relative_position_bias_table`."""
import torch
from torch import optim

from kernels import resolve_backend
from kernels.optimizers import FusedAdamW, FusedLAMB, build_apex_optimizer


def _is_no_decay(name: str, param: torch.Tensor, skip: set, skip_keywords: set) -> bool:
    return (param.ndim == 1 or name.endswith('.bias') or name in skip
            or any(k in name for k in skip_keywords))


def param_groups(model: torch.nn.Module, weight_decay: float):
    skip = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else set()
    skip_keywords = model.no_weight_decay_keywords() if hasattr(model, 'no_weight_decay_keywords') else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _is_no_decay(name, p, skip, skip_keywords) else decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay},
            {'params': no_decay, 'weight_decay': 0.}]


FUSED = ('fused_adam', 'fused_lamb')      # TRAIN.OPTIMIZER.NAME of our fused optimizers (--fused_adam, --optim)


def build_optimizer(config, model: torch.nn.Module) -> optim.Optimizer:
    if config.TRAIN.LAYER_DECAY != 1.0:
        raise NotImplementedError('TRAIN.LAYER_DECAY != 1.0 (SimMIM fine-tuning) is not implemented in this fork')
    groups = param_groups(model, config.TRAIN.WEIGHT_DECAY)
    c = config.TRAIN.OPTIMIZER
    name = c.NAME.lower()
    if name == 'sgd':
        return optim.SGD(groups, momentum=c.MOMENTUM, nesterov=True, lr=config.TRAIN.BASE_LR,
                         weight_decay=config.TRAIN.WEIGHT_DECAY)
    if name == 'adamw':
        return optim.AdamW(groups, eps=c.EPS, betas=tuple(c.BETAS), lr=config.TRAIN.BASE_LR,
                           weight_decay=config.TRAIN.WEIGHT_DECAY)
    if name in FUSED:
        return build_fused_optimizer(name, groups, config, model)
    raise ValueError(f'TRAIN.OPTIMIZER.NAME {name!r} is not one of adamw, sgd, fused_adam, fused_lamb')


def build_fused_optimizer(name: str, groups, config, model: torch.nn.Module) -> optim.Optimizer:
    """Our Triton AdamW/LAMB (the reference on CPU under 'auto'), or apex's with KERNEL_BACKEND apex."""
    c = config.TRAIN.OPTIMIZER
    kw = dict(lr=config.TRAIN.BASE_LR, betas=tuple(c.BETAS), eps=c.EPS, weight_decay=config.TRAIN.WEIGHT_DECAY)
    backend = resolve_backend(config.KERNEL_BACKEND)
    if backend == 'apex':
        return build_apex_optimizer(name, groups, **kw)
    if config.KERNEL_BACKEND == 'auto' and not next(model.parameters()).is_cuda:
        backend = 'torch'     # a CPU model: the reference ('triton' on CPU needs TRITON_INTERPRET=1)
    cls = FusedAdamW if name == 'fused_adam' else FusedLAMB
    return cls(groups, backend=backend, **kw)


def _steps_per_parameter(optimizer: optim.Optimizer) -> bool:
    """torch's Adam/AdamW (and ours, which keeps their state dict) count steps per parameter;
    apex's FusedAdam/FusedLAMB, timm's Lamb and our FusedLAMB count them per group."""
    return isinstance(optimizer, (optim.Adam, optim.AdamW, FusedAdamW))


def adapt_optimizer_state(optimizer: optim.Optimizer, state_dict: dict) -> dict:
    """A saved optimizer state made loadable by `optimizer`, whichever of the layouts above it was
    saved in: checkpoints move between --optim adamw, --fused_adam on our kernels and apex's
    FusedAdam (and between timm's, our and apex's LAMB) mid-run. The moments are the same tensors
    in every layout; the step count moves between group and parameters, and hyperparameter keys
    an implementation lacks are taken from the optimizer being loaded."""
    groups = [dict(g) for g in state_dict['param_groups']]
    state = {k: dict(v) for k, v in state_dict['state'].items()}
    per_parameter = _steps_per_parameter(optimizer)
    for saved, current in zip(groups, optimizer.param_groups):
        for k, v in current.items():
            if k != 'params':
                saved.setdefault(k, v)
        if per_parameter and 'step' in saved:
            step = float(saved.pop('step'))
            for i in saved['params']:
                if i in state:
                    state[i].setdefault('step', torch.tensor(step, dtype=torch.float32))
        elif not per_parameter:
            steps = [float(state[i].pop('step')) for i in saved['params'] if 'step' in state.get(i, {})]
            if steps and 'step' not in saved:
                saved['step'] = int(max(steps))
            if 'step' in saved:       # apex passes the group's step to its kernels as an int
                saved['step'] = int(saved['step'])
    return {'state': state, 'param_groups': groups}
