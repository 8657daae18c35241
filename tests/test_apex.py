"""KERNEL_BACKEND apex: apex's ops where apex has one with upstream's math, ours where it has none.

Without apex (the CPU machines): choosing apex fails at model build with an error naming the flag
and the fix, the stand-ins are ours and the log says why, and optimizer checkpoints convert
between the step layouts. With apex built (`python build_apex.py`, run by
`benchmarks/run_all.sh apex` on the GPU): each apex-backed flag against the reference model
(logits and every gradient, fp32 and bf16 autocast), apex's optimizers against ours, checkpoints
moving between apex's optimizers and ours mid-run, and main.py with each apex flag and all at O2.
"""
import logging
import os

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels._utils import apex_available, triton_interpret
from kernels.optimizers import FusedAdamW, FusedLAMB
from optimizer import adapt_optimizer_state

APEX = apex_available('apex.normalization') and apex_available('apex.fused_dense') and \
    apex_available('apex.optimizers') and torch.cuda.is_available()
needs_apex = pytest.mark.skipif(not APEX, reason='needs apex built with its CUDA extensions (build_apex.py) and a GPU')


@pytest.mark.skipif(apex_available('apex.normalization'), reason='apex is installed here')
def test_apex_layer_norm_without_apex_is_a_clear_error():
    with pytest.raises(kernels.KernelUnavailable, match='--fused_layernorm.*apex.normalization.*build_apex.py'):
        kernels.build_ops(layer_norm=True, backend='apex')


@pytest.mark.skipif(apex_available('apex.fused_dense'), reason='apex is installed here')
def test_apex_dense_without_apex_is_a_clear_error():
    with pytest.raises(kernels.KernelUnavailable, match='--fused_dense.*apex.fused_dense'):
        kernels.build_ops(dense=True, backend='apex')


def test_apex_backend_uses_ours_where_apex_has_no_op_and_says_why(caplog):
    """apex has no window ops and no residual-add norm, and its fused MLP has the tanh GELU: ours
    stand in (never an error), and the log names the reason."""
    with caplog.at_level(logging.INFO, logger='kernels'):
        ops = kernels.build_ops(window_process=True, window_attention=True, mlp=True, backend='apex')
    ours = 'triton' if torch.cuda.is_available() or triton_interpret() else 'torch'
    assert dict(ops.chosen) == {'window_process': ours, 'window_attention': ours, 'mlp': ours}
    assert 'tanh GELU' in caplog.text and 'window attention' in caplog.text and 'stands in' in caplog.text


def test_optimizer_state_moves_between_step_layouts():
    """torch's AdamW (and ours) count steps per parameter, apex's FusedAdam and the LAMBs per group.
    A state converted to the per-group layout and back resumes AdamW exactly."""
    import timm.optim
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    groups = lambda: [{'params': [params[0]], 'weight_decay': 0.05}, {'params': [params[1]], 'weight_decay': 0.}]  # noqa: E731
    grads = [[torch.randn_like(p) for p in params] for _ in range(6)]

    def run(opt, steps):
        for g in steps:
            for p, gp in zip(params, g):
                p.grad = gp.clone()
            opt.step()

    start = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(groups(), lr=1e-2)
    run(opt, grads)
    uninterrupted = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    opt = torch.optim.AdamW(groups(), lr=1e-2)
    run(opt, grads[:3])
    per_group = adapt_optimizer_state(timm.optim.Lamb(groups(), lr=1e-2), opt.state_dict())
    assert [g['step'] for g in per_group['param_groups']] == [3, 3]
    assert all('step' not in s for s in per_group['state'].values())
    assert {'exp_avg', 'exp_avg_sq'} <= set(per_group['state'][0])
    resumed = torch.optim.AdamW(groups(), lr=1e-2)
    back = adapt_optimizer_state(resumed, per_group)
    assert all(float(s['step']) == 3 and 'step' not in g for s in back['state'].values() for g in back['param_groups'])
    resumed.load_state_dict(back)
    run(resumed, grads[3:])
    for p, u in zip(params, uninterrupted):
        assert torch.equal(p.detach(), u)


# ----------------------------------------------------------------------------- with apex on the GPU
SMALL = dict(img_size=64, patch_size=4, embed_dim=48, depths=(2, 2), num_heads=(3, 6), window_size=4,
             num_classes=10, drop_path_rate=0.0)
