"""Input pipelines on an ImageNet-like JPEG folder: the pipelines alone, and main.py end to end.

    python benchmarks/bench_input.py --root /tmp/jpeg [--images 26000] [--parts folder pipelines gputime main]

folder:    writes <root>/{train,val}/<class>/*.JPEG, 100 classes, ~100 KB baseline JPEGs at 500x375
           (data/jpeg_folder.py). To keep generation short, `--unique` distinct pictures are drawn
           and written under every file name in turn (the decode cost is per file all the same).
pipelines: each pipeline alone, as main.py builds it (data.build_loader), images moved to the
           GPU: img/s from after the batches its loader holds ready (workers x prefetch, the device
           stages' queues) to batch --batches (steady state only). Upstream's
           PIL pipeline with its 8 workers and with one worker per core, ours with `--workers`, with
           each decode of `--decode` (nvJPEG on the device, PIL in the workers).
gputime:   GPU kernel time of our train transform per batch of 128 (torch.profiler, the sum of
           every kernel's time, nvJPEG's included), beside the Swin-T step it must hide under.
main:      main.py training Swin-T with the best flags (all flags, --fused_adam, O2 bf16, compile
           with CUDA graphs; or --cuda-graph in place of --compile: PIPELINE:DATA:graph) for one epoch on
           the folder (--data-pipeline gpu and pil) and on in-memory synthetic inputs; img/s as main.py
           logs it (after the batches the loader readied during the first steps). The timed steps begin
           with the loader's queue full: a pipeline slower than the step shows only once it has drained,
           so use epochs of 1000+ steps (--images 156000) for the steady state.
profile:   the main part's runs under benchmarks/profile_main.py (wall vs GPU-busy time per step, the GPU's
           idle gaps and what the host ran in them; the run stops after the profiled batches).
gil:       the main part's runs under benchmarks/gil_profile.py (py-spy on PATH): which threads hold the GIL
           in training, and in which functions.
contention: the train transform's decode and finish stages alone, with the GPU idle and kept busy.
decode-profile: the decode stage alone under torch.profiler, GPU idle and kept busy: per batch, the host
           calls it spends its time in (count, ms) and the GPU kernels it runs: what the wait is.
worker:    one worker's cost of a training item (read, sample the recipe, decode, cut the crop; no GPU
           needed), the gpu pipeline's decode in the workers with torchvision's libjpeg-turbo and with
           PIL's convert('RGB'), alternating, one process; then the train DataLoader of raw items
           alone (1 and --workers workers), each batch fetched whole (RawImages.__getitems__) and item
           by item, alternating.
harness:   bench_train.py's row for the same configuration (synthetic inputs on the GPU, no data
           loading at all).
"""
import argparse
import contextlib
import glob
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from multiprocessing import Pool

import numpy as np
import torch

from common import RECOMMENDED, ROOT, environment, write_results

BEST = RECOMMENDED + ['--compile']
TINY = os.path.join(ROOT, 'configs/swin/swin_tiny_patch4_window7_224.yaml')


def _encode(seed: int) -> bytes:
    import io
    from data.jpeg_folder import photo
    buf = io.BytesIO()
    photo(np.random.default_rng(seed), 500, 375).save(buf, 'JPEG', quality=90)
    return buf.getvalue()


def make_folder(root: str, images: int, val_images: int, unique: int, classes: int = 100) -> dict:
    marker = os.path.join(root, f'.done_{images}_{val_images}_{unique}')
    if os.path.exists(marker):
        return json.load(open(marker))
    t0 = time.time()
    for old in glob.glob(os.path.join(root, '.done_*')):     # another size: start over, or files of it would stay
        os.remove(old)
        for split in ('train', 'val'):
            shutil.rmtree(os.path.join(root, split), ignore_errors=True)
    with Pool(min(os.cpu_count(), 16)) as pool:
        blobs = pool.map(_encode, range(unique))
    k = 0
    for split, count in (('train', images), ('val', val_images)):
        for i in range(count):
            cls = f'n{i % classes:08d}'
            folder = os.path.join(root, split, cls)
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f'{cls}_{i:07d}.JPEG'), 'wb') as f:
                f.write(blobs[k % unique])
            k += 1
    info = {'train': images, 'val': val_images, 'unique': unique, 'mean_KB': float(np.mean([len(b) for b in blobs])) / 1e3,
            'seconds': time.time() - t0}
    json.dump(info, open(marker, 'w'))
    return info


