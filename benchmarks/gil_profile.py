"""Which of main.py's threads hold the GIL during training: main.py under py-spy's sampler.

py-spy (pip install py-spy; a 3 MB wheel) samples every thread's Python stack from outside the
process; with --gil it keeps only the samples of the thread holding the GIL. This script runs main.py
(the arguments after `--`) under it and reports, per thread, the samples taken while it held the GIL,
without those in compilation (dynamo, inductor), and the functions and lines they were in:

  python benchmarks/gil_profile.py --rate 250 -- --cfg configs/swin/swin_tiny_patch4_window7_224.yaml \\
      --data-path /tmp/bench_jpeg --data-pipeline gpu --compile ... --opts TRAIN.EPOCHS 1

The GIL share of a thread is its samples over rate x the training's steady seconds (from main.py's
images/s and the epoch's size): a sum near 1 means the GIL is saturated, and one thread waits for
another's Python. The raw samples go to $OUT (else /tmp) as gil_profile.txt.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# frames of compilation: samples under them are left out of the steady-state counts
COMPILING = ('convert_frame', 'compile_fx', 'graph_lowering', 'async_compile', 'codecache', 'autotune',
             'graph_compile', 'aot_autograd_result', 'autograd_cache')     # the last three: the backward's


def parse_raw(text: str) -> list:
    """py-spy's raw format (one line per distinct stack: 'frame;frame;... count', with --threads
    the first frame 'thread (0x..): Name') -> [(thread name, [frames, outermost first], count)]."""
    stacks = []
    for line in text.splitlines():
        head, _, count = line.rpartition(' ')
        if not head or not count.isdigit():
            continue
        frames = head.split(';')
        m = re.match(r'thread \(([^)]*)\)(?::\s*(.*))?$', frames[0])
        thread = (m.group(2) or f'thread {m.group(1)}') if m else '?'
        frames = frames[1:] if m else frames
        if thread.startswith('thread ') and frames and frames[0].startswith('<module> (main.py'):
            thread = 'MainThread'         # before the threading module has named it
        stacks.append((thread, frames, int(count)))
    return stacks


def _thread_kind(name: str) -> str:
    """'Thread-3 (stage)' -> 'stage': threads of one kind across runs share a row."""
    m = re.match(r'Thread-\d+ \((.*)\)$', name)
    return m.group(1) if m else name


def summarise(stacks: list, top: int = 12) -> dict:
    """Per thread kind: GIL samples in training (compilation, and the main thread outside the training
    loop, counted apart), the functions (inclusive) and the lines (innermost frame) they were in, most
    first."""
    threads = defaultdict(lambda: {'samples': 0, 'compiling': 0, 'outside': 0, 'functions': Counter(),
                                   'lines': Counter()})
    for thread, frames, count in stacks:
        t = threads[_thread_kind(thread)]
        if any(c in f for f in frames for c in COMPILING):
            t['compiling'] += count
            continue
        if thread == 'MainThread' and not any(f.startswith('train_one_epoch ') for f in frames):
            t['outside'] += count         # the main thread's start-up, data scan, validation, checkpoints
            continue
        t['samples'] += count
        for f in set(re.sub(r':\d+\)$', ')', f) for f in frames):
            t['functions'][f] += count
        if frames:
            t['lines'][frames[-1]] += count
    return {name: {'samples': t['samples'], 'compiling': t['compiling'], 'outside': t['outside'],
                   'functions': t['functions'].most_common(top), 'lines': t['lines'].most_common(top)}
            for name, t in sorted(threads.items(), key=lambda kv: -kv[1]['samples'])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--rate', type=int, default=250, help='samples a second')
    p.add_argument('--py-spy', default=shutil.which('py-spy') or 'py-spy')
    p.add_argument('--top', type=int, default=12)
    p.add_argument('--images', type=int, default=0, help="the epoch's training images (for the GIL shares)")
    p.add_argument('args', nargs=argparse.REMAINDER, help="-- then main.py's arguments")
    a = p.parse_args()
    args = a.args[1:] if a.args[:1] == ['--'] else a.args
    raw = os.path.join(os.environ.get('OUT') or '/tmp', 'gil_profile.txt')
    cmd = [a.py_spy, 'record', '--gil', '--threads', '--nonblocking', '--rate', str(a.rate), '--format', 'raw',
           '--output', raw, '--', sys.executable, 'main.py'] + args
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED='1'))
    out = proc.stdout + proc.stderr
    m = re.search(r'\(([\d.]+) images/s from step (\d+)', out)
    if proc.returncode != 0 or not m or not os.path.exists(raw):
        print(out[-3000:])
    report = {'rc': proc.returncode, 'img/s': float(m.group(1)) if m else None, 'rate': a.rate}
    if os.path.exists(raw):
        with open(raw) as f:
            report['threads'] = summarise(parse_raw(f.read()), a.top)
        if m and a.images:
            seconds = a.images / float(m.group(1))
            report['steady_s'] = seconds
            report['gil_share'] = {k: round(v['samples'] / (a.rate * seconds), 3) for k, v in report['threads'].items()}
    print('GIL ' + json.dumps(report))


if __name__ == '__main__':
    main()