APEX_FLAGS = [['fused_layernorm'], ['fused_dense'], ['fused_layernorm', 'fused_dense'],
              ['fused_window_process', 'fused_attention', 'fused_layernorm', 'fused_mlp', 'fused_dense']]
# (dtype, logits rtol, gradients rtol, atol): fp32 elementwise, exact up to summation order; under
# bf16 autocast both sides round GEMM outputs to bf16 in different places: norm-wise relative errors
TOLERANCES = {None: (1e-5, 1e-4, 1e-5), torch.bfloat16: (1e-2, 3e-2, None)}


@needs_apex
@pytest.mark.parametrize('autocast', list(TOLERANCES), ids=['fp32', 'bf16 autocast'])
@pytest.mark.parametrize('flags', APEX_FLAGS, ids=lambda f: '+'.join(f))
def test_apex_flags_equal_reference_model(flags, autocast):
    from models.swin_transformer import SwinTransformer
    from test_fused_model import assert_flags_match_reference
    model = SwinTransformer(**SMALL, **{f: True for f in flags}, kernel_backend='apex').cuda()
    chosen = dict(model.ops.chosen)
    assert chosen.get('layer_norm', 'apex') == 'apex' and chosen.get('dense', 'apex') == 'apex'
    assert all(b == 'triton' for op, b in chosen.items() if op not in ('layer_norm', 'dense'))
    explain = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64, device='cuda'))
    assert explain.graph_break_count == 0, explain.break_reasons     # apex's ops are custom ops too
    rl, rg, atol = TOLERANCES[autocast]
    assert_flags_match_reference(SwinTransformer, SMALL, flags, lambda n, p: p.ndim == 1 or 'table' in n,
                                 x_shape=(4, 3, 64, 64), rtol=(rl, rg), atol=atol or 0., backend='apex',
                                 autocast=autocast)


@needs_apex
def test_auto_takes_apex_dense_where_apex_is_importable():
    """apex's dense measured faster than ours at Swin's shapes: auto picks it; triton stays ours."""
    assert kernels.get_impl('dense', 'auto')[0] == 'apex'
    assert kernels.get_impl('dense', 'triton')[0] == 'triton'
    assert kernels.get_impl('layer_norm', 'auto')[0] == 'triton'


@needs_apex
def test_apex_layer_norm_keeps_f_layer_norm_dtypes():
    """Under autocast F.layer_norm returns fp32 (it is on autocast's fp32 list); so does the apex
    path (apex's own wrapper would return bf16)."""
    _, impl = kernels.get_impl('layer_norm', 'apex')
    x = torch.randn(64, 96, device='cuda', requires_grad=True)
    w = torch.randn(96, device='cuda', requires_grad=True)
    b = torch.randn(96, device='cuda', requires_grad=True)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast('cuda', dtype=dtype):
            ref, got = F.layer_norm(x.to(dtype), (96,), w, b), impl(x.to(dtype), w, b)
        assert got.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    half = torch.randn(64, 96, device='cuda', dtype=torch.bfloat16)
    assert impl(half, w.bfloat16(), b.bfloat16()).dtype == torch.bfloat16      # O2/O3: no autocast


def _train(opt_cls_or_fn, params, grads):
    opt = opt_cls_or_fn(params)
    for g in grads:
        for p, gp in zip(params, g):
            p.grad = gp.clone()
        opt.step()
    return opt


def _params(seed=0):
    torch.manual_seed(seed)
    # multi-chunk sizes for the fused kernels (our chunk is 16384 elements), and odd tails
    return [torch.nn.Parameter(torch.randn(*s, device='cuda')) for s in ((300, 129), (40000,), (7,))]


