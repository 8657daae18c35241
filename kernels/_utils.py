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
def apex_available(module: str = 'apex') -> bool:
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


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


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
