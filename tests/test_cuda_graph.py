"""--cuda-graph: the captured whole step against the eager step (same losses, gradients' effects and
weights after N steps, with drop-path, changing learning rates, the fp16 loss scale, O2 master
weights and a batch-shape change), main.py with it (on one GPU and under torchrun on two), the
gradients' average over ranks (two gloo processes on the CPU; NCCL inside a captured graph on the
GPU), and its refusals."""
import argparse
import copy
import os
import sys

import pytest
import torch

from config import ConfigError, get_config
from cuda_graph import FlatGradients, GraphedTrainStep, check_cuda_graph_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs/swin/swin_tiny_patch4_window7_224.yaml')
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA graphs need a GPU')


def _config(*opts):
    return get_config(argparse.Namespace(cfg=TINY, opts=list(opts) or None))


def test_refusals_name_the_reason():
    from kernels.optimizers import FusedAdamW
    p = [torch.nn.Parameter(torch.zeros(3))]
    fused, plain = FusedAdamW(p, backend='torch'), torch.optim.AdamW(p)
    cuda = torch.device('cuda')
    cases = [(_config(), torch.device('cpu'), fused, 'needs a CUDA GPU'),
             (_config(), cuda, plain, '--fused_adam'),
             (_config('TRAIN.USE_CHECKPOINT', 'True'), cuda, fused, 'use-checkpoint'),
             (_config('COMPILE', 'True'), cuda, fused, 'reduce-overhead')]
    for config, device, opt, match in cases:
        with pytest.raises(ConfigError, match=match):
            check_cuda_graph_config(config, device, opt)
    check_cuda_graph_config(_config(), cuda, fused)      # what it accepts
    check_cuda_graph_config(_config('TRAIN.ACCUMULATION_STEPS', '3'), cuda, fused)


