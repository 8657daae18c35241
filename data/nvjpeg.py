"""nvJPEG's hardware batched decode (the JPEG engines of A100 / H100-class GPUs), called through ctypes
on the library torchvision already loads: no build step.

Why not torchvision's `decode_jpeg(list, device='cuda')`, which drives the same engines: around them
it allocates a tensor and checks each image, and the pipeline then gathers the images into one
buffer for the resize kernels. On one H200 (2026-11-29, GPU idle, 128 pinned JPEGs a call,
benchmarks/nvjpeg_formats.py) its call did 18149 img/s where the engines called directly did 27016.
Here one call decodes a group's JPEGs as interleaved RGB straight into the places the caller names
(its batch buffer: the Packed batch the resize kernels read as it is).

Only what the engines take goes through here: the caller asks `supported()` per image (by chroma
subsampling, checked once per kind with nvJPEG's own test) and decodes the rest another way."""
import ctypes
import functools
import os

import numpy as np

BACKEND_HARDWARE = 3            # NVJPEG_BACKEND_HARDWARE
OUTPUT_RGBI = 5                 # NVJPEG_OUTPUT_RGBI: interleaved RGB, one plane, pitch 3 * width
MAX_COMPONENTS = 4              # NVJPEG_MAX_COMPONENT


class Unavailable(RuntimeError):
    """No nvJPEG library, or no hardware JPEG engine on this GPU."""


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The libnvjpeg torchvision's image extension links (loading torchvision.io.image maps it)."""
    try:
        import torchvision.io.image  # noqa: F401
    except Exception as e:
        raise Unavailable(f'torchvision.io.image does not load: {e}') from None
    with open('/proc/self/maps') as f:
        for line in f:
            path = line.split()[-1]
            if 'libnvjpeg' in os.path.basename(path):
                return ctypes.CDLL(path)
    try:
        return ctypes.CDLL('libnvjpeg.so')
    except OSError as e:
        raise Unavailable(f'no libnvjpeg: {e}') from None


class HardwareDecoder:
    """One nvJPEG handle on the hardware backend, its decode state and a stream parser (for the support
    test). Not thread-safe: one decoder a decoding thread. The pipeline keeps one for each transform's life
    (close() is not called at exit: CUDA may be torn down by then)."""

    def __init__(self):
        lib = self.lib = library()
        self.handle, self.state, self.parsed = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        status = lib.nvjpegCreateEx(BACKEND_HARDWARE, None, None, 0, ctypes.byref(self.handle))
        if status != 0:
            raise Unavailable(f'nvJPEG has no hardware backend here (nvjpegCreateEx status {status})')
        self._check(lib.nvjpegJpegStateCreate(self.handle, ctypes.byref(self.state)), 'nvjpegJpegStateCreate')
        self._check(lib.nvjpegJpegStreamCreate(self.handle, ctypes.byref(self.parsed)), 'nvjpegJpegStreamCreate')
        self._kinds = {}                                    # subsampling -> whether the engines take it
        self._comp, self._css = ctypes.c_int(), ctypes.c_int()
        self._w, self._h = (ctypes.c_int * MAX_COMPONENTS)(), (ctypes.c_int * MAX_COMPONENTS)()

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f'{what}: nvjpegStatus {status}')

    def info(self, ptr: int, length: int) -> tuple:
        """(height, width, subsampling) of the JPEG at host address ptr."""
        self._check(self.lib.nvjpegGetImageInfo(self.handle, ctypes.c_void_p(ptr), ctypes.c_size_t(length),
                                                ctypes.byref(self._comp), ctypes.byref(self._css), self._w,
                                                self._h), 'nvjpegGetImageInfo')
        return self._h[0], self._w[0], self._css.value

    def supported(self, ptr: int, length: int, subsampling: int) -> bool:
        """Whether the engines decode JPEGs of this chroma subsampling: nvJPEG's own test
        (nvjpegDecodeBatchedSupported) on the first such file, remembered."""
        known = self._kinds.get(subsampling)
        if known is None:
            if self.lib.nvjpegJpegStreamParse(self.handle, ctypes.c_void_p(ptr), ctypes.c_size_t(length), 0, 0,
                                              self.parsed) != 0:
                return False            # this file, not its kind: the next one of the kind is asked again
            answer = ctypes.c_int(1)
            ok = self.lib.nvjpegDecodeBatchedSupported(self.handle, self.parsed, ctypes.byref(answer)) == 0
            known = self._kinds[subsampling] = ok and answer.value == 0
        return known

    def decode(self, sources: list, lengths: list, outputs: list, widths: list, stream: int) -> None:
        """Decodes JPEGs (host addresses `sources`, byte `lengths`) as interleaved RGB into device addresses
        `outputs` (rows of 3 * width bytes), work ordered on CUDA `stream`. Raises RuntimeError where
        nvJPEG refuses the call; the caller then decodes the group another way."""
        n = len(sources)
        images = np.zeros((n, 2 * MAX_COMPONENTS), dtype=np.uint64)       # nvjpegImage_t: 4 pointers, 4 pitches
        images[:, 0] = outputs
        images[:, MAX_COMPONENTS] = 3 * np.asarray(widths, dtype=np.uint64)
        data = np.asarray(sources, dtype=np.uint64)
        sizes = np.asarray(lengths, dtype=np.uint64)
        self._check(self.lib.nvjpegDecodeBatchedInitialize(self.handle, self.state, n, 1, OUTPUT_RGBI),
                    'nvjpegDecodeBatchedInitialize')
        self._check(self.lib.nvjpegDecodeBatched(self.handle, self.state, ctypes.c_void_p(data.ctypes.data),
                                                 ctypes.c_void_p(sizes.ctypes.data),
                                                 ctypes.c_void_p(images.ctypes.data), ctypes.c_void_p(stream)),
                    'nvjpegDecodeBatched')

    def close(self) -> None:
        for fn, obj in ((self.lib.nvjpegJpegStreamDestroy, self.parsed), (self.lib.nvjpegJpegStateDestroy, self.state),
                        (self.lib.nvjpegDestroy, self.handle)):
            if obj:
                fn(obj)
        self.parsed = self.state = self.handle = None


def hardware_decoder() -> tuple:
    """(a HardwareDecoder, None), or (None, why there is none)."""
    try:
        return HardwareDecoder(), None
    except (Unavailable, RuntimeError, OSError, AttributeError) as e:
        return None, str(e)


def aligned(n: int, to: int = 256) -> int:
    return -(-n // to) * to
