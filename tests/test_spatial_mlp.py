"""Swin-MLP's fused window spatial MLP (kernels/spatial_mlp.py, --fused_window_process on swin_mlp):
forward and every gradient (input, weight, bias) against upstream's ops in float64, on windows 4, 7
and 8, unshifted and shifted (asymmetric padding), square and non-square maps, head widths that fill
and that do not fill the kernel's tiles, runs of windows with a tail; CPU under TRITON_INTERPRET=1
and the GPU. Also: autocast as Conv1d, no bias, an empty batch, determinism, the errors."""
import pytest
import torch

from conftest import DEVICE
from kernels import spatial_mlp as sm

# (dtype, max relative error ||got - ref|| / ||ref||) against float64 on the same (rounded) inputs.
# fp32 multiplies in IEEE fp32 (measured ~2e-7); the half types round the output and dx once from fp32
# accumulators (about 2**-9 / 2**-12 relative) and the partial sums of dW / db once into the
# weight's dtype.
TOLERANCE = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

# (batch, H, W, heads, head width, window, shift): window 4 fills the token tile (16), 7 leaves
# 15 of 64 rows masked, 8 fills 64; head widths 6 and 12 leave lanes of the 16-wide tile masked,
# 24 of the 32-wide one, 32 fills it; shift 1 pads 3 before and 1 after.
CASES = [
    (2, 8, 8, 2, 16, 4, 0),
    (3, 8, 12, 2, 6, 4, 1),
    (2, 14, 7, 3, 12, 7, 3),
    (1, 16, 8, 4, 24, 8, 4),
    (2, 8, 8, 1, 32, 8, 0),
    (5, 4, 8, 2, 8, 4, 2),
]


def _inputs(case, seed):
    B, H, W, heads, d, w, _ = case
    g = torch.Generator().manual_seed(seed)
    N = w * w
    x = torch.randn(B, H, W, heads * d, generator=g, dtype=torch.float64)
    weight = torch.randn(heads * N, N, 1, generator=g, dtype=torch.float64) / N ** 0.5
    bias = torch.randn(heads * N, generator=g, dtype=torch.float64)
    dy = torch.randn(B, H, W, heads * d, generator=g, dtype=torch.float64)
    return x, weight, bias, dy


def _rel(a, b):
    return ((a.detach().double().cpu() - b).norm() / b.norm()).item()


def _reference(x, weight, bias, dy, heads, w, s):
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = sm.spatial_mlp_ref(*leaves, heads, w, s)
    out.backward(dy)
    return out.detach(), [t.grad for t in leaves]


def test_cases_reach_every_tail():
    """The windows of each case against the launch: a forward run and a backward group that end
    past the last window occur (their masked programs are exercised)."""
    tails = set()
    for B, H, W, heads, d, w, s in CASES:
        n_win = sm._geometry(H, W, heads * d, w, s, heads)[0] * B
        groups = max(1, min(n_win, -(-sm.BWD_PROGRAMS_PER_SM * 2 // heads)))    # 2 SMs on the CPU
        per_group = -(-n_win // groups)
        tails.add(('fwd', n_win % sm.FWD_WINDOWS != 0))
        tails.add(('bwd', n_win % per_group != 0 and per_group > 1))
    assert ('fwd', True) in tails and ('bwd', True) in tails


@pytest.mark.parametrize('dtype', list(TOLERANCE), ids=str)
@pytest.mark.parametrize('case', CASES, ids=str)
def test_forward_and_gradients_match_float64_reference(case, dtype):
    B, H, W, heads, d, w, s = case
    x, weight, bias, dy = _inputs(case, seed=sum(case))
    # the reference sees the inputs rounded as the fused op sees them
    x, weight, bias, dy = (t.to(dtype).double() for t in (x, weight, bias, dy))
    ref, ref_grads = _reference(x, weight, bias, dy, heads, w, s)
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in (x, weight, bias)]
    out = sm.spatial_mlp(*leaves, heads, w, s)
    assert out.dtype == dtype and out.shape == ref.shape
    out.backward(dy.to(DEVICE, dtype))
    tol = TOLERANCE[dtype]
    assert _rel(out, ref) < tol
    for leaf, want, name in zip(leaves, ref_grads, ('x', 'weight', 'bias')):
        assert leaf.grad.dtype == dtype, name
        assert _rel(leaf.grad, want) < tol, name


def test_without_bias():
    case = CASES[1]
    B, H, W, heads, d, w, s = case
    x, weight, _, dy = _inputs(case, seed=1)
    xl, wl = x.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = sm.spatial_mlp_ref(xl, wl, None, heads, w, s)
    ref.backward(dy)
    fx, fw = x.to(DEVICE, torch.float32).requires_grad_(), weight.to(DEVICE, torch.float32).requires_grad_()
    out = sm.spatial_mlp(fx, fw, None, heads, w, s)
    out.backward(dy.to(DEVICE, torch.float32))
    assert _rel(out, ref.detach()) < 2e-6 and _rel(fx.grad, xl.grad) < 2e-6 and _rel(fw.grad, wl.grad) < 2e-6


def test_autocast_as_conv1d():
    """Under autocast (fp32 weights, fp32 map from the LayerNorm) the op computes in the autocast
    dtype as F.conv1d does there, and the fp32 parameters get fp32 gradients."""
    dev = torch.device(DEVICE)
    case = CASES[2]
    B, H, W, heads, d, w, s = case
    x, weight, bias, dy = (t.float().to(dev) for t in _inputs(case, seed=2))
    got, want = [], []
    for fn, sink in ((sm.spatial_mlp, got), (sm.spatial_mlp_ref, want)):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            out = fn(*leaves, heads, w, s)
        out.float().backward(dy)
        sink += [out] + [t.grad for t in leaves]
    assert got[0].dtype == want[0].dtype == torch.bfloat16
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        assert _rel(a, b.double().cpu()) < 1.5e-2


def test_empty_batch():
    x = torch.zeros(0, 8, 8, 32, device=DEVICE, requires_grad=True)
    weight = torch.randn(2 * 16, 16, 1, device=DEVICE, requires_grad=True)
    bias = torch.randn(2 * 16, device=DEVICE, requires_grad=True)
    out = sm.spatial_mlp(x, weight, bias, 2, 4, 2)
    assert out.shape == x.shape
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))


def test_gradients_are_deterministic():
    case = CASES[3]
    B, H, W, heads, d, w, s = case
    x, weight, bias, dy = (t.to(DEVICE, torch.bfloat16) for t in _inputs(case, seed=3))
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        sm.spatial_mlp(*leaves, heads, w, s).backward(dy)
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_errors_name_the_problem():
    x = torch.randn(1, 8, 8, 16, device=DEVICE)
    weight = torch.randn(2 * 16, 16, 1, device=DEVICE)
    with pytest.raises(ValueError, match='expected'):
        sm.spatial_mlp(x, weight[:16], None, 2, 4, 0)
    with pytest.raises(TypeError, match='differ'):
        sm.spatial_mlp(x, weight.double(), None, 2, 4, 0)
    with pytest.raises(ValueError, match='not a multiple of the window'):
        sm.spatial_mlp(torch.randn(1, 6, 8, 16, device=DEVICE), weight, None, 2, 4, 0)
    with pytest.raises(ValueError, match='heads'):
        sm.spatial_mlp(torch.randn(1, 8, 8, 15, device=DEVICE), torch.randn(2 * 16, 16, 1, device=DEVICE),
                       None, 2, 4, 0)