def decode_opts(decode: str) -> list:
    """main.py's --opts for a decode: 'workers', 'device', or 'device@SHARE' (EXTRA.DEVICE_DECODE_SHARE:
    that share of the JPEGs to nvJPEG, the rest decoded in the workers)."""
    where, _, share = decode.partition('@')
    return ['EXTRA.JPEG_DECODE', where] + (['EXTRA.DEVICE_DECODE_SHARE', share] if share else [])


def _config(root: str, pipeline: str, workers: int, batch: int = 128, evaluate: bool = False, pin: bool = True,
            decode_batches: int = 1, decode: str = 'device'):
    """main.py's config for the folder; decode: EXTRA.JPEG_DECODE (the stage measurements take nvJPEG's)."""
    from config import get_config
    return get_config(argparse.Namespace(cfg=TINY, data_path=root, data_pipeline=pipeline, eval=evaluate,
                                         opts=['DATA.NUM_WORKERS', str(workers), 'DATA.BATCH_SIZE', str(batch),
                                               'DATA.PIN_MEMORY', str(pin), 'EXTRA.DECODE_BATCHES',
                                               str(decode_batches), 'EXTRA.VAL_DECODE_BATCHES',
                                               str(decode_batches)] + decode_opts(decode)))


def pipeline_rate(root: str, pipeline: str, split: str, workers: int, batches: int, pin: bool = True,
                  decode_batches: int = 1, decode: str = 'device', segments: str = 'default',
                  engines: str = 'on') -> dict:
    """segments: 'lock' (the workers' pooled segments page-locked where they lie), 'copy' (each batch
    copied into pinned memory) or 'default' (locked where nvJPEG decodes): data/gpu_pipeline.py's
    LOCK_SEGMENTS. engines: 'on' (nvJPEG's engines called directly, data/nvjpeg.py) or 'off'
    (torchvision's decode_jpeg): its HARDWARE_DECODE."""
    import data.gpu_pipeline as g
    from data import build_loader
    from data.build import queued_batches
    g.LOCK_SEGMENTS = {'lock': True, 'copy': False, 'default': 'nvjpeg'}[segments]
    g.HARDWARE_DECODE = engines == 'on'
    cfg = _config(root, pipeline, workers, evaluate=(split == 'val'), pin=pin, decode_batches=decode_batches,
                  decode=decode)
    _, _, train, val, _ = build_loader(cfg)
    loader = train if split == 'train' else val
    if split == 'train':
        loader.sampler.set_epoch(0)
    # timed from after as many batches as the loader can hold ready (main.py's rule, queued_batches) to the
    # end of `batches` or of the split, whichever comes first
    start = max(10, queued_batches(loader))
    batches = min(batches, len(loader) - 1)
    row = {'part': 'pipeline', 'pipeline': pipeline, 'split': split, 'workers': workers, 'pin_memory': pin,
           'decode_batches': decode_batches, 'decode': decode if pipeline == 'gpu' else 'workers',
           'segments': segments if pipeline == 'gpu' and pin else '',
           'engines': engines if pipeline == 'gpu' and decode.startswith('device') else ''}
    if batches <= start + 10:
        print(f'{split}: {len(loader)} batches, too few to time after the first {start}: not timed (more images: '
              f'--images / --val-images)', flush=True)
        return {**row, 'img/s': None}
    n, t0 = 0, None
    for i, (x, y) in enumerate(loader):
        x = x.cuda(non_blocking=True)
        y = y.cuda(non_blocking=True)
        if i == start:
            torch.cuda.synchronize()
            t0 = time.time()
        elif i > start:
            n += x.shape[0]
        if i >= batches:
            break
    torch.cuda.synchronize()
    locked = getattr(loader, 'locked', None)          # a DeviceLoader's (gpu pipeline)
    return {**row, 'img/s': n / (time.time() - t0), 'batches_timed': i - start,
            'registered': locked.registered if locked is not None and locked.refused is None else None}


class _GpuLoad:
    """A thread keeping the GPU's SMs busy with bf16 GEMMs on its own stream (a training step's
    stand-in) while a pipeline stage is timed."""

    def __enter__(self):
        import threading
        self.stop = threading.Event()
        a = torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16)

        def run():
            with torch.cuda.stream(torch.cuda.Stream()):
                while not self.stop.is_set():
                    for _ in range(4):
                        a @ a
                    torch.cuda.current_stream().synchronize()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


