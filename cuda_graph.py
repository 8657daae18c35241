"""--cuda-graph (config CUDA_GRAPH): the whole training step as one CUDA graph, without torch.compile.

An eager Swin step launches about a thousand kernels, each costing host time (Python, autograd,
Triton's argument binding); on a fast GPU the host, not the GPU, sets the pace. Here the step
(zero the gradients, forward, loss, backward, the fused optimizer with unscale / clip / inf skip /
the O2 half-weight write, the loss-scale update) is captured once and then replayed with one launch,
running the same kernels in the same order: the same math as the eager step.

The rules that make that true:
- static shapes: inputs and targets are copied into fixed buffers; a batch of another shape is
  run eagerly once and then captured again;
- the gradients are allocated once and zeroed inside the graph (never set to None), so every
  replay writes the same memory the optimizer's address tables point to;
- the learning rate and weight decay change every step: they reach the optimizer through a device
  tensor that is refreshed before each replay, never as values frozen at capture;
- dropout / drop-path draw from torch's CUDA generator, which advances on every replay as it would
  in eager steps;
- the first WARMUP steps run eagerly (lazy initialisation: Triton compiles, cuBLAS handles, the
  optimizer's state and tables) on a side stream, as capture requires; they are real training steps;
- mixup/cutmix, the host-side sampling of the loader and the loss read-back stay outside the graph;
- gradient accumulation (TRAIN.ACCUMULATION_STEPS = k): a cycle of k micro-steps is up to three
  graphs, as the eager loop runs it: the first zeroes the gradients, each back-propagates loss / k
  into them, the last steps the optimizer. The graphs share one memory pool (they run one after
  the other on one stream, and their outputs are copied out before the next replay), so the
  activations are held once, not once per graph.

- several GPUs (torchrun): the model is not wrapped in DDP (its reducer runs host-side hooks during
  the backward, which a replay does not). Each rank's gradients are views into one flat buffer a
  dtype (`FlatGradients`), and after the backward of a cycle's last micro-step the step divides that
  buffer by the number of ranks and all-reduces it (NCCL operations can be captured in a graph): DDP's
  average, as DDP computes it (divided, then summed), and each rank's loss-is-finite flag reduced by
  MIN as main.py's eager loop does. Unlike DDP's buckets the all-reduce does not overlap the backward
  (a Swin-T O2 step's 56 MB of bf16 gradients; Swin-L's 394 MB).

Needs a fused optimizer (--fused_adam or --optim fused_lamb: they never sync the host) and a CUDA
device; --use-checkpoint and --compile are refused with the reason (the first is not implemented,
and --compile has its own CUDA graphs: EXTRA.COMPILE_MODE reduce-overhead).
"""
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist

from config import ConfigError
from kernels.optimizers import is_fused

WARMUP = 3      # eager steps before the capture (and after a shape change: 1)


def check_cuda_graph_config(config, device: torch.device, optimizer) -> None:
    """Refuse, at start and with the reason, what a captured step cannot do."""
    why = None
    if device.type != 'cuda':
        why = 'needs a CUDA GPU'
    elif not is_fused(optimizer):
        why = ('needs a fused optimizer that never syncs the host: add --fused_adam '
               '(or --optim fused_lamb)')
    elif config.TRAIN.USE_CHECKPOINT:
        why = ('does not support --use-checkpoint (activation checkpointing saves and restores the RNG '
               'state on the host, which a capture cannot contain): drop one of the two')
    elif config.COMPILE:
        why = ('and --compile are two ways to the same end: use one (--compile with '
               'EXTRA.COMPILE_MODE reduce-overhead captures CUDA graphs of its own)')
    if why:
        raise ConfigError(f'--cuda-graph {why}')


class FlatGradients:
    """The gradients of `params` as views into one flat buffer a dtype, so that DDP's average over the
    ranks is one all-reduce a dtype on memory that never moves (what a captured graph needs). The
    views are the tensors' .grad from here on: autograd accumulates into them in place."""

    def __init__(self, params):
        by_dtype = {}
        for p in params:
            if not p.is_contiguous():
                raise ValueError(f'FlatGradients needs contiguous parameters; one of shape {tuple(p.shape)} is not')
            by_dtype.setdefault(p.dtype, []).append(p)
        self.flats = []
        for group in by_dtype.values():
            flat = torch.zeros(sum(p.numel() for p in group), dtype=group[0].dtype, device=group[0].device)
            start = 0
            for p in group:
                p.grad = flat[start:start + p.numel()].view_as(p)
                start += p.numel()
            self.flats.append(flat)

    def average(self) -> None:
        """Every rank's gradients -> their mean over the ranks, divided before the sum as DDP does."""
        world = dist.get_world_size()
        for flat in self.flats:
            flat.div_(world)
            dist.all_reduce(flat)


