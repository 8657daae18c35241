"""benchmarks/profile_main.py's trace analysis on a hand-made trace: the figures it reports (wall and
GPU-busy time per step, idle gaps, each host thread's busy time) are what the docs quote; and
benchmarks/host_cost.py's stand-ins leave no kernel of a training step to launch."""
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))


def _x(name, cat, ts, dur, tid=1):
    return {'ph': 'X', 'name': name, 'cat': cat, 'ts': ts, 'dur': dur, 'tid': tid}


def test_profile_main_analysis_of_a_known_trace():
    from profile_main import analyse
    events = [
        _x('ProfilerStep#1', 'user_annotation', 0, 1000), _x('ProfilerStep#2', 'user_annotation', 1000, 1000),
        # GPU: two streams overlapping (busy 0-400 as one span), then a 300 us gap, then 700-1500;
        # a 10 us gap at 1500-1510 (under the 20 us threshold), then 1510-1800; idle 1800-2000
        _x('k1', 'kernel', 0, 300, tid=7), _x('k2', 'kernel', 100, 300, tid=8),
        _x('copy', 'gpu_memcpy', 700, 800, tid=7), _x('k3', 'kernel', 1510, 290, tid=7),
        # host thread 1: an operator with a nested one (counted once), a runtime call during the gap
        _x('aten::outer', 'cpu_op', 50, 200), _x('aten::inner', 'cpu_op', 60, 100),
        _x('cudaStreamSynchronize', 'cuda_runtime', 380, 200),
        # host thread 2: the decode thread waiting
        _x('cudaEventSynchronize', 'cuda_runtime', 0, 1500, tid=2),
    ]
    r = analyse({'traceEvents': events}, gap_us=20.0, top=5)
    assert r['steps'] == 2
    assert r['wall_ms_per_step'] == pytest.approx(1.0)
    assert r['gpu_busy_ms_per_step'] == pytest.approx((400 + 800 + 290) / 2 / 1e3)
    assert r['gaps_per_step'] == pytest.approx(0.5)            # only the 300 us gap is over 20 us
    assert r['gap_ms_per_step'] == pytest.approx(0.15)
    assert r['longest_gaps'][0]['us'] == pytest.approx(300)
    assert r['longest_gaps'][0]['host_running'] == ['cudaEventSynchronize', 'cudaStreamSynchronize']
    threads = {t['tid']: t for t in r['host_threads_ms_per_step']}
    assert threads[2]['busy'] == pytest.approx(0.75)
    assert threads[1]['busy'] == pytest.approx((200 + 200) / 2 / 1e3)      # the nested op not twice
    assert dict(threads[1]['top'])['aten::outer'] == pytest.approx(0.1)
    assert 'aten::inner' not in dict(threads[1]['top'])
    assert [t['tid'] for t in r['host_threads_ms_per_step']] == [2, 1]   # busiest first
    # the timeline is the middle step's (the second): busy 1000-1800 (the 10 us gap joined), no idle
    # span reported after the last busy one
    assert [line.split() for line in r['timeline']] == [['+', '0', '800', 'GPU', 'busy']]


def test_gil_profile_summary_of_known_samples():
    """benchmarks/gil_profile.py on py-spy raw lines: threads named and merged by kind, compilation and the
    main thread outside the training loop counted apart, functions inclusive (once per stack), lines
    innermost."""
    from gil_profile import parse_raw, summarise
    raw = '\n'.join([
        'thread (0x1): MainThread;<module> (main.py:500);train_one_epoch (main.py:330);step (amp.py:10) 7',
        'thread (0x1): MainThread;<module> (main.py:500);train_one_epoch (main.py:331);f (a.py:3);f (a.py:4) 2',
        'thread (0x1): MainThread;<module> (main.py:500);validate (main.py:400) 5',
        'thread (0x1): MainThread;<module> (main.py:500);train_one_epoch (main.py:330);_compile '
        '(torch/_dynamo/convert_frame.py:9) 11',
        'thread (0x2): Thread-3 (stage);stage (data/gpu_pipeline.py:520);finish (data/gpu_pipeline.py:560) 4',
        'thread (0x3): Thread-4 (stage);stage (data/gpu_pipeline.py:520);decode (data/gpu_pipeline.py:555) 3',
        'thread (0x9);<module> (main.py:1);import (x.py:2) 6',
        'not a sample line',
    ])
    stacks = parse_raw(raw)
    assert len(stacks) == 7 and stacks[-1][0] == 'MainThread'      # unnamed, but main.py's module frame
    s = summarise(stacks)
    main = s['MainThread']
    assert (main['samples'], main['compiling'], main['outside']) == (9, 11, 11)
    assert dict(main['functions'])['f (a.py)'] == 2                 # two frames of f in one stack: counted once
    assert main['lines'][0] == ('step (amp.py:10)', 7)
    assert s['stage']['samples'] == 7 and list(s)[0] == 'MainThread'