def test_main_refuses_cuda_graph_on_the_cpu(demo_data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip('the CPU case')
    from test_train import DEMO_CFG, FAST, run_main
    out = run_main(['--cfg', DEMO_CFG, '--data-path', demo_data, '--output', str(tmp_path), '--cuda-graph',
                    '--fused_adam', '--opts', 'TRAIN.EPOCHS', '1'] + FAST, expect_ok=False)
    assert 'error: --cuda-graph needs a CUDA GPU' in out and 'Traceback' not in out


def _run(level, dtype, graphed, batches, flags, accum=1, distributed=False):
    """N training micro-steps of a small Swin from fixed weights, the optimizer stepping every
    `accum` of them as main.py does; -> (losses, grad norms, master weights, the graphed step)."""
    from amp import Precision
    from kernels.optimizers import FusedAdamW
    from models.swin_transformer import SwinTransformer
    from optimizer import param_groups
    torch.manual_seed(0)
    precision = Precision(level, dtype, torch.device('cuda'))
    model = SwinTransformer(img_size=64, patch_size=4, embed_dim=48, depths=(2, 2), num_heads=(3, 6), window_size=4,
                            num_classes=10, drop_path_rate=0.3, **flags).cuda()
    model, master = precision.prepare(model)
    optimizer = FusedAdamW(param_groups(master, 0.05), lr=1e-3)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    model.train()
    torch.manual_seed(1)          # the same drop-path draws from here on, in both runs
    step = (GraphedTrainStep(model, criterion, optimizer, precision, 5.0, accum=accum, distributed=distributed)
            if graphed else None)
    losses, norms = [], []
    for i, (x, y) in enumerate(batches):
        first, update = i % accum == 0, (i + 1) % accum == 0
        for g in optimizer.param_groups:          # a schedule: the rate changes every optimizer step
            g['lr'] = 1e-3 * (1 + i // accum) / len(batches)
        x = precision.cast_input(x)
        if graphed:
            loss, _, norm = step(x, y, first=first, update=update)
        else:
            if first:
                precision.zero_grad(optimizer, model)
            with precision.autocast():
                out = model(x)
            loss = criterion(out.float(), y)
            precision.backward(loss / accum)
            norm = precision.step(optimizer, master.parameters(), 5.0) if update else None
        losses.append(loss.item())
        if update:
            norms.append(float(norm))
    return losses, norms, [p.detach().clone() for p in master.parameters()], step


def _batches(n, sizes=None):
    g = torch.Generator().manual_seed(2)
    sizes = sizes or [8] * n
    return [(torch.randn(b, 3, 64, 64, generator=g).cuda(), torch.randint(0, 10, (b,), generator=g).cuda())
            for b in sizes]


@needs_cuda
@pytest.mark.parametrize('level,dtype', [('O2', 'bfloat16'), ('O1', 'float16'), ('O0', 'float16')])
@pytest.mark.parametrize('fused', [False, True], ids=['reference ops', 'all flags'])
def test_graphed_step_equals_eager_steps(level, dtype, fused):
    """8 steps: 3 eager warm-up steps, then the captured graph replayed 5 times, against 8 eager
    steps: the same losses, grad norms and master weights (the same kernels in the same order; in
    fp32 cuBLAS may pick another algorithm inside a capture, so equal to fp32 rounding, not bitwise)."""
    flags = dict(fused_window_process=True, fused_attention=True, fused_layernorm=True) if fused else {}
    batches = _batches(8)
    eager = _run(level, dtype, False, batches, flags)
    graphed = _run(level, dtype, True, batches, flags)
    assert graphed[3].captures == 1 and graphed[3].graph is not None
    _same_run(graphed, eager, weight_atol=1e-5 if level == 'O0' else 1e-6)


def _same_run(graphed, eager, weight_atol=1e-6):
    """weight_atol: in fp32 (O0) a GEMM algorithm chosen differently inside the capture changes a
    gradient in its last bits, and AdamW's step lr * m / (sqrt(v) + eps) for a gradient near eps can
    move by a good part of its size from that alone: there the weights are held to 1% of the largest
    step (lr 1e-3; measured on an H200: 1.2e-6 on one element of 288)."""
    torch.testing.assert_close(graphed[0], eager[0], rtol=1e-5, atol=0)       # losses
    torch.testing.assert_close(graphed[1], eager[1], rtol=1e-4, atol=0)       # grad norms
    for a, b in zip(graphed[2], eager[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=weight_atol)


@needs_cuda
@pytest.mark.parametrize('accum', [2, 3])
def test_graphed_accumulation_equals_eager_accumulation(accum):
    """TRAIN.ACCUMULATION_STEPS 2 and 3 (3: a first, a middle and a last micro-step graph, sharing one
    memory pool), drop-path on, all flags at O2 bf16: 3 optimizer steps run eagerly (the warm-up,
    3 x accum micro-steps), then 3 replayed, against the eager loop: the same losses, norms and weights."""
    flags = dict(fused_window_process=True, fused_attention=True, fused_layernorm=True)
    batches = _batches(6 * accum)
    eager = _run('O2', 'bfloat16', False, batches, flags, accum)
    graphed = _run('O2', 'bfloat16', True, batches, flags, accum)
    assert graphed[3].captures == min(accum, 3) and graphed[3].graph is None
    _same_run(graphed, eager)


@needs_cuda
def test_a_new_batch_shape_is_captured_again():
    sizes = [8, 8, 8, 8, 8, 6, 6, 6, 8, 8]
    batches = _batches(len(sizes), sizes)
    eager = _run('O2', 'bfloat16', False, batches, {})
    graphed = _run('O2', 'bfloat16', True, batches, {})
    assert graphed[3].captures == 3        # 8, then 6 (after one eager step), then 8 again
    _same_run(graphed, eager)


@needs_cuda
@pytest.mark.parametrize('accum', [1, 2])
def test_main_with_cuda_graph_trains_like_eager(demo_data, tmp_path, accum):
    from test_train import DEMO_CFG, FAST, epoch_losses, run_main
    base = ['--cfg', DEMO_CFG, '--data-path', demo_data, '--fused_adam', '--fused_layernorm',
            '--amp-opt-level', 'O2', '--amp-dtype', 'bfloat16']
    opts = ['--accumulation-steps', str(accum), '--opts', 'TRAIN.EPOCHS', '2'] + FAST
    eager = run_main(base + ['--output', str(tmp_path / 'eager')] + opts)
    graphed = run_main(base + ['--output', str(tmp_path / 'graph'), '--cuda-graph'] + opts)
    assert 'captured after' in graphed
    le, lg = epoch_losses(eager), epoch_losses(graphed)
    assert set(le) == set(lg) == {0, 1}
    for e in le:
        assert abs(float(le[e]) - float(lg[e])) <= 1e-4 * abs(float(le[e])), (le, lg)


def _flat_gradients(rank_):
    """One gloo rank: a model of fp32 and bf16 layers, two micro-batches of this rank's own inputs
    accumulated into FlatGradients' views, then averaged; beside it a plain copy's own gradients."""
    import torch.distributed as dist
    torch.manual_seed(0)                                   # the same weights on both ranks
    model = torch.nn.ModuleList([torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3)])
    model[2].to(torch.bfloat16)
    plain = copy.deepcopy(model)
    flat = FlatGradients(list(model.parameters()))
    g = torch.Generator().manual_seed(10 + rank_)          # each rank its own data
    for _ in range(2):
        x = torch.randn(6, 5, generator=g)
        for m in (model, plain):
            (m[2](m[1](m[0](x)).to(torch.bfloat16)).float() ** 2).sum().backward()
    is_view = [p.grad.untyped_storage().data_ptr() in [f.untyped_storage().data_ptr() for f in flat.flats]
               for p in model.parameters()]
    flat.average()
    local = [p.grad.float() for p in plain.parameters()]
    gathered = [[torch.empty_like(t) for _ in range(2)] for t in local]
    for t, out in zip(local, gathered):
        dist.all_gather(out, t)
    return (len(flat.flats), is_view, [p.grad.float().tolist() for p in model.parameters()],
            [((a + b) / 2).tolist() for a, b in gathered], [str(p.grad.dtype) for p in model.parameters()])


def test_flat_gradients_average_over_two_ranks(tmp_path):
    """--cuda-graph under torchrun: each rank's accumulated gradients, one flat buffer a dtype, become
    the mean of both ranks' (as DDP's), in place, in both dtypes, the same on both ranks."""
    from test_train import on_two_gloo_ranks
    got = on_two_gloo_ranks(_flat_gradients, tmp_path)
    for n_flats, is_view, averaged, expected, dtypes in got.values():
        assert n_flats == 2 and all(is_view)
        assert dtypes == ['torch.float32'] * 4 + ['torch.bfloat16'] * 2
        for a, e, d in zip(averaged, expected, dtypes):
            tol = dict(rtol=1e-6, atol=1e-7) if d == 'torch.float32' else dict(rtol=8e-3, atol=1e-5)
            torch.testing.assert_close(torch.tensor(a), torch.tensor(e), **tol)
    assert got[0][2] == got[1][2]                          # the same gradients on both ranks


@needs_cuda
def test_graphed_step_with_the_all_reduce_captured(tmp_path):
    """NCCL's all-reduce of the flat gradients (and of the finite flag) inside the captured step: one
    rank, so the average is the rank's own gradients and the run must equal the eager one."""
    import torch.distributed as dist
    dist.init_process_group('nccl', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1,
                            device_id=torch.device('cuda', torch.cuda.current_device()))
    try:
        flags = dict(fused_window_process=True, fused_attention=True, fused_layernorm=True)
        batches = _batches(8)
        eager = _run('O2', 'bfloat16', False, batches, flags, accum=2)
        graphed = _run('O2', 'bfloat16', True, batches, flags, accum=2, distributed=True)
        assert graphed[3].captures == 2 and graphed[3].flat is not None
        _same_run(graphed, eager)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two GPUs')
def test_main_with_cuda_graph_under_torchrun_trains_like_ddp(demo_data, tmp_path):
    """Two ranks, NCCL: --cuda-graph (gradients averaged inside the graph) against eager DDP over two
    epochs, with gradient accumulation: the same epoch losses, and replicas that stay equal."""
    from test_train import DEMO_CFG, FAST, epoch_losses, run_main
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29531']
    base = ['--cfg', DEMO_CFG, '--data-path', demo_data, '--fused_adam', '--fused_layernorm',
            '--amp-opt-level', 'O2', '--amp-dtype', 'bfloat16', '--accumulation-steps', '2']
    opts = ['--opts'] + FAST + ['TRAIN.EPOCHS', '2', 'DATA.BATCH_SIZE', '8']     # 5 steps a rank an epoch
    eager = run_main(base + ['--output', str(tmp_path / 'eager')] + opts, launcher=launcher)
    graphed = run_main(base + ['--output', str(tmp_path / 'graph'), '--cuda-graph'] + opts, launcher=launcher)
    assert 'captured after' in graphed and 'weights differ' not in graphed + eager
    le, lg = epoch_losses(eager), epoch_losses(graphed)
    assert set(le) == set(lg) == {0, 1}
    for e in le:
        assert abs(float(le[e]) - float(lg[e])) <= 1e-4 * abs(float(le[e])), (le, lg)
