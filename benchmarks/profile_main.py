"""Where main.py's training loop loses time: profile steps of a real main.py run.

Runs main.py in this process with the arguments after `--`, advances a torch profiler once per
training batch, and reports for the profiled steps (after --skip batches, so compilation and
warm-up stay out):
- wall ms per step and the GPU's busy ms per step (the union of kernels, copies and memsets over
  every stream), so wall - busy is what the GPU waits for the host;
- the GPU's idle gaps longer than --gap-us: how many per step, their total, and the host
  operations and CUDA runtime calls that were running when the longest ones began;
- the host's top operations and runtime calls by time (a host sync shows as cudaStreamSynchronize,
  cudaEventSynchronize or a blocking cudaMemcpy), and each host thread's busy time (its outermost
  operations: the training loop, the input pipeline's decode and augment threads, pin memory).

  python benchmarks/profile_main.py --skip 40 --steps 20 -- --cfg configs/swin/swin_tiny_patch4_window7_224.yaml \\
      --data-path /tmp/bench_jpeg --data-pipeline gpu --compile ... --opts TRAIN.EPOCHS 1

The run stops after the profiled batches (no validation). The trace (chrome format) is written to $OUT (else /tmp) as profile_main.json.
"""
import argparse
import json
import os
import sys
from collections import Counter, defaultdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import main as main_py  # noqa: E402  (main.py's own module: its parser, loop and loaders)


class _Done(Exception):
    """Raised in place of the batch after the profiled ones: the run stops there."""


class _Stepped:
    """The train loader, with the profiler advanced once per batch it yields, ending the run
    after `last` batches."""

    def __init__(self, loader, prof, last: int):
        self._loader, self._prof, self._last = loader, prof, last

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __len__(self):
        return len(self._loader)

    def __iter__(self):
        for i, batch in enumerate(self._loader):
            self._prof.step()
            if i == self._last:
                raise _Done
            yield batch


def _union(intervals):
    merged = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return merged


def outermost(events: list):
    """(thread id, event) for each host thread's outermost events: those not inside the previous
    outermost event of their thread."""
    by_tid = defaultdict(list)
    for e in events:
        by_tid[e['tid']].append(e)
    for tid, evs in by_tid.items():
        end = -1.
        for e in sorted(evs, key=lambda e: (e['ts'], -e['dur'])):
            if e['ts'] >= end:
                end = e['ts'] + e['dur']
                yield tid, e


def timeline(step: dict, events: list, busy: list, gap_us: float, min_us: float = 30.) -> list:
    """One step as lines '+start_us dur_us where name': the host's outermost events per thread
    (operators, runtime calls, Python functions where recorded) of at least min_us, and the GPU's
    busy spans and idle gaps."""
    t0, t1 = step['ts'], step['ts'] + step['dur']
    host = [e for e in events
            if e.get('cat') in ('cpu_op', 'cuda_runtime', 'cuda_driver', 'python_function', 'user_annotation')
            and t0 <= e['ts'] < t1 and not e['name'].startswith('ProfilerStep#')]
    rows = [(e['ts'] - t0, e['dur'], f'host {tid}', e['name'][:80]) for tid, e in outermost(host)
            if e['dur'] >= min_us]
    spans = []                        # busy spans, joined across gaps shorter than gap_us
    for s, e in busy:
        if spans and s - spans[-1][1] <= gap_us:
            spans[-1][1] = e
        else:
            spans.append([s, e])
    for s, e in spans:
        if e > t0 and s < t1:
            rows.append((max(s, t0) - t0, min(e, t1) - max(s, t0), 'GPU', 'busy'))
    for (s0, e0), (s1, _) in zip(spans, spans[1:]):
        if t0 <= e0 < t1:
            rows.append((e0 - t0, s1 - e0, 'GPU', 'idle'))
    return [f'+{s:8.0f} {d:7.0f}  {w:<12} {n}' for s, d, w, n in sorted(rows)]


