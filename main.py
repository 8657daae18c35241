"""Train, evaluate (--eval) or time (--throughput) a Swin Transformer; upstream's command line.

    python main.py --cfg configs/swin/swin_tiny_patch4_window7_224.yaml --data-path <imagenet>
    torchrun --nproc_per_node 8 main.py --cfg ... --batch-size 128
    python -m torch.distributed.launch --nproc_per_node 8 main.py --cfg ...
"""
import argparse
import contextlib
import datetime
import json
import os
import sys
import time
import warnings
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import AverageMeter, accuracy

from amp import Precision, check_fp8, enable_fp8
from config import AMP_DTYPES, AMP_OPT_LEVELS, KERNEL_BACKENDS, ConfigError, amp_opt_level, get_config
from data import DataError, build_loader
from data.build import input_bound_hint, queued_batches, worker_cpu_seconds, workers_busy, workers_hint
from cuda_graph import GraphedTrainStep, check_cuda_graph_config
from kernels import KernelUnavailable
from kernels.optimizers import is_fused
from logger import Scalars, create_logger
from lr_scheduler import build_scheduler
from models import build_model
from optimizer import FUSED, build_optimizer
from utils import (CheckpointError, all_rng_states, auto_resume_helper, broadcast_weights, is_dist,
                   load_checkpoint, load_pretrained, rank, read_checkpoint, reduce_tensor, replicas_differ,
                   rng_state, save_checkpoint, set_rng_state, world_size)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, KernelUnavailable, NonFiniteLossError)


class StepValues:
    """A training step's loss, finite flag, grad norm and loss scale, copied to pinned host memory
    right behind the step's own work and read later. Reading a device tensor (.item()) waits for
    everything queued on the stream, so the GPU runs dry while the host then launches the next
    step; this copy's event has passed long before the read when the host is a step ahead."""

    def __init__(self, step: int, n: int, loss: torch.Tensor, finite: torch.Tensor,
                 norm: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None):
        self.step, self.n = step, n
        nan = loss.new_full((), float('nan'), dtype=torch.float32) if norm is None or scale is None else None
        values = torch.stack([v.detach().float().reshape(()) if v is not None else nan
                              for v in (loss, finite, norm, scale)])
        self.event = None
        if values.is_cuda:
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = values

    def read(self) -> tuple:
        """(loss, finite, grad norm or nan, loss scale or nan) as floats."""
        if self.event is not None:
            self.event.synchronize()
        return tuple(self.host.tolist())