def test_fp8_finetune_procedure_on_the_cpu(tmp_path):
    """benchmarks/fp8_finetune.py end to end where float8 is not available (the micro model, no --fp8
    runs): the shapes JPEGs, a pre-training run, fine-tuning runs started from its last checkpoint, their
    per-epoch curves and the verdict's seed spread; and the verdict's rule on its own."""
    import json
    import subprocess
    from fp8_finetune import verdict
    assert verdict({0: 1.00, 1: 1.05}, {0: 1.04})['within'] is True            # inside the seed spread
    assert verdict({0: 1.00, 1: 1.05}, {0: 1.06})['within'] is False
    assert verdict({0: 1.00, 1: 1.001}, {0: 1.015})['within'] is True          # 2% floor
    r = subprocess.run([sys.executable, 'benchmarks/fp8_finetune.py', '--out', str(tmp_path), '--cfg',
                        'configs/demo/swin_micro_shapes10.yaml', '--flags', 'none', '--runs', 'bf16:0', 'bf16:1',
                        '--batch', '8', '--train-per-class', '4', '--steps', '8', '--pretrain-epochs', '1',
                        '--workers', '0'], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.load(open(tmp_path / 'fp8_finetune.json'))
    assert result['steps'] == 10 and result['start'].endswith('pretrain/ckpt_epoch_0.pth')
    assert sorted(result['final_train_loss']['bf16']) == ['0', '1'] and result['within'] is None
    assert result['bf16_seed_spread'] == pytest.approx(abs(result['final_train_loss']['bf16']['1']
                                                           - result['final_train_loss']['bf16']['0']))
    assert [c['steps'] for c in result['curves'] if c['variant'] == 'bf16:0'] == [5, 10]
    for name in ('finetune_bf16_seed0.out', 'finetune_bf16_seed1.out'):
        assert 'for fine-tuning' in open(tmp_path / name).read()      # started from the pre-trained weights


def test_host_cost_stubs_every_kernel_and_times_a_step(tmp_path):
    """benchmarks/host_cost.py in its own process (it replaces the kernels of the modules it imports):
    no Triton kernel of ours is left to launch, and a step of the all-flags model is timed."""
    import subprocess
    code = ('import sys; sys.argv = ["host_cost.py", "--steps", "1"]; import host_cost, importlib, triton; '
            'host_cost.main(); '
            'left = [f"{m}.{a}" for m in host_cost.KERNEL_MODULES '
            'for a, v in vars(importlib.import_module("kernels." + m)).items() '
            'if isinstance(v, triton.runtime.jit.KernelInterface)]; '
            'import glob, os; mods = sorted(os.path.basename(f)[:-3] for f in glob.glob("kernels/*.py")); '
            'print("LEFT", left); print("MODULES", mods); print("STUBBED", list(host_cost.KERNEL_MODULES))')
    p = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OUT=str(tmp_path), PYTHONPATH=os.path.join(ROOT, 'benchmarks')))
    assert p.returncode == 0, p.stderr[-2000:]
    assert 'LEFT []' in p.stdout
    assert "'flags': 'all5'" in p.stdout and (tmp_path / 'host_cost_tiny_all5.md').exists()
    # every module of kernels/ with model kernels is stubbed (the input pipeline's are not in a training step)
    # (not imported here: host_cost sets TRITON_INTERPRET for the process that imports it)
    modules, stubbed = (eval(p.stdout.split(f'{key} ')[1].splitlines()[0]) for key in ('MODULES', 'STUBBED'))
    pipeline = {'affine_resample', 'colour_ops', 'crop_resize', 'normalize_erase', '_utils', '__init__'}
    assert set(modules) - pipeline == set(stubbed)
