"""Batched JPEG decode on the GPU's hardware JPEG engine, on a stream of our choosing.

torchvision's `decode_jpeg(list, device='cuda')` drives the same library (nvJPEG's hardware backend)
but on a normal-priority stream of its own, behind one process-wide lock. Each image's decode ends in
a small colour-conversion kernel, and next to a training step every one of those waits for the
step's kernels to leave room on the SMs: 128 images waited ~12 ms a batch on an H200 (2026-11-29).
Here the same calls go to nvJPEG through ctypes (no build step) on a high-priority stream, so those
kernels are scheduled ahead of the step's. The output is what torchvision's call returns: [3, H, W]
uint8 RGB tensors on the device, decoded by the same library (the tests compare them byte for byte).

`HardwareJpegDecoder.create(device)` returns None where this is not available (no CUDA, no hardware
JPEG engine: before A100/H100, or no libnvjpeg beside torchvision): the caller keeps torchvision's path.
"""
import ctypes
import ctypes.util
import os

import numpy as np
import torch

_MAX_COMPONENT = 4          # NVJPEG_MAX_COMPONENT
_BACKEND_HARDWARE = 3       # nvjpegBackend_t NVJPEG_BACKEND_HARDWARE
_OUTPUT_RGB = 3             # nvjpegOutputFormat_t NVJPEG_OUTPUT_RGB: planar R, G, B
_CSS_UNKNOWN = -1           # nvjpegChromaSubsampling_t NVJPEG_CSS_UNKNOWN


def _find_library():
    """The libnvjpeg that torchvision's image extension loaded (the one its own GPU decode uses),
    else one on the library path."""
    try:
        import torchvision.io.image  # noqa: F401  (loads the extension, which links libnvjpeg)
        with open('/proc/self/maps') as f:
            for line in f:
                path = line.split()[-1]
                if 'libnvjpeg' in os.path.basename(path) and os.path.exists(path):
                    return path
    except (ImportError, OSError):
        pass
    return ctypes.util.find_library('nvjpeg')


class HardwareJpegDecoder:
    """One nvJPEG handle and batched-decode state on one device; decode() is not thread-safe (one
    decoder per pipeline thread)."""

    _lib = None

    @classmethod
    def create(cls, device: torch.device, priority: int = -1):
        """-> a decoder, or None where nvJPEG's hardware backend is not available here."""
        if device.type != 'cuda' or not torch.cuda.is_available():
            return None
        if cls._lib is None:
            path = _find_library()
            if path is None:
                return None
            try:
                cls._lib = ctypes.CDLL(path)
            except OSError:
                return None
        try:
            return cls(device, priority)
        except RuntimeError:
            return None

    def __init__(self, device: torch.device, priority: int):
        lib = self._lib
        self.device = device
        with torch.cuda.device(device):
            # highest priority the device offers at or above the one asked (CUDA: lower is higher)
            self.stream = torch.cuda.Stream(device, priority=priority)
            self.handle, self.state, self.parsed = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
            self._check(lib.nvjpegCreateEx(_BACKEND_HARDWARE, None, None, 0, ctypes.byref(self.handle)),
                        'nvjpegCreateEx (hardware backend)')
            self._check(lib.nvjpegJpegStateCreate(self.handle, ctypes.byref(self.state)), 'nvjpegJpegStateCreate')
            self._check(lib.nvjpegJpegStreamCreate(self.handle, ctypes.byref(self.parsed)), 'nvjpegJpegStreamCreate')

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f'{what} failed: nvjpegStatus {status}')

    def supported(self, payload: torch.Tensor) -> bool:
        """Whether the hardware batched decode takes this bitstream (baseline JPEG, a supported
        chroma subsampling)."""
        ok = ctypes.c_int(-1)
        if self._lib.nvjpegJpegStreamParseHeader(self.handle, ctypes.c_void_p(payload.data_ptr()),
                                                 ctypes.c_size_t(payload.numel()), self.parsed) != 0:
            return False
        return self._lib.nvjpegDecodeBatchedSupported(self.handle, self.parsed, ctypes.byref(ok)) == 0 and ok.value == 0

    def decode(self, payloads: list) -> list:
        """Contiguous uint8 CPU tensors of JPEG bitstreams (each one `supported`) -> [3, H, W] uint8
        RGB tensors on the device (views of one buffer), ready on the calling thread's current stream
        when this returns. Python's share of the work is kept small (it holds the GIL, which the
        training loop needs): one allocation, the pointer tables built with numpy."""
        lib, n = self._lib, len(payloads)
        if n == 0:
            return []
        components, subsampling = ctypes.c_int(), ctypes.c_int()
        widths, heights = (ctypes.c_int * _MAX_COMPONENT)(), (ctypes.c_int * _MAX_COMPONENT)()
        data = np.array([p.data_ptr() for p in payloads], dtype=np.uint64)
        lengths = np.array([p.numel() for p in payloads], dtype=np.uint64)
        hw = np.empty((n, 2), dtype=np.int64)
        for i in range(n):
            self._check(lib.nvjpegGetImageInfo(self.handle, ctypes.c_void_p(int(data[i])),
                                               ctypes.c_size_t(int(lengths[i])), ctypes.byref(components),
                                               ctypes.byref(subsampling), widths, heights), 'nvjpegGetImageInfo')
            if subsampling.value == _CSS_UNKNOWN:
                raise RuntimeError('nvjpegGetImageInfo: unknown chroma subsampling')
            hw[i] = heights[0], widths[0]
        plane = hw[:, 0] * hw[:, 1]
        start = np.concatenate([[0], np.cumsum(3 * plane)[:-1]])
        current = torch.cuda.current_stream(self.device)
        buffer = torch.empty(int(3 * plane.sum()), dtype=torch.uint8, device=self.device)   # the current stream's
        images = np.zeros((n, 2 * _MAX_COMPONENT), dtype=np.uint64)     # nvjpegImage_t: 4 pointers, 4 pitches
        for c in range(3):
            images[:, c] = buffer.data_ptr() + start + c * plane
            images[:, _MAX_COMPONENT + c] = hw[:, 1]
        self.stream.wait_stream(current)
        self._check(lib.nvjpegDecodeBatchedInitialize(self.handle, self.state, n, 1, _OUTPUT_RGB),
                    'nvjpegDecodeBatchedInitialize')
        self._check(lib.nvjpegDecodeBatched(self.handle, self.state, ctypes.c_void_p(data.ctypes.data),
                                            ctypes.c_void_p(lengths.ctypes.data), ctypes.c_void_p(images.ctypes.data),
                                            ctypes.c_void_p(self.stream.cuda_stream)), 'nvjpegDecodeBatched')
        # the bitstreams are host memory the library reads asynchronously: done with them only
        # when the stream is (torchvision's call waits the same way)
        self.stream.synchronize()
        current.wait_stream(self.stream)
        return [buffer[s:s + 3 * p].view(3, h, w) for s, p, (h, w) in zip(start.tolist(), plane.tolist(), hw.tolist())]
