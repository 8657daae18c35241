"""Fused AdamW / LAMB (kernels/optimizers.py) against torch.optim.AdamW and timm's Lamb.

Both backends: 'triton' (the real kernels; on the CPU under TRITON_INTERPRET=1) and 'torch' (the
reference). Tolerance: every parameter within 1e-6 of the reference relative to the tensor's
largest magnitude, after 20+ steps with two weight-decay groups, clipping, accumulation and a
changing learning rate. (Element-wise relative error is meaningless for weights near zero: one
ulp of a 1e-3 update is 1e-10 absolute.)
"""
import copy

import pytest
import torch
from timm.optim import Lamb

from amp import Precision
from conftest import DEVICE
from kernels.optimizers import FusedAdamW, FusedLAMB
from optimizer import build_optimizer, param_groups
from kernels._utils import apex_available

BACKENDS = ['torch', 'triton']
STEPS = 20


class Tiny(torch.nn.Module):
    """Odd sizes, a 1-D parameter group without decay, and a scalar parameter."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(13, 37)
        self.norm = torch.nn.LayerNorm(37)
        self.fc2 = torch.nn.Linear(37, 5)
        self.gain = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.norm(self.fc1(x)))) * self.gain


def _assert_params_close(ref, got, rtol=1e-6):
    for (name, a), b in zip(ref.named_parameters(), got.parameters()):
        scale = a.detach().abs().max().item()
        torch.testing.assert_close(b.detach().float(), a.detach().float(), rtol=rtol, atol=rtol * scale,
                                   msg=lambda m: f'{name}: {m}')


def _train(model, opt, precision, master, steps=STEPS, accum=2, clip=1.0, inf_at=None, g=None):
    """`steps` updates of `accum` micro-batches each; the LR changes every update. The loss is
    sum(p * G) with random G per micro-batch, so the gradients are given (accumulated by autograd,
    scaled, clipped) and do not depend on the weights: through a real forward, float rounding
    differences would feed back and grow, and the test would measure the model, not the optimizer."""
    g = g if g is not None else torch.Generator().manual_seed(0)
    norms = []
    for step in range(steps):
        for _ in range(accum):
            loss = sum((p.float() * torch.randn(p.shape, generator=g).to(DEVICE)).sum() for p in model.parameters())
            precision.backward(loss / accum)
        if step == inf_at:
            model.fc1.weight.grad[0, 0] = float('inf')
        norms.append(float(precision.step(opt, master.parameters(), clip)))
        precision.zero_grad(opt, model)
        for group in opt.param_groups:
            group['lr'] *= 0.93
    return norms


class Wide(torch.nn.Module):
    """A weight of three full 16384-element chunks plus a tail (the kernels' per-tensor chunking,
    norm partials summed across chunks), beside small tensors."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(211, 241)       # 50851 weights: 3 chunks + 1699
        self.fc2 = torch.nn.Linear(241, 3)

    def forward(self, x):
        return self.fc2(self.fc1(x))


def _pair(level='O0', dtype='float16', module=Tiny):
    torch.manual_seed(0)
    base = module().to(DEVICE)
    out = []
    for _ in range(2):
        precision = Precision(level, dtype, torch.device(DEVICE))
        model, master = precision.prepare(copy.deepcopy(base))
        out.append((precision, model, master))
    return out