def parse_option(argv=None):
    """-> (args, config). Upstream's flags, plus the seed fork's and ours."""
    p = argparse.ArgumentParser('Swin Transformer training and evaluation script', add_help=True)
    p.add_argument('--cfg', type=str, required=True, metavar='FILE', help='path to config file')
    p.add_argument('--opts', default=None, nargs='+', help="modify config options by adding 'KEY VALUE' pairs")
    p.add_argument('--batch-size', type=int, help='batch size for a single GPU')
    p.add_argument('--data-path', type=str, help='path to dataset')
    p.add_argument('--data-pipeline', type=str, choices=['pil', 'gpu'],
                   help="pil: upstream's CPU pipeline; gpu: decode and augment batched on the GPU (DATA.PIPELINE)")
    p.add_argument('--zip', action='store_true', help='use zipped dataset instead of folder dataset')
    p.add_argument('--cache-mode', type=str, default='part', choices=['no', 'full', 'part'],
                   help='no: no cache, full: cache all data, part: each rank caches its shard')
    p.add_argument('--pretrained', help='pretrained weight from checkpoint, could be imagenet22k pretrained weight')
    p.add_argument('--resume', help='resume from checkpoint')
    p.add_argument('--accumulation-steps', type=int, help='gradient accumulation steps')
    p.add_argument('--use-checkpoint', action='store_true', help='whether to use gradient checkpointing to save memory')
    p.add_argument('--disable_amp', action='store_true', help='Disable pytorch amp')
    p.add_argument('--amp-opt-level', type=str, choices=list(AMP_OPT_LEVELS),
                   help='precision level: O0 fp32, O1 autocast, O2 half weights + fp32 master, O3 pure half')
    p.add_argument('--amp-dtype', type=str, choices=list(AMP_DTYPES), help='half type for O1-O3')
    p.add_argument('--output', default='output', type=str, metavar='PATH',
                   help='root of output folder, the full path is <output>/<model_name>/<tag> (default: output)')
    p.add_argument('--tag', help='tag of experiment')
    p.add_argument('--eval', action='store_true', help='Perform evaluation only')
    p.add_argument('--throughput', action='store_true', help='Test throughput only')
    p.add_argument('--local_rank', '--local-rank', type=int, default=None, dest='local_rank',
                   help='local rank (set by torch.distributed.launch)')
    p.add_argument('--optim', type=str, choices=['adamw', 'sgd', 'fused_adam', 'fused_lamb'],
                   help='overwrite optimizer if provided')
    p.add_argument('--fused_adam', action='store_true', help='fused AdamW (= --optim fused_adam)')
    p.add_argument('--fused_window_process', action='store_true', help='fused cyclic shift + window partition')
    p.add_argument('--fused_layernorm', action='store_true', help='fused LayerNorm')
    p.add_argument('--fused_mlp', action='store_true',
                   help="fc1 + GELU + fc2: GELU's backward and the bias gradients fused around cuBLAS's GEMMs")
    p.add_argument('--fused_dense', action='store_true',
                   help="Linear: the bias in cuBLAS's epilogue, our bias-gradient kernel")
    p.add_argument('--unfused_mha', '--fused_window_attention', action='store_true', dest='unfused_mha',
                   help='fused window attention: q k^T + bias + mask + softmax + @v in one kernel')
    p.add_argument('--kernel-backend', type=str, choices=list(KERNEL_BACKENDS),
                   help='implementation of the fused flags: auto, triton, apex or torch')
    p.add_argument('--compile', action='store_true', help='torch.compile the model')
    p.add_argument('--fp8', action='store_true',
                   help='float8 GEMMs in the attention, MLP and merge Linears (torchao; Hopper+, O2 bf16)')
    p.add_argument('--cuda-graph', action='store_true', dest='cuda_graph',
                   help='capture the whole training step as a CUDA graph (eager kernels, no compile; '
                        'needs a fused optimizer)')
    args = p.parse_args(argv)
    return args, get_config(args)