@contextlib.contextmanager
def _stage_stream(load: bool, priority: int = 0):
    """A pipeline stage's own stream (at `priority`), with the GPU idle or kept busy (_GpuLoad)."""
    with (_GpuLoad() if load else contextlib.nullcontext()), torch.cuda.stream(torch.cuda.Stream(priority=priority)):
        yield


def _raw_batches(root: str, workers: int, n: int):
    """The train transform and n raw batches of the folder read through its DataLoader."""
    from data import build_loader
    from data.gpu_pipeline import host_copy
    _, _, train, _, _ = build_loader(_config(root, 'gpu', workers))
    train.sampler.set_epoch(0)
    raws = []
    for raw in train.loader:       # pinned, as DeviceLoader pins them (the pages kept: each is decoded again)
        raws.append((host_copy(raw[0]),) + tuple(raw[1:]))
        if len(raws) == n:
            break
    return train.transform, raws


def contention(root: str, batches: int = 30) -> list:
    """The train transform's two stages alone, on raw batches read beforehand (so the workers are out
    of it), with the GPU idle and with it kept busy by GEMMs: which stage a training step slows."""
    t, raws = _raw_batches(root, 12, batches)
    for raw in raws[:2]:                     # compile the finish stage's kernels outside the timing
        t.finish(t.decode(*raw))
    rows = []
    # finish_streams 2: the batches' finish stages alternate between two streams (as DeviceLoader's
    # finish_streams does), so two batches' chains of small kernels wait for SMs side by side
    for load, priority, finish_streams in ((False, 0, 1), (True, 0, 1), (True, -1, 1), (True, -1, 2)):
        with _stage_stream(load, priority):
            decoded = [t.decode(*raw) for raw in raws[:2]]
            torch.cuda.synchronize()
            t0 = time.time()
            decoded = [t.decode(*raw) for raw in raws]
            torch.cuda.synchronize()
            t1 = time.time()
            streams = [torch.cuda.current_stream()] + [torch.cuda.Stream(priority=priority)
                                                       for _ in range(finish_streams - 1)]
            for k, d in enumerate(decoded):
                with torch.cuda.stream(streams[k % finish_streams]):
                    t.finish(d)
            torch.cuda.synchronize()
            t2 = time.time()
        n = batches * len(raws[0][1])
        rows.append({'part': 'contention', 'gpu_load': load, 'stream_priority': priority,
                     'finish_streams': finish_streams, 'decode img/s': n / (t1 - t0), 'finish img/s': n / (t2 - t1)})
        print(rows[-1], flush=True)
    return rows


def decode_profile(root: str, batches: int = 12) -> list:
    """The decode stage alone (raw batches read beforehand) under torch.profiler, with the GPU idle and
    with it kept busy by GEMMs: per batch, where the decoding thread's time goes (the CUDA runtime
    calls it makes: how many, how long) and the kernels it runs."""
    from torch.profiler import ProfilerActivity, profile
    t, raws = _raw_batches(root, 12, batches + 2)
    for raw in raws[:2]:
        t.decode(*raw)
    torch.cuda.synchronize()
    rows = []
    for load in (False, True):
        with _stage_stream(load):
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.time()
                for raw in raws[2:]:
                    t.decode(*raw)
                torch.cuda.current_stream().synchronize()
                wall = time.time() - t0
        events = prof.key_averages()
        host = sorted((e for e in events if e.key.startswith('cu')), key=lambda e: -e.cpu_time_total)[:8]
        kernels = sorted((e for e in events if e.self_device_time_total > 0),
                         key=lambda e: -e.self_device_time_total)[:6]
        rows.append({'part': 'decode-profile', 'gpu_load': load, 'ms_per_batch': 1e3 * wall / batches,
                     'decode img/s': batches * len(raws[0][1]) / wall,
                     'host calls per batch (count, ms)': [(e.key, round(e.count / batches, 1),
                                                           round(e.cpu_time_total / 1e3 / batches, 3)) for e in host],
                     'kernels per batch (ms)': [(e.key[:60], round(e.self_device_time_total / 1e3 / batches, 3))
                                                for e in kernels]})
        print(json.dumps(rows[-1], indent=1), flush=True)
    return rows