class GraphedTrainStep:
    """step(x, y) -> (loss, finite, grad norm) as fresh device tensors (no host sync), one whole
    training step, captured after WARMUP eager steps and replayed from then on. With gradient
    accumulation, step(x, y, first=..., update=...) is one micro-step: `first` zeroes the
    gradients before it, `update` steps the optimizer after it (the grad norm is a placeholder
    zero without it); `accum` divides the loss before the backward. `distributed`: average the
    gradients over torch.distributed's ranks before each optimizer step (the model must not be DDP)."""

    def __init__(self, model: torch.nn.Module, criterion: Callable, optimizer, precision,
                 clip_grad: Optional[float], warmup: int = WARMUP, accum: int = 1, distributed: bool = False):
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.precision, self.clip_grad, self.warmup, self.accum = precision, clip_grad, warmup, accum
        self.graphs, self.outs = {}, {}          # by (first, update): the micro-step kinds
        self.eager_left = warmup * accum         # micro-steps
        self.shapes = None
        self.captures = 0               # how many graphs were captured (tests, log)
        holders = precision.grad_holders(optimizer)
        self.device = holders[0].device
        # gradients live for the whole run: allocated once, zeroed in-graph
        self.flat = FlatGradients(holders) if distributed else None
        for p in holders:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.grads = [p.grad for p in holders]
        self.hparams = torch.empty((len(optimizer.param_groups), 4), dtype=torch.float64, device=self.device)
        self.side = torch.cuda.Stream(self.device)

    @property
    def graph(self):
        """The one-step graph when there is no accumulation (None before the capture)."""
        return self.graphs.get((True, True))

    def _step(self, first: bool, update: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The micro-step itself, on the static buffers: what is captured, and what warm-up runs."""
        if first:
            torch._foreach_zero_(self.grads)
        with self.precision.autocast():
            out = self.model(self.x)
        loss = self.criterion(out.float(), self.y)
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        if self.flat is not None:                       # every rank skips, or none does
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        self.precision.backward(loss / self.accum)                 # as main.py's eager loop
        if update:
            if self.flat is not None:
                self.flat.average()
            norm = self.precision.step(self.optimizer, None, self.clip_grad, hparams=self.hparams)
        else:
            norm = torch.zeros((), device=self.device)
        return loss.detach(), finite, norm

    def __call__(self, x: torch.Tensor, y: torch.Tensor, first: bool = True, update: bool = True):
        kind = (first, update)
        shapes = (x.shape, x.dtype, y.shape, y.dtype)
        if shapes != self.shapes:             # first call, or a batch of another shape: start over
            self.graphs, self.outs, self.shapes = {}, {}, shapes
            self.x, self.y = torch.empty_like(x), torch.empty_like(y)
            self.eager_left = max(self.eager_left, 1)
        self.x.copy_(x, non_blocking=True)
        self.y.copy_(y, non_blocking=True)
        # this step's hyperparameters, ordered before the step on the stream that runs it
        self.hparams.copy_(self.optimizer.hparams_rows(), non_blocking=True)
        if kind not in self.graphs and self.eager_left > 0:
            self.eager_left -= 1
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                result = self._step(first, update)
            torch.cuda.current_stream().wait_stream(self.side)
            return tuple(t.clone() for t in result)
        if kind not in self.graphs:
            graph = torch.cuda.CUDAGraph()
            pool = next(iter(self.graphs.values())).pool() if self.graphs else None
            torch.cuda.synchronize()
            # thread_local: the input pipeline's threads may use CUDA while this thread captures
            with torch.cuda.graph(graph, pool=pool, capture_error_mode='thread_local'):
                self.outs[kind] = self._step(first, update)
            self.graphs[kind] = graph
            self.captures += 1
        self.graphs[kind].replay()
        return tuple(t.clone() for t in self.outs[kind])   # the next replay overwrites the static outputs
