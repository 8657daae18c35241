"""Per-step LR schedules with warmup (timm's schedulers), as upstream configures them."""
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, PolyLRScheduler, StepLRScheduler


def build_scheduler(config, optimizer, n_iter_per_epoch: int):
    """Scheduler stepped with `step_update(global_step)`; steps are optimizer steps."""
    num_steps = int(config.TRAIN.EPOCHS * n_iter_per_epoch)
    warmup_steps = int(config.TRAIN.WARMUP_EPOCHS * n_iter_per_epoch)
    decay_steps = int(config.TRAIN.LR_SCHEDULER.DECAY_EPOCHS * n_iter_per_epoch)
    multi_steps = [i * n_iter_per_epoch for i in config.TRAIN.LR_SCHEDULER.MULTISTEPS]
    prefix = config.TRAIN.LR_SCHEDULER.WARMUP_PREFIX
    common = dict(warmup_lr_init=config.TRAIN.WARMUP_LR, warmup_t=warmup_steps, t_in_epochs=False)
    name = config.TRAIN.LR_SCHEDULER.NAME
    if name == 'cosine':
        return CosineLRScheduler(optimizer, t_initial=max(1, (num_steps - warmup_steps) if prefix else num_steps),
                                 lr_min=config.TRAIN.MIN_LR, cycle_limit=1, warmup_prefix=prefix, **common)
    if name == 'linear':
        # Upstream's linear decay to 1% of the base LR == a power-1 polynomial schedule.
        return PolyLRScheduler(optimizer, t_initial=num_steps, power=1.0,
                               lr_min=0.01 * config.TRAIN.BASE_LR, cycle_limit=1, **common)
    if name == 'step':
        return StepLRScheduler(optimizer, decay_t=decay_steps, decay_rate=config.TRAIN.LR_SCHEDULER.DECAY_RATE,
                               **common)
    if name == 'multistep':
        return MultiStepLRScheduler(optimizer, decay_t=multi_steps, decay_rate=config.TRAIN.LR_SCHEDULER.GAMMA,
                                    **common)
    raise ValueError(f'TRAIN.LR_SCHEDULER.NAME {name!r} is not one of cosine, linear, step, multistep')
