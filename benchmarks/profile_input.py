"""Where the batched input pipeline spends its time: the worker side alone, then each stage of
the device transform on prefetched raw batches (synchronised between stages), then cProfile.

    python benchmarks/profile_input.py --root /tmp/bench_jpeg   (after bench_input.py made the folder)
"""
import argparse
import cProfile
import io
import pstats
import time

import torch

from common import environment
from bench_input import _config
from data import build_loader


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument('--root', default='/tmp/bench_jpeg')
    p.add_argument('--workers', type=int, default=12)
    a = p.parse_args()
    print(environment())
    for pin in (True, False):
        cfg = _config(a.root, 'gpu', a.workers)
        cfg.defrost()
        cfg.DATA.PIN_MEMORY = pin
        cfg.freeze()
        _, _, train, _, _ = build_loader(cfg)
        train.sampler.set_epoch(0)
        raws, t0 = [], None
        for i, raw in enumerate(train.loader):
            if i == 5:
                t0 = time.time()
            raws.append(raw)
            if i == 45:
                break
        print(f'workers alone (pin_memory={pin}): {40 * 128 / (time.time() - t0):.0f} img/s', flush=True)
    tr = train.transform
    sync = torch.cuda.synchronize
    stages = {'decode': 0.0, 'crop + resize': 0.0, 'augment': 0.0, 'normalize+erase': 0.0}
    for raw in raws[:3]:
        tr(*raw)
    for raw in raws[5:25]:
        sync(); t = time.time()
        images, kind, params, labels, indices, seed = tr.decode(*raw)
        sync(); stages['decode'] += time.time() - t; t = time.time()
        x = tr._resize(images, kind, params)
        sync(); stages['crop + resize'] += time.time() - t; t = time.time()
        x = tr._augment(x, params)
        sync(); stages['augment'] += time.time() - t; t = time.time()
        x = tr._normalize_erase(x, params, int(seed))
        sync(); stages['normalize+erase'] += time.time() - t
    for k, v in stages.items():
        print(f'{k:16s} {v / 20 * 1e3:7.2f} ms per batch of 128', flush=True)
    pr = cProfile.Profile()
    pr.enable()
    for raw in raws[25:35]:
        tr(*raw)
    sync()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats('tottime').print_stats(18)
    print(s.getvalue()[-5000:])


if __name__ == '__main__':
    main()