def gpu_time(root: str, batches: int = 10) -> dict:
    """GPU kernel time of the train transform per batch (run inline, profiled)."""
    from torch.profiler import ProfilerActivity, profile
    transform, raws = _raw_batches(root, 8, batches + 2)
    for raw in raws[:2]:
        transform(*raw)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for raw in raws[2:]:
            transform(*raw)
        torch.cuda.synchronize()
    total_us = sum(e.self_device_time_total for e in prof.key_averages())
    top = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:6]
    return {'part': 'gputime', 'ms_per_batch': total_us / 1e3 / batches,
            'top': [(e.key[:60], round(e.self_device_time_total / 1e3 / batches, 3)) for e in top]}


def worker_cost(root: str, images: int = 256, rounds: int = 4) -> list:
    """ms per training item in one process with one torch thread (as a DataLoader worker has),
    torchvision's host decode and PIL's, alternating."""
    import data.gpu_pipeline as gp
    from data import build_loader
    _, _, train, _, _ = build_loader(_config(root, 'gpu', 0, decode='workers'))
    raw = train.dataset
    n = min(images, len(raw))
    fast, rows, threads = gp._decode_as_pil, [], torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for r in range(rounds):
            for name, decode in (('torchvision (libjpeg-turbo)', fast), ("PIL convert('RGB')", lambda data: None)):
                gp._decode_as_pil = decode
                t0 = time.perf_counter()
                for i in range(n):
                    raw[i]
                rows.append({'part': 'worker', 'decode': name, 'round': r,
                             'ms_per_item': (time.perf_counter() - t0) / n * 1e3})
                print(rows[-1], flush=True)
    finally:
        gp._decode_as_pil = fast
        torch.set_num_threads(threads)
    return rows


def worker_batches(root: str, workers: int, rounds: int = 2) -> list:
    """img/s of the train DataLoader of raw items alone (RawImages + collate_raw, the workers' decode, no
    device stages), each batch copied out as the training loop does (host_copy with release). Three
    ways, alternating: item by item into a fresh shared-memory segment a batch, a batch fetched whole
    (RawImages.__getitems__: every item's Python work first, then the decodes) into a fresh segment, and
    fetched whole into the worker's reused segments (_SegmentPool, the default); timed once the batches
    ready when the loop starts (each worker's first and its prefetched two) are taken, over 6 a worker
    (at least 24): the folder needs 9 a worker (3072 images at least) of 128 images."""
    import data.gpu_pipeline as gp
    from data import build_loader
    _, _, train, _, _ = build_loader(_config(root, 'gpu', workers, decode='workers'))
    raw = train.dataset
    whole, pool, rows = gp.RawImages.__getitems__, gp._SegmentPool.size, []
    ways = (('item by item', None, 0), ('whole batch', whole, 0), ('whole batch, reused segments', whole, None))
    try:
        for r in range(rounds):
            for name, fetch, pool_size in ways:
                gp.RawImages.__getitems__ = fetch       # None: the DataLoader calls __getitem__ per index
                gp._SegmentPool.size = pool_size        # the workers fork with it (at iter)
                loader = torch.utils.data.DataLoader(raw, batch_size=128, num_workers=workers,
                                                     collate_fn=gp.collate_raw, sampler=train.sampler)
                it, n, batches = iter(loader), 0, max(24, 6 * workers)
                for _ in range(3 * max(1, workers)):
                    gp.host_copy(next(it)[0], pin=torch.cuda.is_available(), release=True)
                t0 = time.perf_counter()
                for k, batch in enumerate(it):
                    gp.host_copy(batch[0], pin=torch.cuda.is_available(), release=True)
                    n += len(batch[1])
                    if k + 1 == batches:
                        break
                rows.append({'part': 'worker', 'decode': f'{name}, {workers} workers', 'round': r,
                             'img/s': n / (time.perf_counter() - t0)})
                print(rows[-1], flush=True)
    finally:
        gp.RawImages.__getitems__, gp._SegmentPool.size = whole, pool
    return rows