def analyse(trace: dict, gap_us: float, top: int) -> dict:
    events = [e for e in trace.get('traceEvents', []) if e.get('ph') == 'X']
    steps = sorted((e for e in events if e['name'].startswith('ProfilerStep#') and e.get('cat') == 'user_annotation'),
                   key=lambda e: e['ts'])
    if len(steps) < 2:
        return {'error': f'{len(steps)} profiled steps: raise --steps or lower --skip'}
    t0, t1 = steps[0]['ts'], steps[-1]['ts'] + steps[-1]['dur']
    n = len(steps)
    gpu = [(e['ts'], e['ts'] + e['dur']) for e in events
           if e.get('cat') in ('kernel', 'gpu_memcpy', 'gpu_memset') and t0 <= e['ts'] < t1]
    busy = _union(gpu)
    busy_us = sum(e - s for s, e in busy)
    gaps = [(busy[i][1], busy[i + 1][0]) for i in range(len(busy) - 1) if busy[i + 1][0] - busy[i][1] > gap_us]
    host = [e for e in events if e.get('cat') in ('cpu_op', 'cuda_runtime', 'cuda_driver', 'user_annotation')
            and t0 <= e['ts'] < t1 and not e['name'].startswith('ProfilerStep#')]

    def running_at(t):
        return sorted({e['name'][:70] for e in host if e['ts'] <= t < e['ts'] + e['dur']})

    longest = sorted(gaps, key=lambda g: g[0] - g[1])[:8]
    ops, runtime = defaultdict(float), defaultdict(float)
    calls = Counter()
    for e in host:
        (runtime if e['cat'] in ('cuda_runtime', 'cuda_driver') else ops)[e['name'][:70]] += e['dur']
        calls[e['name'][:70]] += 1
    threads = defaultdict(lambda: [0.0, defaultdict(float)])   # tid -> [busy us, {outermost op: us}]
    for tid, e in outermost(host):
        threads[tid][0] += e['dur']
        threads[tid][1][e['name'][:60]] += e['dur']
    kernels = defaultdict(float)
    for e in events:
        if e.get('cat') == 'kernel' and t0 <= e['ts'] < t1:
            kernels[e['name'][:70]] += e['dur']
    per = lambda d: [(k, round(v / n / 1e3, 3), round(calls[k] / n, 1)) for k, v in  # noqa: E731
                     sorted(d.items(), key=lambda kv: -kv[1])[:top]]
    return {
        'timeline': timeline(steps[n // 2], events, busy, gap_us),
        'steps': n, 'wall_ms_per_step': (t1 - t0) / n / 1e3, 'gpu_busy_ms_per_step': busy_us / n / 1e3,
        'gaps_per_step': len(gaps) / n, 'gap_ms_per_step': sum(e - s for s, e in gaps) / n / 1e3,
        'longest_gaps': [{'us': round(e - s, 1), 'host_running': running_at(s)} for s, e in longest],
        'top_host_ops_ms_per_step': per(ops), 'top_runtime_ms_per_step': per(runtime),
        'host_threads_ms_per_step': [
            {'tid': tid, 'busy': round(b / n / 1e3, 3),
             'top': [(k, round(v / n / 1e3, 3)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:6]]}
            for tid, (b, d) in sorted(threads.items(), key=lambda kv: -kv[1][0])],
        'top_kernels_ms_per_step': [(k, round(v / n / 1e3, 3)) for k, v in
                                    sorted(kernels.items(), key=lambda kv: -kv[1])[:top]],
    }


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index('--') if '--' in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--skip', type=int, default=40, help='batches before the profiled ones')
    p.add_argument('--steps', type=int, default=20, help='profiled batches')
    p.add_argument('--gap-us', type=float, default=20.0)
    p.add_argument('--top', type=int, default=15)
    p.add_argument('--python', action='store_true', help="record Python functions too (slows the host)")
    p.add_argument('--switch-interval', type=float, default=None,
                   help="sys.setswitchinterval for the run, seconds (Python's default 0.005): how long a "
                        "thread that wants the GIL waits for a busy one")
    a = p.parse_args(argv[:split])
    if a.switch_interval is not None:
        sys.setswitchinterval(a.switch_interval)
    from torch.profiler import ProfilerActivity, profile, schedule
    out = os.environ.get('OUT', '/tmp')
    path = os.path.join(out, 'profile_main.json')
    from torch._C._profiler import _ExperimentalConfig
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=a.python,
                   experimental_config=_ExperimentalConfig(verbose=True) if a.python else None,
                   schedule=schedule(skip_first=a.skip, wait=0, warmup=2, active=a.steps, repeat=1),
                   on_trace_ready=lambda pr: pr.export_chrome_trace(path))
    build = main_py.build_loader

    def build_loader(config):
        parts = list(build(config))
        if parts[2] is not None:
            parts[2] = _Stepped(parts[2], prof, a.skip + 2 + a.steps)
        return tuple(parts)

    main_py.build_loader = build_loader
    _args, config = main_py.parse_option(argv[split + 1:])
    torch.backends.cudnn.benchmark = True
    if os.path.exists(path):
        os.remove(path)
    with prof:
        try:
            main_py.main(config)
        except _Done:
            pass
    if not os.path.exists(path):
        sys.exit(f'no trace: main.py trained fewer than {a.skip + 2 + a.steps} batches (an epoch too short, or '
                 f'a finished run resumed from its output folder: --opts TRAIN.AUTO_RESUME False)')
    with open(path) as f:
        report = analyse(json.load(f), a.gap_us, a.top)
    print('PROFILE ' + json.dumps(report))


if __name__ == '__main__':
    main()