def init_distributed(config) -> torch.device:
    """One process (plain python), or one per GPU/CPU slot under torchrun / distributed.launch."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(config.LOCAL_RANK)
    if world > 1 and not is_dist():
        dist.init_process_group('nccl' if use_cuda else 'gloo', init_method='env://',
                                world_size=world, rank=int(os.environ['RANK']))
        dist.barrier()
    return torch.device('cuda', config.LOCAL_RANK) if use_cuda else torch.device('cpu')


def scale_lr(config) -> None:
    """Linear LR scaling by total batch / 512 (and by accumulation steps), as upstream."""
    factor = config.DATA.BATCH_SIZE * world_size() / 512.0
    if config.TRAIN.ACCUMULATION_STEPS > 1:
        factor *= config.TRAIN.ACCUMULATION_STEPS
    config.defrost()
    config.TRAIN.BASE_LR *= factor
    config.TRAIN.WARMUP_LR *= factor
    config.TRAIN.MIN_LR *= factor
    config.freeze()


def resolve_resume(config) -> str:
    """The checkpoint this run resumes from: --resume, else (training only) the newest
    ckpt_epoch_*.pth in the output folder when TRAIN.AUTO_RESUME is on, else ''. AUTO_RESUME never
    overrides an explicit --resume, nor an --eval of a given checkpoint."""
    if config.MODEL.RESUME:
        return config.MODEL.RESUME
    if config.TRAIN.AUTO_RESUME and not config.EVAL_MODE:
        return auto_resume_helper(config.OUTPUT) or ''
    return ''


def best_accuracy_in(output_dir: str) -> float:
    """max_accuracy recorded in <output_dir>/ckpt_best.pth, 0 when there is none."""
    path = os.path.join(output_dir, 'ckpt_best.pth')
    if not os.path.isfile(path):
        return 0.0
    return float(read_checkpoint(path, mmap=True).get('max_accuracy', 0.0))


def speed_hint(config, device: torch.device) -> Optional[str]:
    """One line for a training run on a GPU that leaves out part of the fastest configuration measured
    (README, "What to use"), naming what to add; None when nothing is missing or nothing is trained."""
    if device.type != 'cuda' or config.EVAL_MODE or config.THROUGHPUT_MODE:
        return None
    flags = [('--fused_window_process', config.FUSED_WINDOW_PROCESS),
             ('--unfused_mha', config.UNFUSED_MHA or config.MODEL.TYPE == 'swin_mlp'),    # no attention there
             ('--fused_layernorm', config.FUSED_LAYERNORM),
             ('--fused_adam', config.TRAIN.OPTIMIZER.NAME.lower() in FUSED),
             ('--amp-opt-level O2 --amp-dtype bfloat16',
              amp_opt_level(config) == 'O2' and config.AMP_DTYPE == 'bfloat16')]
    missing = [flag for flag, on in flags if not on]
    if not (config.COMPILE or config.CUDA_GRAPH):
        missing.append('--compile with EXTRA.COMPILE_MODE reduce-overhead, or --cuda-graph --fused_mlp --fused_dense')
    elif config.CUDA_GRAPH and config.MODEL.TYPE == 'swin' and not (config.FUSED_MLP and config.FUSED_DENSE):
        missing.append('--fused_mlp --fused_dense (measured faster with --cuda-graph on Swin V1)')
    if not missing:
        return None
    return ('speed: this run leaves out ' + '; '.join(missing) + ' (the fastest measured configuration, README.md '
            '"What to use"; the fused flags change speed, not the math)')


def main(config, logger=None):
    device = init_distributed(config)
    if config.FP8:
        check_fp8(config, device)             # before anything is read or written
    seed = config.SEED + rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    scale_lr(config)
    # Checkpoints are read (safely) before anything is written: a refused or damaged file stops the
    # run with one line and leaves the output folder as it was.
    resume_from = resolve_resume(config)
    resume_ckpt = read_checkpoint(resume_from) if resume_from else None
    pretrained_ckpt = (read_checkpoint(config.MODEL.PRETRAINED)
                       if config.MODEL.PRETRAINED and not resume_from else None)
    os.makedirs(config.OUTPUT, exist_ok=True)
    logger = logger or create_logger(config.OUTPUT, rank(), name=f'{config.MODEL.NAME}')
    if rank() == 0:
        with open(os.path.join(config.OUTPUT, 'config.json'), 'w') as f:
            f.write(config.dump())
        logger.info(f'Full config saved to {os.path.join(config.OUTPUT, "config.json")}')
    logger.info(config.dump())

    scalars = Scalars(config.OUTPUT, config.EXTRA.TENSORBOARD and rank() == 0)   # fails at start if missing
    dataset_train, dataset_val, data_loader_train, data_loader_val, mixup_fn = build_loader(config)
    hint = workers_hint(config)
    if hint:
        logger.info(hint)

    hint = speed_hint(config, device)
    if hint:
        logger.info(hint)
    precision = Precision(amp_opt_level(config), config.AMP_DTYPE, device, tf32=config.EXTRA.TF32)
    logger.info(f'Creating model:{config.MODEL.TYPE}/{config.MODEL.NAME} ({precision.describe()})')
    model = build_model(config)
    logger.info(f'number of params: {sum(p.numel() for p in model.parameters() if p.requires_grad)}')
    if hasattr(model, 'flops'):
        logger.info(f'number of GFLOPs: {model.flops() / 1e9}')
    model.to(device)
    if pretrained_ckpt is not None:
        load_pretrained(config, model, logger, checkpoint=pretrained_ckpt)
        del pretrained_ckpt
    broadcast_weights(model)       # before the O2 copy: DDP would make only the copy it wraps the same
    if config.FP8:
        fp8 = enable_fp8(model, config.EXTRA.FP8_RECIPE, layers=tuple(config.EXTRA.FP8_LAYERS))
        logger.info(f'--fp8 ({config.EXTRA.FP8_RECIPE}): {len(fp8)} Linear layers in float8 '
                    f'({", ".join(sorted({n.split(".")[-1] for n in fp8}))}); the rest in bf16')
        if not (config.COMPILE or config.CUDA_GRAPH):
            logger.warning('--fp8 without --compile: its scaling and casts run as separate kernels; '
                           'FP8 is meant to be used with --compile')
        logger.warning('--fp8 is not yet faster than bf16: Swin-L with every flag + --compile trained at 1309 '
                       'img/s with it vs 1672 without (tensorwise, one H200, 2026-11-28), 1421 vs 1693 with it on '
                       'fc1/fc2 only (2026-11-29); it is here to test float8 numerics, not for speed')
    model_without_ddp, master = precision.prepare(model)
    if precision.level == 'O3' and not (config.EVAL_MODE or config.THROUGHPUT_MODE):
        logger.warning('O3 trains in pure half precision without fp32 master weights: '
                       'accuracy may differ from O1/O2. Prefer O2 for training.')
    optimizer = build_optimizer(config, master)
    logger.info(f"optimizer: {type(optimizer).__module__}.{type(optimizer).__name__}"
                + (f" (backend {optimizer.backend})" if hasattr(optimizer, 'backend') else ''))
    model = model_without_ddp
    graph_training = config.CUDA_GRAPH and not (config.EVAL_MODE or config.THROUGHPUT_MODE)
    if graph_training:
        check_cuda_graph_config(config, device, optimizer)      # refuse now, not after an epoch
    if is_dist() and not graph_training:       # --cuda-graph averages the gradients inside its graph
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[config.LOCAL_RANK] if device.type == 'cuda' else None,
            broadcast_buffers=False)
    if config.COMPILE:
        model = torch.compile(model, mode=config.EXTRA.COMPILE_MODE or None)
        logger.info(f"torch.compile, mode {config.EXTRA.COMPILE_MODE or 'default'}")

    accum = config.TRAIN.ACCUMULATION_STEPS
    # --eval / --throughput read no training split; the schedule is then built only to be resumed into.
    steps_per_epoch = len(data_loader_train) // accum if data_loader_train is not None else 1
    if steps_per_epoch == 0:
        raise DataError(f'{len(data_loader_train)} batches per epoch is fewer than '
                        f'TRAIN.ACCUMULATION_STEPS={accum}: lower the accumulation or the batch size')
    lr_scheduler = build_scheduler(config, optimizer, steps_per_epoch)

    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()     # mixup/cutmix give soft (label-smoothed) targets
    elif config.MODEL.LABEL_SMOOTHING > 0.:
        criterion = LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    else:
        criterion = torch.nn.CrossEntropyLoss()

    max_accuracy = 0.0
    if resume_from and resume_from != config.MODEL.RESUME:
        logger.info(f'auto resuming from {resume_from}')
        config.defrost()
        config.MODEL.RESUME = resume_from
        config.freeze()
    elif config.TRAIN.AUTO_RESUME and not resume_from and not config.EVAL_MODE:
        logger.info(f'no checkpoint found in {config.OUTPUT}, ignoring auto resume')

    resumed_rng = None
    if config.MODEL.RESUME:
        max_accuracy = load_checkpoint(config, master, optimizer, lr_scheduler, precision, logger,
                                       checkpoint=resume_ckpt)
        del resume_ckpt
        if not config.EVAL_MODE:
            # The best model so far may be newer than the epoch resumed from (SAVE_FREQ > 1, a crash,
            # an earlier epoch resumed into the same folder): never let a worse one replace it.
            max_accuracy = max(max_accuracy, best_accuracy_in(config.OUTPUT))
        precision.sync_from_master()
        resumed_rng = rng_state()   # validation below draws loader seeds: training resumes from here
    if config.EVAL_MODE or (config.MODEL.RESUME and not config.THROUGHPUT_MODE):
        if config.EVAL_MODE and not (config.MODEL.RESUME or config.MODEL.PRETRAINED):
            logger.warning('--eval without --resume or --pretrained evaluates randomly initialised weights')
        acc1, acc5, loss = validate(config, data_loader_val, model, precision, logger)
        logger.info(f'Accuracy of the network on the {len(dataset_val)} test images: {acc1:.1f}%')
        if config.EVAL_MODE:
            return {'acc1': acc1, 'acc5': acc5, 'loss': loss}

    if config.THROUGHPUT_MODE:
        return {'throughput': throughput(data_loader_val, model, precision, logger)}

    if resumed_rng is not None:
        set_rng_state(resumed_rng)
    graphed = None
    if graph_training:
        graphed = GraphedTrainStep(model, criterion, optimizer, precision, config.TRAIN.CLIP_GRAD,
                                   accum=config.TRAIN.ACCUMULATION_STEPS, distributed=is_dist())
        logger.info(f'--cuda-graph: the training step is captured after {graphed.warmup} eager steps')
    differ = replicas_differ(master)
    if differ:
        raise RuntimeError(f'the ranks start training from different weights: {differ}. Nothing was trained; '
                           'this is a bug in how the model is set up for DDP, please report it')
    logger.info('Start training')
    start_time = time.time()
    for epoch in range(config.TRAIN.START_EPOCH, config.TRAIN.EPOCHS):
        data_loader_train.sampler.set_epoch(epoch)
        train_loss = train_one_epoch(config, model, criterion, data_loader_train, optimizer, epoch, mixup_fn,
                                     lr_scheduler, precision, master, logger, graphed)
        differ = replicas_differ(master)
        if differ:
            logger.warning(f'the ranks\' weights differ after epoch {epoch}: {differ}. DDP replicas must stay '
                           'equal; this run is not training one model. Please report it')
        acc1, acc5, loss = validate(config, data_loader_val, model, precision, logger)
        for tag, value in (('train/loss', train_loss), ('train/lr', optimizer.param_groups[0]['lr']),
                           ('val/acc1', acc1), ('val/acc5', acc5), ('val/loss', loss)):
            scalars.add(tag, value, epoch)
        logger.info(f'Accuracy of the network on the {len(dataset_val)} test images: {acc1:.1f}%')
        improved = acc1 > max_accuracy
        max_accuracy = max(max_accuracy, acc1)
        logger.info(f'Max accuracy: {max_accuracy:.2f}%')
        save_now = epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1
        if save_now or improved:
            rngs = all_rng_states()                 # every rank's streams, so a resume repeats them all
            if rank() == 0 and save_now:
                save_checkpoint(config, epoch, master, max_accuracy, optimizer, lr_scheduler, precision, logger,
                                rng_states=rngs)
            if rank() == 0 and improved:
                save_checkpoint(config, epoch, master, max_accuracy, optimizer, lr_scheduler, precision,
                                logger, name='ckpt_best.pth', rng_states=rngs)
    scalars.close()
    total = str(datetime.timedelta(seconds=int(time.time() - start_time)))
    logger.info(f'Training time {total}')
    return {'max_accuracy': max_accuracy}


def train_one_epoch(config, model, criterion, data_loader, optimizer, epoch, mixup_fn, lr_scheduler,
                    precision, master, logger, graphed=None):
    """One epoch; `graphed` (--cuda-graph) runs each whole step as a replayed CUDA graph."""
    model.train()
    if graphed is None:       # a graphed step owns its gradients (allocated once, zeroed in the graph)
        precision.zero_grad(optimizer, model)
    accum = config.TRAIN.ACCUMULATION_STEPS
    steps_per_epoch = len(data_loader) // accum
    num_batches = steps_per_epoch * accum     # leftover micro-batches are not carried over
    device = next(master.parameters()).device
    batch_time, loss_meter, norm_meter, scaler_meter = AverageMeter(), AverageMeter(), AverageMeter(), AverageMeter()
    data_time = AverageMeter()     # the host's wait for each batch: the step's work is queued on the GPU
    waited = 0.0                   # ... and its sum over the timed steps
    nonfinite = 0
    # the fused optimizers skip a non-finite step on the device, and a graphed step holds one: their
    # steps' values are read on the host a step later; a plain optimizer's loss is read before its step
    read_late = graphed is not None or is_fused(optimizer)
    pending = None
    last_scale = precision.get_scale()
    grad_norms = []     # since the last log line: floats read late (settle), else the step's own values
                        # (tensors under a plain optimizer), read once at the log line

    def settle(values: StepValues) -> bool:
        """Count a step's loss on the host, or count a non-finite one (stopping after
        EXTRA.MAX_NONFINITE_STEPS in a row). Returns whether it was finite on every rank."""
        nonlocal nonfinite, last_scale
        loss, finite, norm, scale = values.read()
        if norm == norm:                    # not nan: an optimizer step
            grad_norms.append(norm)
        if scale == scale:
            last_scale = scale
        if finite == 1.0:
            nonfinite = 0
            loss_meter.update(loss, values.n)
            return True
        nonfinite += 1
        logger.warning(f'non-finite loss at epoch {epoch} step {values.step} ({nonfinite} in a row): step skipped')
        if nonfinite >= config.EXTRA.MAX_NONFINITE_STEPS:
            raise NonFiniteLossError(
                f'{nonfinite} consecutive non-finite losses (EXTRA.MAX_NONFINITE_STEPS): stopping. '
                f'The last good checkpoint in {config.OUTPUT} is intact; lower the LR, raise '
                f'WARMUP_EPOCHS or use AMP_DTYPE bfloat16, then resume from it.')
        return False

    start = end = timed_start = time.time()
    timed_from = 0
    # the epoch's img/s leaves out the first steps and the batches the loader readied meanwhile
    queued = queued_batches(data_loader)
    timed_at = min(max(10, queued), num_batches - 1)
    # the DataLoader workers' CPU seconds at the timed steps' start and `queued` batches before the end
    # (their last batches then still to make: past it they idle, or have exited)
    cpu_from = cpu_to = {}
    cpu_at, cpu_end = min(num_batches - 1, max(timed_at + 1, num_batches - 1 - queued)), 0.0
    for idx, (samples, targets) in enumerate(data_loader):
        if idx >= num_batches:
            break
        data_time.update(time.time() - end)
        if idx > timed_at:
            waited += data_time.val
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        samples = precision.cast_input(samples)
        update = (idx + 1) % accum == 0
        if graphed is not None:
            # forward, backward and (on a cycle's last micro-step) the fused optimizer in one replay
            loss, finite, grad_norm = graphed(samples, targets, first=idx % accum == 0, update=update)
            if update:
                lr_scheduler.step_update(epoch * steps_per_epoch + (idx + 1) // accum)
        else:
            # Non-final micro-steps accumulate locally: no all-reduce until the last one.
            sync_ctx = model.no_sync() if (not update and hasattr(model, 'no_sync')) else contextlib.nullcontext()
            with sync_ctx:
                with precision.autocast():
                    outputs = model(samples)
                loss = criterion(outputs.float(), targets)        # the loss in fp32 at every level
                del outputs
                finite = torch.isfinite(loss.detach()).float().reshape(1)
                if is_dist():                                      # every rank skips, or none does
                    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                if not read_late and not settle(StepValues(idx, targets.size(0), loss, finite)):
                    # the step's one host sync: a plain optimizer must not step on a non-finite loss
                    precision.zero_grad(optimizer, model)
                    continue
                precision.backward(loss / accum)
            grad_norm = None
            if update:
                grad_norm = precision.step(optimizer, master.parameters(), config.TRAIN.CLIP_GRAD)
                precision.zero_grad(optimizer, model)
                lr_scheduler.step_update(epoch * steps_per_epoch + (idx + 1) // accum)
        if read_late:
            if pending is not None:
                settle(pending)
            pending = StepValues(idx, targets.size(0), loss, finite, grad_norm if update else None,
                                 precision.scale_tensor() if update else None)
        elif grad_norm is not None:
            grad_norms.append(grad_norm)
        batch_time.update(time.time() - end)
        end = time.time()
        if idx == timed_at:
            timed_from, timed_start = idx, end
            cpu_from = worker_cpu_seconds() if config.DATA.NUM_WORKERS else {}
        if idx == cpu_at and cpu_from:
            cpu_to, cpu_end = worker_cpu_seconds(), end
        if idx % config.PRINT_FREQ == 0:
            if idx == 0 and pending is not None:
                # the epoch's first line, nothing read yet: wait for this one step (once an epoch)
                # rather than print zeros; later lines show values up to the step before theirs
                settle(pending)
                pending = None
            for n in grad_norms:
                norm_meter.update(float(n))
            grad_norms.clear()
            scaler_meter.update(last_scale if read_late else precision.get_scale())
            lr = optimizer.param_groups[0]['lr']
            wd = optimizer.param_groups[0]['weight_decay']
            mem = torch.cuda.max_memory_allocated() / (1024.0 * 1024.0) if torch.cuda.is_available() else 0
            etas = batch_time.avg * (num_batches - idx)
            logger.info(
                f'Train: [{epoch}/{config.TRAIN.EPOCHS}][{idx}/{num_batches}]\t'
                f'eta {datetime.timedelta(seconds=int(etas))} lr {lr:.6f}\t wd {wd:.4f}\t'
                f'time {batch_time.val:.4f} ({batch_time.avg:.4f})\t'
                f'data {data_time.val:.4f} ({data_time.avg:.4f})\t'
                f'loss {loss_meter.val:.4f} ({loss_meter.avg:.4f})\t'
                f'grad_norm {norm_meter.val:.4f} ({norm_meter.avg:.4f})\t'
                f'loss_scale {scaler_meter.val:.4f} ({scaler_meter.avg:.4f})\t'
                f'mem {mem:.0f}MB')
    if pending is not None:
        settle(pending)
    epoch_time = time.time() - start
    steady = ''
    hint = None
    if num_batches - 1 > timed_from:
        window = max(end - timed_start, 1e-9)
        rate = (num_batches - 1 - timed_from) * config.DATA.BATCH_SIZE * world_size() / window
        share = waited / window
        # how busy this rank's workers were meanwhile: near 100% they are the limit
        busy = workers_busy(cpu_from, cpu_to, cpu_end - timed_start)
        busy_text = '' if busy is None else f', its workers busy {100 * busy:.0f}%'
        steady = (f' ({rate:.1f} images/s from step {timed_from}, all ranks; waiting for input {100 * share:.0f}%'
                  f'{busy_text})')
        hint = input_bound_hint(config, share, busy)
    logger.info(f'EPOCH {epoch} training takes {datetime.timedelta(seconds=int(epoch_time))}{steady} '
                f'train_loss {loss_meter.avg:.6f}')
    if hint and epoch == config.TRAIN.START_EPOCH:         # once a run
        logger.info(hint)
    if epoch == config.TRAIN.START_EPOCH and hasattr(data_loader, 'notes'):     # the gpu pipeline's DeviceLoader
        for line in data_loader.notes():
            logger.info(line)
    return loss_meter.avg


@torch.no_grad()
def validate(config, data_loader, model, precision, logger):
    """Exact dataset metrics: per-rank sums and counts, all-reduced (no averages of averages)."""
    criterion = torch.nn.CrossEntropyLoss(reduction='sum')
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(4, dtype=torch.float64, device=device)    # loss sum, top1, top5, count
    end = time.time()
    for idx, (images, target) in enumerate(data_loader):
        images = precision.cast_input(images.to(device, non_blocking=True))
        target = target.to(device, non_blocking=True)
        with precision.autocast():
            output = model(images)
        output = output.float()
        n = target.size(0)
        acc1, acc5 = accuracy(output, target, topk=(1, min(5, output.shape[1])))
        # summed on the device: no host sync per batch
        totals += torch.stack([criterion(output, target).double(), acc1.double() * n / 100,
                               acc5.double() * n / 100, torch.full((), n, dtype=torch.float64, device=device)])
        if idx % config.PRINT_FREQ == 0:
            logger.info(f'Test: [{idx}/{len(data_loader)}]\ttime {time.time() - end:.3f}')
            end = time.time()
    totals = reduce_tensor(totals, average=False)
    loss, top1, top5, count = totals.tolist()
    acc1, acc5, loss = 100 * top1 / count, 100 * top5 / count, loss / count
    logger.info(f' * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} (loss {loss:.4f}, {int(count)} images)')
    return acc1, acc5, loss


@torch.no_grad()
def throughput(data_loader, model, precision, logger) -> float:
    """Upstream's protocol (eval, 50 warm-up and 30 timed forwards on one batch), at the run's precision."""
    model.eval()
    device = next(model.parameters()).device
    images, _ = next(iter(data_loader))
    images = precision.cast_input(images.to(device, non_blocking=True))
    batch_size = images.shape[0]
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    with precision.autocast():
        for _ in range(50):
            model(images)
        sync()
        logger.info('throughput averaged with 30 times')
        tic = time.time()
        for _ in range(30):
            model(images)
        sync()
    value = 30 * batch_size / (time.time() - tic)
    logger.info(f'batch_size {batch_size} throughput {value:.1f} images/s (precision: {precision.describe()})')
    return value


def cli(argv=None) -> int:
    """The command line: a user's error (config, data, checkpoint, kernel availability) prints as
    one line and exits 2; a traceback means a bug."""
    try:
        _args, config = parse_option(argv)
        if torch.cuda.is_available():
            torch.backends.cudnn.benchmark = True
        warnings.filterwarnings('ignore', message='.*TypedStorage.*')
        result = main(config)
        if rank() == 0:
            print('RESULT ' + json.dumps(result))
        return 0
    except USER_ERRORS as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        return 2
    finally:
        if is_dist():
            dist.destroy_process_group()


if __name__ == '__main__':
    sys.exit(cli())
