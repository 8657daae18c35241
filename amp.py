"""Precision levels (ours; apex.amp no longer exists): O0, O1, O2, O3 in float16 or bfloat16.

  O0  fp32 everywhere (TF32 matmuls only with EXTRA.TF32, off as in PyTorch).
  O1  autocast to AMP_DTYPE, fp32 weights (upstream's AMP). Dynamic loss scaling for fp16.
  O2  the model's weights and activations in AMP_DTYPE, fp32 master weights held by the optimizer,
      the loss in fp32; LayerNorm and softmax compute their statistics in fp32 inside their
      kernels. Dynamic loss scaling for fp16, none for bf16.
  O3  pure AMP_DTYPE, no master weights (inference; training allowed with a warning).

For O2 the optimizer steps an fp32 copy of the model (`master`); after each step the half model
(`model`) receives the new weights. Checkpoints are written from the master, in fp32, in the
standard layout, so a checkpoint from any level loads at any other.
"""
import contextlib
import copy
import logging
from typing import Iterable, Optional

import torch

from config import FP8_LAYER_NAMES
from kernels.optimizers import is_fused

logger = logging.getLogger(__name__)

DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16}


class Precision:
    def __init__(self, level: str, dtype: str = 'float16', device: torch.device = torch.device('cpu'),
                 tf32: bool = False):
        if level not in ('O0', 'O1', 'O2', 'O3'):
            raise ValueError(f'AMP opt level {level!r} is not one of O0, O1, O2, O3')
        self.level = level
        self.dtype = DTYPES[dtype] if level != 'O0' else torch.float32
        self.device = torch.device(device)
        self.half_weights = level in ('O2', 'O3')
        scale = self.dtype == torch.float16 and level in ('O1', 'O2')
        self._scaler = torch.amp.GradScaler(self.device.type, enabled=scale)
        self._pairs = []          # (master param, model param) for O2
        self._half_of = {}        # id(master param) -> model param, for O2
        if level == 'O0' and self.device.type == 'cuda':
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32

    def describe(self) -> str:
        return {'O0': 'O0 fp32', 'O1': f'O1 autocast {self.dtype_name}',
                'O2': f'O2 {self.dtype_name} weights + fp32 master', 'O3': f'O3 pure {self.dtype_name}'}[self.level]

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace('torch.', '')

    # ------------------------------------------------------------------ model
    def prepare(self, model: torch.nn.Module):
        """-> (compute model, master model). `model` is fp32 and already holds its weights."""
        if self.level == 'O2':
            master = model
            model = copy.deepcopy(master).to(self.dtype)
            self._pairs = [(pm, p) for pm, p in zip(master.parameters(), model.parameters())]
            self._half_of = {id(pm): p for pm, p in self._pairs}
            return model, master
        if self.level == 'O3':
            model = model.to(self.dtype)
        return model, model

    def autocast(self):
        if self.level == 'O1':
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def cast_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype) if self.half_weights else x

    # ------------------------------------------------------------------ optimisation
    def backward(self, loss: torch.Tensor) -> None:
        self._scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, parameters: Iterable[torch.Tensor],
             clip_grad: Optional[float], hparams: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Unscale, clip (norm over master grads), step, update the scale; returns the grad norm.
        hparams: the fused optimizers' device copy of the groups' hyperparameters (CUDA graphs)."""
        if is_fused(optimizer):
            return self._fused_step(optimizer, clip_grad, hparams)
        if self._pairs:
            # half grads -> fp32 master grads (still scaled), one foreach copy; the master grads
            # persist across steps (only the half model's grads are cleared).
            live = [(pm, p) for pm, p in self._pairs if p.grad is not None]
            for pm, _ in live:
                if pm.grad is None:
                    pm.grad = torch.empty_like(pm)
            for pm, p in self._pairs:
                if p.grad is None:
                    pm.grad = None
            torch._foreach_copy_([pm.grad for pm, _ in live], [p.grad for _, p in live])
        self._scaler.unscale_(optimizer)
        params = [p for p in parameters if p.grad is not None]
        if clip_grad:
            norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params])) \
                if params else torch.zeros(())
        self._scaler.step(optimizer)
        self._scaler.update()
        if self._pairs:
            with torch.no_grad():
                torch._foreach_copy_([p for _, p in self._pairs], [pm for pm, _ in self._pairs])
        return norm

    def grad_holders(self, optimizer) -> list:
        """The tensors whose .grad a fused optimizer reads: the half model's parameters at O2,
        else its own parameters."""
        return [self._half_of[id(p)] for p in optimizer._params] if self._pairs else list(optimizer._params)

    def _fused_step(self, optimizer, clip_grad: Optional[float], hparams: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Our fused optimizers fold unscaling, clipping, the inf/nan skip and (O2) the half-weight
        write into their own launches, with no host sync. The scale update reads their found_inf
        on the device, as GradScaler.update does."""
        scaler = self._scaler
        scale = scaler._scale if scaler.is_enabled() else None
        halves = [self._half_of[id(p)] for p in optimizer._params] if self._pairs else None
        norm, found_inf = optimizer.fused_step(clip_grad, scale, grads_from=halves, write_to=halves, hparams=hparams)
        if scale is not None:
            torch._amp_update_scale_(scaler._scale, scaler._growth_tracker, found_inf, scaler._growth_factor,
                                     scaler._backoff_factor, scaler._growth_interval)
        return norm

    def zero_grad(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
        if self._pairs:
            # master grads are overwritten by the next step. The pairs hold every model parameter:
            # model.zero_grad walks the module tree (~280 us a step for Swin-T on a 2-core CPU box,
            # host time an eager step pays; this loop ~11 us)
            for _, p in self._pairs:
                p.grad = None
        else:
            optimizer.zero_grad()        # set_to_none by default (torch and apex alike)

    def sync_from_master(self) -> None:
        """Copy master weights into the half model (after loading a checkpoint into the master)."""
        if self._pairs:
            with torch.no_grad():
                torch._foreach_copy_([p for _, p in self._pairs], [pm for pm, _ in self._pairs])

    def get_scale(self) -> float:
        return self._scaler.get_scale() if self._scaler.is_enabled() else 1.0

    def scale_tensor(self) -> Optional[torch.Tensor]:
        """The loss scale as the device tensor the scaler keeps (no host sync); None without one."""
        return self._scaler._scale if self._scaler.is_enabled() else None

    def state_dict(self) -> dict:
        return self._scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._scaler.load_state_dict(state)


# ----------------------------------------------------------------------------- FP8 (--fp8, torchao)
# The Linear layers whose GEMMs run in float8 (torchao's dynamic scaling; the weights, their
# gradients and the checkpoint stay in the run's precision): attention qkv and proj, the MLP, the
# patch-merging reduction. The head and V2's small cpb MLP stay in bf16; so does any layer whose
# dimensions are not multiples of 16 (the float8 GEMMs need them). EXTRA.FP8_LAYERS narrows the set
# (e.g. [fc1, fc2]: the MLP only) to find where float8 pays.
FP8_LAYERS = FP8_LAYER_NAMES


def fp8_layer(module: torch.nn.Module, name: str, layers=FP8_LAYERS) -> bool:
    """Whether the Linear at `name` runs in FP8 when `layers` (names of FP8_LAYERS) are chosen."""
    return (isinstance(module, torch.nn.Linear) and name.split('.')[-1] in layers
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def check_fp8(config, device: torch.device) -> None:
    """Refuse --fp8, at start and with the reason, where it cannot run as documented."""
    from config import ConfigError
    why = _fp8_refusal(config, device)
    if why:
        raise ConfigError(f'--fp8 {why}')


def _fp8_refusal(config, device: torch.device) -> Optional[str]:
    from config import amp_opt_level
    try:
        import torchao.float8  # noqa: F401
    except Exception as e:      # missing, or built for another torch
        return f'needs torchao (pip install torchao; import failed: {type(e).__name__}: {e})'
    if device.type != 'cuda':
        return 'needs an NVIDIA GPU with float8 tensor cores (Hopper or newer); it is refused on the CPU'
    if torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        return f'needs float8 tensor cores (compute capability 8.9 or newer); this GPU is {major}.{minor}'
    if not (amp_opt_level(config) == 'O2' and config.AMP_DTYPE == 'bfloat16'):
        return 'runs on top of O2 bf16 (fp32 master weights): add --amp-opt-level O2 --amp-dtype bfloat16'
    if config.FUSED_MLP or config.FUSED_DENSE:
        return 'cannot run the GEMMs of --fused_mlp / --fused_dense (they are our own bf16 GEMMs): drop those'
    return None


def enable_fp8(model: torch.nn.Module, recipe: str = 'tensorwise', emulate: bool = False,
               layers=FP8_LAYERS) -> list:
    """Swap the FP8 layers (fp8_layer; `layers`: which of FP8_LAYERS) for torchao's float8 Linear,
    sharing their parameters (the state dict is unchanged); -> their names. emulate: torchao's
    reference arithmetic (tests on the CPU)."""
    import dataclasses
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    fp8_config = Float8LinearConfig.from_recipe_name(recipe)
    if emulate:
        fp8_config = dataclasses.replace(fp8_config, emulate=True)
    unknown = set(layers) - set(FP8_LAYERS)
    if unknown or not layers:
        raise ValueError(f'FP8 layers must be a non-empty subset of {list(FP8_LAYERS)}, got {list(layers)}')
    chosen = [name for name, m in model.named_modules() if fp8_layer(m, name, layers)]
    convert_to_float8_training(model, config=fp8_config, module_filter_fn=lambda m, n: fp8_layer(m, n, layers))
    return chosen
