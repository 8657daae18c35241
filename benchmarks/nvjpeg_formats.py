"""nvJPEG's hardware batched decode alone (ctypes, no build step), with the GPU idle and kept busy
by GEMMs (a training step's stand-in): which output formats need an SM kernel an image, how fast each
is, and how several decoders (each its own handle, state and stream) do when they decode at once.

Why: next to a training step one batched call slows ~4x. Measured on an H200 (2026-11-29,
results/nvjpeg_formats_h200_2026-11-29.json, nvjpeg_threads_h200_2026-11-29.json): every format
slows the same (planar RGB, which ends each image in an `rgba2rgb` kernel, and YUV / Y / unchanged,
which need none: 3,700-3,900 img/s loaded), so the conversion kernel is not the cause; nvJPEG
synchronises once an image in every format. Concurrent 128-image calls on 2 / 4 decoders did 5,790 /
8,518 img/s under the load against 3,897 for one. In the pipeline, though (a batch split over 4
decoders, or 4 batches a call over 4), main.py on JPEGs did not get faster (4,450 / 4,628 img/s
against 4,465 / 4,672 with torchvision's decode, results/input_decode_threads_h200_2026-11-29*.md),
so the pipeline uses one decoder. Since 2026-12-07 the pipeline calls the engines itself
(data/nvjpeg.py: interleaved RGB straight into the batch's buffer, one call a group of batches);
this script keeps its own decoder for the formats it compares. The `inputs` rows time torchvision's call beside
the direct one on JPEGs held as separate pageable tensors, views of a pageable buffer and views of a
pinned buffer (the pipeline's case), with the GPU idle. GPU only.

    python benchmarks/nvjpeg_formats.py [--images 256] [--no-formats]
"""
import argparse
import contextlib
import ctypes
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_input import _GpuLoad, _encode  # noqa: E402
from data.nvjpeg import library  # noqa: E402

FORMATS = {'unchanged': 0, 'yuv': 1, 'y': 2, 'rgb': 3, 'rgbi': 5}
BACKEND_HARDWARE = 3


