"""Helpers shared by the op files: availability of triton/apex, interpreter mode, launch checks."""
import functools
import importlib
import os

import torch


@functools.lru_cache(None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # triton missing or broken for this platform
        return False
    return True


@functools.lru_cache(None)
def importable(module: str) -> bool:
    """True when `module` imports here (optional dependencies: apex, torchao)."""
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


def apex_available(module: str = 'apex') -> bool:
    return importable(module)


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')


def check_triton_device(*tensors: torch.Tensor) -> None:
    """Fail clearly when a Triton kernel is asked to run where it cannot."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type == 'cpu' and not triton_interpret():
            raise RuntimeError(
                'a Triton kernel got a CPU tensor: Triton runs on CUDA, or on the CPU only under '
                'TRITON_INTERPRET=1 (set it before starting Python). Use KERNEL_BACKEND torch or auto on CPU.')


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor (launch metadata) on `device`. On CUDA through pinned memory from torch's
    caching host allocator, which keeps the block until the copy is done: the copy is then truly
    asynchronous, where one from pageable memory is staged by the driver and may hold the calling
    thread until the stream catches up (CUDA's API synchronization rules)."""
    if device.type != 'cuda' or host.device.type != 'cpu':
        return host.to(device)
    pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
    pinned.copy_(host)
    return pinned.to(device, non_blocking=True)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """Ceiling division for launch grids. triton.cdiv is a constexpr function (usable inside
    kernels): from the host it costs ~2 us a call, 30x this (CPU box, Triton 3.8)."""
    return -(-a // b)


@functools.lru_cache(None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: launchers ask every call); 2 on the CPU
    (the interpreter), so grid sizing stays small there."""
    if device.type != 'cuda':
        return 2
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def autocast_inputs(*tensors):
    """Cast to the autocast dtype where autocast is on for these tensors' device (what F.linear
    does under autocast); the cast is differentiable, so fp32 weights get fp32 gradients."""
    dev = tensors[0].device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        return tuple(t.to(dtype) if t is not None else None for t in tensors)
    return tensors
