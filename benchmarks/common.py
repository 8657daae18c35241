"""Timing and reporting helpers shared by the benchmarks (the protocol of docs/benchmarks.md)."""
import datetime
import json
import os
import platform
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# main.py's recommended flags (README): the fused window process, attention and LayerNorm, fused AdamW, O2 bf16
RECOMMENDED = ['--fused_window_process', '--unfused_mha', '--fused_layernorm', '--fused_adam', '--amp-opt-level', 'O2',
               '--amp-dtype', 'bfloat16']


def environment() -> dict:
    import triton
    return {
        'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu',
        'torch': torch.__version__, 'triton': triton.__version__, 'python': platform.python_version(),
        'date': datetime.date.today().isoformat(), 'command': ' '.join([os.path.basename(sys.executable)] + sys.argv),
    }


def cuda_time_ms(fn, warmup: int = 10, iters: int = 30) -> float:
    """Median-free mean over `iters` calls between CUDA events, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def bench_ms(fn) -> float:
    """Median time of a short kernel through triton's do_bench (rotating nothing: callers pass
    inputs larger than L2)."""
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode='median')


def graph_us(fn):
    """GPU time of `fn` replayed as a CUDA graph (host launch cost removed), in us; None where fn
    cannot be captured. Beside bench_ms it separates host overhead from GPU time: on a slow host
    an eager call of a few short kernels is bound by its launches, not by the GPU."""
    import triton
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode='median') * 1e3
    except Exception:
        return None


def train_step(precision, run, model, master, optimizer, x, y, criterion=None):
    """The harness's training step (docs/benchmarks.md's protocol) as a closure: forward under the
    precision's autocast (`run`: the model or its compiled form), the loss in fp32 (label-smoothed cross
    entropy unless `criterion` is given), backward, clip at 5.0 and step, zero_grad."""
    def step():
        with precision.autocast():
            out = run(x)
        loss = (criterion or _smoothed_ce)(out.float(), y)
        precision.backward(loss)
        precision.step(optimizer, master.parameters(), 5.0)
        precision.zero_grad(optimizer, model)
    return step


def _smoothed_ce(out, y):
    return torch.nn.functional.cross_entropy(out, y, label_smoothing=0.1)


def markdown_table(rows: list, columns: list) -> str:
    out = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    for r in rows:
        out.append('| ' + ' | '.join(_fmt(r.get(c, '')) for c in columns) + ' |')
    return '\n'.join(out)


def _fmt(v):
    if isinstance(v, float):
        return f'{v:.3g}' if abs(v) < 100 else f'{v:.0f}'
    return str(v)


def write_results(name: str, rows: list, columns: list, env: dict) -> str:
    """Write <OUT>/<name>.json and .md (OUT env var, else benchmarks/results); return the table."""
    out_dir = os.environ.get('OUT') or os.path.join(ROOT, 'benchmarks', 'results')
    os.makedirs(out_dir, exist_ok=True)
    table = markdown_table(rows, columns)
    with open(os.path.join(out_dir, f'{name}.json'), 'w') as f:
        json.dump({'env': env, 'rows': rows}, f, indent=1)
    with open(os.path.join(out_dir, f'{name}.md'), 'w') as f:
        f.write(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['date']}\n"
                f"`{env['command']}`\n\n{table}\n")
    return table