class Decoder:
    def __init__(self, lib):
        self.lib = lib
        self.handle, self.state = ctypes.c_void_p(), ctypes.c_void_p()
        self.check(lib.nvjpegCreateEx(BACKEND_HARDWARE, None, None, 0, ctypes.byref(self.handle)), 'create')
        self.check(lib.nvjpegJpegStateCreate(self.handle, ctypes.byref(self.state)), 'state')
        self.stream = torch.cuda.Stream()

    @staticmethod
    def check(status, what):
        if status != 0:
            raise RuntimeError(f'{what}: nvjpegStatus {status}')

    def decode(self, payloads, hw, fmt: int) -> torch.Tensor:
        """Every image into three full-size planes (enough for any subsampling and format; interleaved
        formats use plane 0 with a 3w pitch)."""
        n = len(payloads)
        row = hw[:, 1] * (3 if fmt == FORMATS['rgbi'] else 1)       # bytes a row of a plane
        plane = hw[:, 0] * row
        start = np.concatenate([[0], np.cumsum(3 * plane)[:-1]])
        buffer = torch.empty(int(3 * plane.sum()), dtype=torch.uint8, device='cuda')
        images = np.zeros((n, 8), dtype=np.uint64)
        for c in range(3):
            images[:, c] = buffer.data_ptr() + start + c * plane
            images[:, 4 + c] = row
        data = np.array([p.data_ptr() for p in payloads], dtype=np.uint64)
        lengths = np.array([p.numel() for p in payloads], dtype=np.uint64)
        self.stream.wait_stream(torch.cuda.current_stream())
        self.check(self.lib.nvjpegDecodeBatchedInitialize(self.handle, self.state, n, 1, fmt), 'initialize')
        self.check(self.lib.nvjpegDecodeBatched(self.handle, self.state, ctypes.c_void_p(data.ctypes.data),
                                                ctypes.c_void_p(lengths.ctypes.data),
                                                ctypes.c_void_p(images.ctypes.data),
                                                ctypes.c_void_p(self.stream.cuda_stream)), 'decode')
        self.stream.synchronize()
        return buffer


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--images', type=int, default=256)
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--no-formats', dest='formats', action='store_false', help='skip the per-format rows')
    args = p.parse_args()
    from multiprocessing import Pool
    with Pool(16) as pool:
        blobs = pool.map(_encode, range(args.images))
    payloads = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    import io
    import PIL.Image
    hw = np.array([PIL.Image.open(io.BytesIO(b)).size[::-1] for b in blobs], dtype=np.int64)
    dec = Decoder(library())
    batches = [(payloads[i:i + args.batch], hw[i:i + args.batch]) for i in range(0, args.images, args.batch)]
    rows = []
    from torch.profiler import ProfilerActivity, profile
    for name, fmt in (FORMATS.items() if args.formats else ()):
        try:
            out = dec.decode(*batches[0], fmt)
        except RuntimeError as e:
            rows.append({'format': name, 'error': str(e)})
            print(rows[-1], flush=True)
            continue
        row = {'format': name, 'checksum': int(out[:1000].sum())}
        for load in (False, True):
            with _GpuLoad() if load else contextlib.nullcontext():
                reps = 6
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    t0 = time.time()
                    for _ in range(reps):
                        for b in batches:
                            dec.decode(*b, fmt)
                    wall = time.time() - t0
            ev = prof.key_averages()
            key = 'loaded' if load else 'idle'
            row[key + ' img/s'] = round(reps * args.images / wall)
            row[key + ' kernels'] = sorted({e.key[:50] for e in ev if e.self_device_time_total > 0
                                            and 'nvjet' not in e.key and 'gemm' not in e.key.lower()})
            row[key + ' syncs per batch'] = {e.key: round(e.count / (reps * len(batches)), 1) for e in ev
                                             if e.key in ('cudaEventSynchronize', 'cudaStreamSynchronize')}
        rows.append(row)
        print(json.dumps(row), flush=True)
    # the same 128-image calls, GPU idle, no profiler: torchvision's decode_jpeg (what the pipeline calls)
    # beside the direct call, on JPEGs held the three ways they can arrive: separate pageable tensors,
    # views of one pageable buffer, views of one pinned buffer (the pipeline's: the DataLoader pins the
    # batch's bytes). Why the pipeline's decode stage runs at ~10k img/s where the direct call did ~25k.
    from torchvision.io import ImageReadMode, decode_jpeg
    flat = torch.cat(payloads)
    sizes = [p.numel() for p in payloads]
    held = {'separate pageable': payloads, 'views of a pageable buffer': list(torch.split(flat, sizes)),
            'views of a pinned buffer': list(torch.split(flat.pin_memory(), sizes))}
    for how, inputs in held.items():
        for caller in ('torchvision', 'direct'):
            def call(k):
                chunk = inputs[k:k + args.batch]
                if caller == 'torchvision':
                    decode_jpeg(chunk, mode=ImageReadMode.RGB, device='cuda')
                else:
                    dec.decode(chunk, hw[k:k + args.batch], FORMATS['rgb'])
            call(0)
            torch.cuda.synchronize()
            t0 = time.time()
            for _ in range(6):
                for k in range(0, args.images, args.batch):
                    call(k)
            torch.cuda.synchronize()
            rows.append({'part': 'inputs', 'jpegs': how, 'caller': caller,
                         'idle img/s': round(6 * args.images / (time.time() - t0))})
            print(json.dumps(rows[-1]), flush=True)
    # several decoders (each its own nvJPEG handle, state and stream) on as many threads at once:
    # whether the hardware engines serve concurrent batch calls faster than one under load
    import threading
    for threads in (1, 2, 4):
        decoders = [Decoder(dec.lib) for _ in range(threads)]
        for d in decoders:
            d.decode(*batches[0], FORMATS['rgb'])
        row = {'part': 'threads', 'format': 'rgb', 'threads': threads}
        for load in (False, True):
            reps = 6
            with _GpuLoad() if load else contextlib.nullcontext():
                workers = [threading.Thread(target=lambda d=d: [d.decode(*b, FORMATS['rgb'])
                                                                for _ in range(reps) for b in batches])
                           for d in decoders]
                t0 = time.time()
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
                wall = time.time() - t0
            row[('loaded' if load else 'idle') + ' img/s'] = round(threads * reps * args.images / wall)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = os.environ.get('OUT', 'benchmarks/results')
    os.makedirs(out, exist_ok=True)
    json.dump(rows, open(os.path.join(out, 'nvjpeg_formats.json'), 'w'), indent=1)


if __name__ == '__main__':
    main()