@pytest.mark.parametrize('backend', BACKENDS)
def test_fused_adamw_matches_torch_adamw(backend):
    (p_ref, m_ref, w_ref), (p_fused, m_fused, w_fused) = _pair()
    ref = torch.optim.AdamW(param_groups(w_ref, 0.05), lr=3e-2, betas=(0.9, 0.999), eps=1e-8)
    fused = FusedAdamW(param_groups(w_fused, 0.05), lr=3e-2, betas=(0.9, 0.999), eps=1e-8, backend=backend)
    n_ref = _train(m_ref, ref, p_ref, w_ref)
    n_fused = _train(m_fused, fused, p_fused, w_fused)
    _assert_params_close(w_ref, w_fused)
    torch.testing.assert_close(n_fused, n_ref, rtol=1e-5, atol=0)
    assert min(n_ref) > 1.0, 'the clip must be active'
    st, sr = fused.state_dict()['state'], ref.state_dict()['state']   # torch's state, step counts included
    assert st.keys() == sr.keys()
    for k in st:
        assert float(st[k]['step']) == float(sr[k]['step']) == STEPS
        torch.testing.assert_close(st[k]['exp_avg'], sr[k]['exp_avg'], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('backend', BACKENDS)
def test_fused_lamb_matches_timm_lamb(backend):
    (p_ref, m_ref, w_ref), (p_fused, m_fused, w_fused) = _pair()
    ref = Lamb(param_groups(w_ref, 0.05), lr=2e-2, eps=1e-8, max_grad_norm=1.0)
    fused = FusedLAMB(param_groups(w_fused, 0.05), lr=2e-2, eps=1e-8, max_grad_norm=1.0, backend=backend)
    _train(m_ref, ref, p_ref, w_ref, clip=5.0)
    _train(m_fused, fused, p_fused, w_fused, clip=5.0)
    _assert_params_close(w_ref, w_fused)
    assert [float(g['step']) for g in fused.state_dict()['param_groups']] == [STEPS, STEPS]


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
def test_o2_one_pass_matches_master_update_then_copy(backend, dtype):
    """O2: the fused step reads the half grads and writes master, moments and half weights in
    one pass; the unfused path copies grads to fp32, steps torch's AdamW and copies back. With
    fp16 overflowing steps and an inf gradient at step 3 are skipped in both, with the same scale."""
    (p_ref, m_ref, w_ref), (p_fused, m_fused, w_fused) = _pair('O2', dtype)
    ref = torch.optim.AdamW(param_groups(w_ref, 0.05), lr=1e-2)
    fused = FusedAdamW(param_groups(w_fused, 0.05), lr=1e-2, backend=backend)
    inf_at = 3 if dtype == 'float16' else None
    _train(m_ref, ref, p_ref, w_ref, steps=8, inf_at=inf_at)
    _train(m_fused, fused, p_fused, w_fused, steps=8, inf_at=inf_at)
    _assert_params_close(w_ref, w_fused, rtol=1e-6)
    for a, b in zip(m_ref.parameters(), m_fused.parameters()):   # the half weights: at most one ulp apart
        assert a.dtype == b.dtype == p_ref.dtype
        torch.testing.assert_close(b, a, rtol=1e-2 if dtype == 'bfloat16' else 1e-3, atol=1e-5)
    assert all(p.grad is None for p in w_fused.parameters()), 'the fused O2 path needs no fp32 grads'
    assert p_fused.get_scale() == p_ref.get_scale()
    taken = float(ref.state_dict()['state'][0]['step'])
    assert fused.steps() == [taken] * len(fused.steps())
    if inf_at is not None:        # the initial scale 2^16 overflows too: at least two skips
        assert taken <= 6 and p_fused.get_scale() < 65536.0
    else:
        assert taken == 8


@pytest.mark.parametrize('level', ['O0', 'O2'])
@pytest.mark.parametrize('name', ['adamw', 'lamb'])
def test_multi_chunk_tensors_match_references(name, level):
    """The Triton kernels on tensors that span several chunks and blocks, O0 (fp32) and O2 (bf16
    weights, fp32 master), against torch's AdamW / timm's Lamb on the fp32 master path."""
    from kernels.optimizers import CHUNK
    assert Wide().fc1.weight.numel() > 3 * CHUNK
    (p_ref, m_ref, w_ref), (p_fused, m_fused, w_fused) = _pair(level, 'bfloat16', module=Wide)
    if name == 'adamw':
        ref = torch.optim.AdamW(param_groups(w_ref, 0.05), lr=1e-2)
        fused = FusedAdamW(param_groups(w_fused, 0.05), lr=1e-2, backend='triton')
    else:
        ref = Lamb(param_groups(w_ref, 0.05), lr=1e-2, eps=1e-8, max_grad_norm=1.0)
        fused = FusedLAMB(param_groups(w_fused, 0.05), lr=1e-2, eps=1e-8, max_grad_norm=1.0, backend='triton')
    _train(m_ref, ref, p_ref, w_ref, steps=4, clip=5.0)
    _train(m_fused, fused, p_fused, w_fused, steps=4, clip=5.0)
    _assert_params_close(w_ref, w_fused, rtol=1e-6)


@pytest.mark.parametrize('backend', BACKENDS)
def test_state_dict_moves_between_torch_and_fused(backend):
    """A checkpoint of torch's AdamW resumes under fused_adam (and back) on the same trajectory."""
    (p_a, m_a, w_a), (p_b, m_b, w_b) = _pair()
    straight = torch.optim.AdamW(param_groups(w_a, 0.05), lr=3e-2)
    _train(m_a, straight, p_a, w_a, steps=6)
    first = torch.optim.AdamW(param_groups(w_b, 0.05), lr=3e-2)
    data = torch.Generator().manual_seed(0)
    _train(m_b, first, p_b, w_b, steps=3, g=data)
    fused = FusedAdamW(param_groups(w_b, 0.05), lr=1.0, backend=backend)
    fused.load_state_dict(first.state_dict())        # LR, moments and step counts come along
    _train(m_b, fused, p_b, w_b, steps=3, g=data)
    back = torch.optim.AdamW(param_groups(w_b, 0.05), lr=3e-2)
    back.load_state_dict(fused.state_dict())
    assert float(back.state_dict()['state'][0]['step']) == 6
    _assert_params_close(w_a, w_b)


def _config(name, backend):
    from config import _C
    cfg = _C.clone()
    cfg.TRAIN.OPTIMIZER.NAME = name
    cfg.KERNEL_BACKEND = backend
    return cfg


@pytest.mark.parametrize('name,cls', [('fused_adam', FusedAdamW), ('fused_lamb', FusedLAMB)])
def test_build_optimizer_picks_the_backend(name, cls):
    model = Tiny().to(DEVICE)
    auto = build_optimizer(_config(name, 'auto'), model)
    assert isinstance(auto, cls) and auto.backend == ('triton' if DEVICE == 'cuda' else 'torch')
    assert build_optimizer(_config(name, 'triton'), model).backend == 'triton'
    assert build_optimizer(_config(name, 'torch'), model).backend == 'torch'
    assert [g['weight_decay'] for g in auto.param_groups] == [0.05, 0.0]


@pytest.mark.skipif(apex_available('apex.optimizers'), reason='apex is installed here')
def test_apex_backend_without_apex_is_a_clear_error():
    with pytest.raises(RuntimeError, match='apex.optimizers.*not importable.*KERNEL_BACKEND auto'):
        build_optimizer(_config('fused_adam', 'apex'), Tiny())


@pytest.mark.skipif(not (apex_available('apex.optimizers') and torch.cuda.is_available()),
                    reason='needs apex with its CUDA extensions and a GPU')
@pytest.mark.parametrize('name', ['fused_adam', 'fused_lamb'])
def test_apex_optimizers_match_ours(name):
    (p_a, m_a, w_a), (p_b, m_b, w_b) = _pair()
    apex_opt = build_optimizer(_config(name, 'apex'), w_a)
    assert type(apex_opt).__module__.startswith('apex')
    ours = build_optimizer(_config(name, 'triton'), w_b)
    _train(m_a, apex_opt, p_a, w_a, steps=10, clip=5.0)
    _train(m_b, ours, p_b, w_b, steps=10, clip=5.0)
    _assert_params_close(w_a, w_b, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_fused_step_never_syncs_the_host():
    model = Tiny().cuda()
    opt = FusedAdamW(param_groups(model, 0.05), lr=1e-3)
    precision = Precision('O1', 'float16', torch.device('cuda'))
    for step in range(3):   # the first step builds the launch tables (and may sync); later ones reuse them
        with precision.autocast():
            loss = model(torch.randn(8, 13, device='cuda')).float().sum()
        precision.backward(loss)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode('error' if step else 'default')
        try:
            precision.step(opt, model.parameters(), 5.0)
        finally:
            torch.cuda.set_sync_debug_mode('default')
        precision.zero_grad(opt, model)


def _plain_steps(backend, steps, no_grad=lambda name, step: False):
    """Plain optimizer.step() on two copies of Tiny: torch's AdamW and ours, the same random
    gradients (none where no_grad(name, step)). -> (ref model, fused model, ref opt, fused opt)."""
    torch.manual_seed(0)
    a, b = Tiny().to(DEVICE), Tiny().to(DEVICE)
    b.load_state_dict(a.state_dict())
    ref = torch.optim.AdamW(param_groups(a, 0.05), lr=1e-2)
    fused = FusedAdamW(param_groups(b, 0.05), lr=1e-2, backend=backend)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            if no_grad(name, step):
                pa.grad = pb.grad = None
                continue
            pa.grad = torch.randn(pa.shape, generator=g).to(DEVICE)
            pb.grad = pa.grad.clone()
        ref.step()
        fused.step()
    return a, b, ref, fused


@pytest.mark.parametrize('backend', BACKENDS)
def test_plain_step_without_clip_or_scale(backend):
    """optimizer.step() as a drop-in torch optimizer: no scale, no clip (and no gradient pass)."""
    a, b, _, _ = _plain_steps(backend, STEPS)
    _assert_params_close(a, b)


@pytest.mark.parametrize('backend', BACKENDS)
def test_parameters_without_a_gradient_are_skipped_like_torch(backend):
    """A parameter whose .grad is None in a step is not updated and its step count does not advance
    (torch's rule); the launch tables are rebuilt for the live subset and back."""
    # fc2 gets no gradient now and then
    a, b, ref, fused = _plain_steps(backend, 8, lambda name, step: name.startswith('fc2') and step % 3 == 1)
    _assert_params_close(a, b)
    want = [float(ref.state[p]['step']) for p in ref.param_groups[0]['params'] + ref.param_groups[1]['params']]
    assert fused.steps() == want and min(want) < max(want)


@pytest.mark.parametrize('backend', BACKENDS)
def test_lamb_o2_and_resume_from_timm_state(backend):
    """FusedLAMB at O2 (one pass into the bf16 model) against timm's Lamb stepping the fp32 masters,
    continued from a state dict that timm's Lamb wrote."""
    (p_ref, m_ref, w_ref), (p_fused, m_fused, w_fused) = _pair('O2', 'bfloat16')
    ref = Lamb(param_groups(w_ref, 0.05), lr=2e-2, eps=1e-8)
    data = torch.Generator().manual_seed(0)
    _train(m_ref, ref, p_ref, w_ref, steps=3, clip=5.0, g=data)
    first = Lamb(param_groups(w_fused, 0.05), lr=2e-2, eps=1e-8)
    data_b = torch.Generator().manual_seed(0)
    _train(m_fused, first, p_fused, w_fused, steps=3, clip=5.0, g=data_b)
    fused = FusedLAMB(param_groups(w_fused, 0.05), lr=1.0, eps=1e-8, backend=backend)
    fused.load_state_dict(first.state_dict())
    _train(m_ref, ref, p_ref, w_ref, steps=5, clip=5.0, g=data)
    _train(m_fused, fused, p_fused, w_fused, steps=5, clip=5.0, g=data_b)
    _assert_params_close(w_ref, w_fused, rtol=1e-6)
    assert fused.steps() == [8.0] * len(fused.steps())


def test_add_param_group_after_construction_is_refused():
    opt = FusedAdamW(Tiny().parameters(), backend='torch')
    with pytest.raises(RuntimeError, match='add_param_group afterwards is not supported'):
        opt.add_param_group({'params': [torch.nn.Parameter(torch.zeros(3))]})
