"""Batched JPEG decode on the GPU's hardware JPEG engines, several calls at once.

torchvision's `decode_jpeg(list, device='cuda')` drives nvJPEG's hardware backend through one
process-wide decoder behind a lock: one batched call at a time. A call returns only when its whole
batch is decoded, and nvJPEG synchronises once an image inside it; next to a training step those
waits stretch, and one call's throughput falls ~4x (an H200, 2026-11-29,
benchmarks/nvjpeg_formats.py: 128-image calls 18,603 img/s idle, 3,897 with the GPU kept busy by
GEMMs). It is not the decode's own kernels: output formats that need no colour-conversion kernel
slow the same. Calls on separate decoders overlap, though: 2 / 4 concurrent calls under the same
load gave 5,790 / 8,518 img/s. So here each decoder has its own nvJPEG handle, state and stream,
the same library calls go through ctypes (no build step), and the pipeline runs several side by
side (EXTRA.DECODE_THREADS). The output is what torchvision's call returns: [3, H, W] uint8 RGB on
the device, decoded by the same library (the tests compare them byte for byte).

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
    """One nvJPEG handle, batched-decode state and stream on one device. One call of decode() at a
    time on each decoder; several decoders may decode at once from different threads."""

    _lib = None

    @classmethod
    def create(cls, device: torch.device):
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
            return cls(device)
        except RuntimeError:
            return None

    def __init__(self, device: torch.device):
        lib = self._lib
        self.device = device
        with torch.cuda.device(device):
            self.stream = torch.cuda.Stream(device)
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

    def decode(self, payloads: list, stream: torch.cuda.Stream) -> list:
        """Contiguous uint8 CPU tensors of JPEG bitstreams (each one `supported`) -> [3, H, W] uint8
        RGB tensors on the device (views of one buffer allocated on `stream`), complete when this
        returns. The ctypes calls release the GIL while nvJPEG works; Python's share is kept small
        (the training loop needs the GIL): one allocation, the pointer tables built with numpy."""
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
        with torch.cuda.stream(stream):
            buffer = torch.empty(int(3 * plane.sum()), dtype=torch.uint8, device=self.device)
        images = np.zeros((n, 2 * _MAX_COMPONENT), dtype=np.uint64)     # nvjpegImage_t: 4 pointers, 4 pitches
        for c in range(3):
            images[:, c] = buffer.data_ptr() + start + c * plane
            images[:, _MAX_COMPONENT + c] = hw[:, 1]
        self.stream.wait_stream(stream)        # the buffer's earlier users on `stream` are done first
        self._check(lib.nvjpegDecodeBatchedInitialize(self.handle, self.state, n, 1, _OUTPUT_RGB),
                    'nvjpegDecodeBatchedInitialize')
        self._check(lib.nvjpegDecodeBatched(self.handle, self.state, ctypes.c_void_p(data.ctypes.data),
                                            ctypes.c_void_p(lengths.ctypes.data), ctypes.c_void_p(images.ctypes.data),
                                            ctypes.c_void_p(self.stream.cuda_stream)), 'nvjpegDecodeBatched')
        # the bitstreams are host memory the library reads asynchronously: done with them only
        # when the stream is (torchvision's call waits the same way); the images are then complete
        self.stream.synchronize()
        return [buffer[s:s + 3 * p].view(3, h, w) for s, p, (h, w) in zip(start.tolist(), plane.tolist(), hw.tolist())]