def main_args(root: str, pipeline: str, synthetic: bool, workers: int, epochs_images: int, step: str,
              decode_batches: int = 1, decode: str = 'workers') -> list:
    """main.py's arguments for one run. step: 'compile' (torch.compile with CUDA graphs) or 'graph'
    (--cuda-graph: the eager step captured); decode_batches: EXTRA.DECODE_BATCHES; decode:
    EXTRA.JPEG_DECODE."""
    opts = ['TRAIN.EPOCHS', '1', 'DATA.NUM_WORKERS', str(workers), 'PRINT_FREQ', '50', 'EXTRA.COMPILE_MODE',
            'reduce-overhead', 'SAVE_FREQ', '10', 'TRAIN.AUTO_RESUME', 'False', 'EXTRA.DECODE_BATCHES',
            str(decode_batches)] + decode_opts(decode)
    flags = BEST if step == 'compile' else [f for f in BEST if f != '--compile'] + ['--cuda-graph']
    if synthetic:
        opts += ['DATA.DATASET', 'synthetic', 'EXTRA.SYNTHETIC_TRAIN_SIZE', str(epochs_images),
                 'EXTRA.SYNTHETIC_VAL_SIZE', '1024', 'MODEL.NUM_CLASSES', '100']
    return ['--cfg', TINY, '--data-path', root, '--data-pipeline', pipeline, '--output', '/tmp/bench_input_out',
            '--tag', f'{pipeline}_{int(synthetic)}_{step}'] + flags + ['--opts'] + opts


def main_py(root: str, pipeline: str, synthetic: bool, workers: int, epochs_images: int, step: str,
            decode_batches: int = 1, prelude: str = '', decode: str = 'workers') -> dict:
    """One main.py run; prelude: Python statements run in its process before main.py (e.g. 'import sys;
    sys.setswitchinterval(0.0005)', or a DeviceLoader class default such as finish_streams)."""
    args = main_args(root, pipeline, synthetic, workers, epochs_images, step, decode_batches, decode)
    cmd = [sys.executable, 'main.py'] + args
    if prelude:
        cmd = [sys.executable, '-c', f'{prelude}\nimport runpy, sys\nsys.argv = ["main.py"] + sys.argv[1:]\n'
               'runpy.run_path("main.py", run_name="__main__")'] + args
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED='1'))
    out = p.stdout + p.stderr
    m = re.search(r'\(([\d.]+) images/s from step (\d+)', out)
    wait = re.search(r'waiting for input (\d+)%', out)
    busy = re.search(r'its workers busy (\d+)%', out)
    if p.returncode != 0 or not m:
        print(out[-3000:])
    return {'part': 'main', 'pipeline': pipeline, 'data': 'synthetic' if synthetic else 'jpeg', 'step': step,
            'workers': workers, 'decode_batches': decode_batches, 'decode': decode,
            'prelude': prelude, 'img/s': float(m.group(1)) if m else None,
            'input_wait_%': int(wait.group(1)) if wait else None,
            'workers_busy_%': int(busy.group(1)) if busy else None, 'wall_s': time.time() - t0, 'rc': p.returncode,
            'command': ' '.join(['main.py'] + args)}


def profile_main(root: str, pipeline: str, synthetic: bool, workers: int, epochs_images: int, step: str,
                 options: list) -> dict:
    """The same main.py run under benchmarks/profile_main.py (with `options`): where its step waits."""
    cmd = [sys.executable, 'benchmarks/profile_main.py'] + options + ['--'] + main_args(root, pipeline, synthetic, workers,
                                                                          epochs_images, step)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED='1'))
    line = [ln for ln in p.stdout.splitlines() if ln.startswith('PROFILE ')]
    report = json.loads(line[-1][len('PROFILE '):]) if line else {'error': (p.stdout + p.stderr)[-3000:]}
    return {'part': 'profile', 'pipeline': pipeline, 'data': 'synthetic' if synthetic else 'jpeg', 'step': step,
            'workers': workers, 'rc': p.returncode, **report}


def gil_main(root: str, pipeline: str, synthetic: bool, workers: int, epochs_images: int, step: str,
             decode: str) -> dict:
    """The same main.py run under benchmarks/gil_profile.py (py-spy): which threads hold the GIL."""
    cmd = [sys.executable, 'benchmarks/gil_profile.py', '--images', str(epochs_images), '--'] + main_args(
        root, pipeline, synthetic, workers, epochs_images, step, 1, decode)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith('GIL ')]
    report = json.loads(line[-1][len('GIL '):]) if line else {'error': (p.stdout + p.stderr)[-3000:]}
    return {'part': 'gil', 'pipeline': pipeline, 'data': 'synthetic' if synthetic else 'jpeg', 'step': step,
            'workers': workers, 'decode': decode, **report}