@needs_apex
@pytest.mark.parametrize('name', ['fused_adam', 'fused_lamb'])
def test_apex_optimizers_equal_ours_and_checkpoints_move_between_them(name):
    """apex's FusedAdam/FusedLAMB against ours over 6 steps, and a checkpoint saved by either after 3
    steps resumed by the other: the same weights as the uninterrupted run."""
    from kernels.optimizers import build_apex_optimizer
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    ours = (lambda ps: FusedAdamW(ps, **kw)) if name == 'fused_adam' else (lambda ps: FusedLAMB(ps, **kw))
    apex = lambda ps: build_apex_optimizer(name, [{'params': ps}], **kw)   # noqa: E731
    grads = [[torch.randn_like(p) for p in _params()] for _ in range(6)]
    finals = {}
    for label, first, second in (('apex', apex, apex), ('ours', ours, ours), ('apex->ours', apex, ours),
                                 ('ours->apex', ours, apex)):
        params = _params()
        state = _train(first, params, grads[:3]).state_dict()
        resumed = second(params)
        resumed.load_state_dict(adapt_optimizer_state(resumed, state))
        for g in grads[3:]:
            for p, gp in zip(params, g):
                p.grad = gp.clone()
            resumed.step()
        finals[label] = [p.detach().clone() for p in params]
    for label in ('ours', 'apex->ours', 'ours->apex'):
        for a, b in zip(finals[label], finals['apex']):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=label)


RUNS = [['--fused_layernorm'], ['--fused_dense'], ['--fused_adam'],
        ['--fused_layernorm', '--fused_dense', '--fused_adam', '--fused_window_process', '--unfused_mha',
         '--fused_mlp', '--amp-opt-level', 'O2']]


@needs_apex
def test_main_with_apex_backend_and_resume_on_ours(demo_data, tmp_path):
    """main.py --kernel-backend apex with each apex-backed flag, and all flags at O2 (apex where it
    has the op); then that run's checkpoint resumed on our kernels and optimizer."""
    from test_train import DEMO_CFG, FAST, epoch_losses, run_main
    base = ['--cfg', DEMO_CFG, '--data-path', demo_data]
    for i, flags in enumerate(RUNS):
        out = run_main(base + ['--output', str(tmp_path / str(i)), '--kernel-backend', 'apex'] + flags +
                       ['--opts', 'TRAIN.EPOCHS', '1'] + FAST)
        if '--fused_mlp' in flags:
            assert 'tanh GELU' in out and 'mlp=triton' in out, out[-2000:]
        losses = epoch_losses(out)
        assert set(losses) == {0} and float(losses[0]) == float(losses[0])    # finite
        if '--fused_layernorm' in flags:
            assert 'layer_norm=apex' in out, out[-2000:]
        if '--fused_dense' in flags:
            assert 'dense=apex' in out, out[-2000:]
    run_dir = tmp_path / str(len(RUNS) - 1) / 'swin_micro_shapes10' / 'default'
    out = run_main(base + ['--output', str(tmp_path / str(len(RUNS) - 1)), '--kernel-backend', 'triton',
                           '--fused_layernorm', '--fused_dense', '--fused_adam', '--amp-opt-level', 'O2',
                           '--resume', str(run_dir / 'ckpt_epoch_0.pth'), '--opts', 'TRAIN.EPOCHS', '2'] + FAST)
    assert set(epoch_losses(out)) == {1}, out[-2000:]
    assert os.path.exists(run_dir / 'ckpt_epoch_1.pth')


def test_build_helper_names_what_is_missing(tmp_path):
    """build_apex.py checks before building: an apex checkout, a CUDA torch, nvcc of torch's CUDA
    version, ninja; each missing piece is one line naming the fix."""
    import build_apex
    with pytest.raises(build_apex.BuildError, match='not an apex source checkout'):
        build_apex.check_prerequisites(str(tmp_path), '9.0', '')
    src = tmp_path / 'apex_src'
    (src / 'apex').mkdir(parents=True)
    (src / 'setup.py').write_text('')
    if torch.version.cuda is None:
        with pytest.raises(build_apex.BuildError, match='CPU build'):
            build_apex.check_prerequisites(str(src), '9.0', '')
        return
    with pytest.raises(build_apex.BuildError, match='nvcc was not found'):
        build_apex.check_prerequisites(str(src), '9.0', str(tmp_path / 'no_cuda'))
    other = '11.8' if not torch.version.cuda.startswith('11.8') else '12.4'
    nvcc = tmp_path / 'cuda' / 'bin' / 'nvcc'      # a toolkit of another CUDA version
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f'#!/bin/sh\necho "Cuda compilation tools, release {other}, V{other}.89"\n')
    nvcc.chmod(0o755)
    with pytest.raises(build_apex.BuildError, match=f'nvcc is CUDA {other}.*torch was built with CUDA'):
        build_apex.check_prerequisites(str(src), '9.0', str(tmp_path / 'cuda'))
    assert build_apex.main([str(tmp_path)]) == 2