def parse_run(run: str) -> tuple:
    """--main-runs' PIPELINE:DATA[:STEP[:N[:DECODE]]] -> (pipeline, data, step, N as int, decode)."""
    fields = run.split(':')
    pipeline, data, step, n, decode = (fields + ['compile', '1', 'workers'][len(fields) - 2:])[:5]
    return pipeline, data, step, int(n), decode


HARNESS_ROWS = {'compile': 'all flags + --fused_adam + compile (CUDA graphs), O2 bf16',
                'graph': 'all flags + --fused_adam + --cuda-graph (whole step, no compile), O2 bf16'}


def harness(step: str) -> dict:
    cmd = [sys.executable, 'benchmarks/bench_train.py', '--model', 'tiny', '--only', HARNESS_ROWS[step], '--exact',
           '--skip-infer']
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    m = re.search(r"'img/s': ([\d.]+)", p.stdout)
    rate = float(m.group(1)) if m else None
    return {'part': 'harness', 'pipeline': '-', 'data': 'synthetic on GPU', 'step': step, 'workers': 0, 'img/s': rate,
            'output_tail': (p.stdout + p.stderr)[-1500:], 'rc': p.returncode}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--root', default='/tmp/bench_jpeg')
    p.add_argument('--images', type=int, default=26000)
    p.add_argument('--val-images', type=int, default=19200)
    p.add_argument('--unique', type=int, default=1024)
    p.add_argument('--workers', type=int, default=12)
    p.add_argument('--batches', type=int, default=250,
                   help="the pipelines part's last batch; each split is timed from after the batches its loader "
                        "holds ready (workers x prefetch + the device stages') to this one or the split's end")
    p.add_argument('--parts', nargs='+', default=['folder', 'pipelines', 'gputime'])
    p.add_argument('--pipelines', nargs='+', default=['gpu', 'pil'], help='which pipelines the pipelines part measures')
    p.add_argument('--main-runs', nargs='+',
                   default=['gpu:synthetic', 'gpu:jpeg', 'gpu:jpeg:compile:1:device', 'pil:jpeg'],
                   help='main.py runs of the main part, PIPELINE:DATA[:STEP[:N[:DECODE]]], STEP compile (default) or '
                        'graph, N EXTRA.DECODE_BATCHES (default 1), DECODE workers (the default), device or '
                        'device@SHARE (see decode_opts)')
    p.add_argument('--repeat', type=int, default=1, help="the main part's runs, each this many times, in turn")
    p.add_argument('--decode', nargs='+', default=['device', 'workers'],
                   help="the pipelines part's decodes for the gpu pipeline: device, workers, device@SHARE (see "
                        "decode_opts)")
    p.add_argument('--splits', nargs='+', default=['train', 'val'], choices=['train', 'val'],
                   help="the pipelines part's splits")
    p.add_argument('--segments', nargs='+', default=['default'], choices=['default', 'lock', 'copy'],
                   help="the pipelines part's gpu rows (pinned) with the workers' segments page-locked where they "
                        "lie, copied into pinned memory a batch at a time, or as main.py does (locked where "
                        "nvJPEG decodes)")
    p.add_argument('--engines', nargs='+', default=['on'], choices=['on', 'off'],
                   help="the pipelines part's nvJPEG rows with its engines called directly (data/nvjpeg.py, "
                        "main.py's way) or through torchvision's decode_jpeg")
    p.add_argument('--decode-batches', nargs='+', type=int, default=[1],
                   help="the pipelines part's EXTRA.DECODE_BATCHES values (gpu pipeline, pinned rows)")
    p.add_argument('--main-prelude', default='',
                   help="Python statements the main part's runs execute before main.py, e.g. 'import sys; "
                        "sys.setswitchinterval(0.0005)' or 'import data.gpu_pipeline as g; "
                        "g.DeviceLoader.finish_streams = 2'")
    p.add_argument('--profile-options', default='', help="the profile part's options of profile_main.py, "
                   "e.g. '--python --steps 6'")
    p.add_argument('--harness-steps', nargs='+', default=['compile'], choices=sorted(HARNESS_ROWS),
                   help='the bench_train.py rows of the harness part')
    a = p.parse_args()
    rows = []
    info = make_folder(a.root, a.images, a.val_images, a.unique)
    print('folder', info, flush=True)
    cores = os.cpu_count()
    if 'pipelines' in a.parts:
        runs = []
        for decode in a.decode:     # nvJPEG alone also with each --decode-batches and without pinned memory
            batches_a_call = a.decode_batches if decode.startswith('device') else [1]
            for eng in (a.engines if decode.startswith('device') else ['on']):
                for seg in a.segments:
                    runs += [('gpu', 'train', a.workers, a.batches, True, n, decode, seg, eng) for n in batches_a_call]
                if decode == 'device':
                    runs += [('gpu', 'train', a.workers, a.batches, False, 1, decode, '', eng)]
                for seg in a.segments:
                    runs += [('gpu', 'val', a.workers, a.batches, True, n, decode, seg, eng) for n in batches_a_call]
        runs += [('pil', 'train', 8, 40, True, 1, 'workers', '', 'on'),
                 ('pil', 'train', cores - 1, 50, True, 1, 'workers', '', 'on'),
                 ('pil', 'val', cores - 1, 45, True, 1, 'workers', '', 'on')]
        for pipeline, split, workers, batches, pin, n, decode, seg, eng in runs:
            if pipeline not in a.pipelines or split not in a.splits:
                continue
            rows.append(pipeline_rate(a.root, pipeline, split, workers, batches, pin, n, decode, seg or 'default',
                                      eng))
            print(rows[-1], flush=True)
    if 'contention' in a.parts:
        rows += contention(a.root)
    if 'decode-profile' in a.parts:
        rows += decode_profile(a.root)
    if 'gputime' in a.parts:
        rows.append(gpu_time(a.root))
        print(rows[-1], flush=True)
    if 'main' in a.parts:
        # round-robin over the runs, --repeat times: a machine drifts between runs of one call (one H200,
        # 2026-12-07: the same JPEG run gave 5707-6424 img/s), so each configuration samples the whole call
        rates = {run: [] for run in a.main_runs}
        for rnd, run in itertools.product(range(a.repeat), a.main_runs):
            pipeline, data, step, n, decode = parse_run(run)
            rows.append(main_py(a.root, pipeline, data == 'synthetic', a.workers if pipeline == 'gpu' else cores - 1,
                                a.images, step, n, a.main_prelude, decode))
            rows[-1]['round'] = rnd
            rates[run] += [rows[-1]['img/s']] if rows[-1]['img/s'] else []
            print({k: v for k, v in rows[-1].items() if k != 'command'}, flush=True)
        for run, r in rates.items():
            if a.repeat > 1 and r:
                print(f'{run}: median {statistics.median(r):.0f} img/s of {sorted(r)}', flush=True)
    if 'profile' in a.parts:
        for run in a.main_runs:
            pipeline, data, step, _, _ = parse_run(run)
            rows.append(profile_main(a.root, pipeline, data == 'synthetic',
                                     a.workers if pipeline == 'gpu' else cores - 1, a.images, step,
                                     a.profile_options.split()))
            print(json.dumps(rows[-1], indent=1), flush=True)
    if 'gil' in a.parts:
        for run in a.main_runs:
            pipeline, data, step, _, decode = parse_run(run)
            rows.append(gil_main(a.root, pipeline, data == 'synthetic', a.workers if pipeline == 'gpu' else cores - 1,
                                 a.images, step, decode))
            print(json.dumps(rows[-1], indent=1), flush=True)
    if 'worker' in a.parts:
        rows += worker_cost(a.root)
        for workers in sorted({1, a.workers}):
            rows += worker_batches(a.root, workers)
    if 'harness' in a.parts:
        for step in a.harness_steps:
            rows.append(harness(step))
            print(rows[-1]['output_tail'], flush=True)
    env = environment()
    env['cpu_cores'] = cores
    env['folder'] = info
    print(write_results('input_pipeline', rows, ['part', 'pipeline', 'split', 'data', 'step', 'workers',
                                                 'decode_batches', 'decode', 'segments', 'engines', 'round', 'prelude',
                                                 'pin_memory', 'registered',
                                                 'stream_priority', 'finish_streams', 'img/s', 'input_wait_%',
                                                 'workers_busy_%', 'ms_per_item', 'decode img/s', 'finish img/s',
                                                 'ms_per_batch', 'rc'], env))


if __name__ == '__main__':
    main()
