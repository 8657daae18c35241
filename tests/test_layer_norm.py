"""--fused_layernorm: forward and every gradient (x, weight, bias) against float64, odd widths and
row counts, fp32/fp16/bf16 inputs and half weights; CPU under TRITON_INTERPRET=1 and the GPU."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE
from kernels import layer_norm as ln

# (dtype, max relative error vs float64 on the same rounded inputs): statistics and sums are fp32,
# so the error is the output rounding of the dtype (2^-24, 2^-11, 2^-8) times a small factor.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
SHAPES = [(1, 96), (7, 192), (33, 100), (5, 1536), (130, 24), (3, 5, 61)]


def _rel(a, b):
    return ((a.double().cpu() - b).norm() / b.norm()).item()


@pytest.mark.parametrize('dtype', list(TOLERANCE), ids=str)
@pytest.mark.parametrize('shape', SHAPES, ids=str)
def test_forward_and_gradients(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    C = shape[-1]
    x = (torch.randn(*shape, generator=g) * 3 + 1).to(dtype)
    w = (torch.randn(C, generator=g) * 0.5 + 1).to(dtype)
    b = torch.randn(C, generator=g).to(dtype)
    dy = torch.randn(*shape, generator=g).to(dtype)
    xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
    ref = F.layer_norm(xr, (C,), wr, br, 1e-5)
    ref.backward(dy.double())
    xf, wf, bf = (t.to(DEVICE).requires_grad_() for t in (x, w, b))
    y = ln.layer_norm(xf, wf, bf, 1e-5)
    assert y.dtype == dtype
    y.backward(dy.to(DEVICE))
    tol = TOLERANCE[dtype]
    assert _rel(y, ref.detach()) < tol
    for got, want in ((xf.grad, xr.grad), (wf.grad, wr.grad), (bf.grad, br.grad)):
        assert got.dtype == dtype
        assert _rel(got, want) < tol * 2      # a sum over rows of rounded products


def test_non_contiguous_input_and_autocast_output():
    x = torch.randn(2, 24, 9, device=DEVICE).transpose(1, 2)        # B, L, C with C strided
    w, b = torch.randn(24, device=DEVICE), torch.randn(24, device=DEVICE)
    torch.testing.assert_close(ln.layer_norm(x, w, b), F.layer_norm(x, (24,), w, b), rtol=1e-5, atol=1e-5)
    dev = 'cuda' if DEVICE == 'cuda' else 'cpu'
    with torch.autocast(dev, dtype=torch.bfloat16):
        xh = x.bfloat16()
        # the reference's dtype under autocast (fp32 on CUDA, the input's on the CPU)
        assert ln.layer_norm(xh, w, b).dtype == F.layer_norm(xh, (24,), w, b).dtype


def test_weight_gradient_is_deterministic():
    x = torch.randn(300, 96, device=DEVICE)
    w, b = torch.randn(96, device=DEVICE, requires_grad=True), torch.randn(96, device=DEVICE, requires_grad=True)
    grads = []
    for _ in range(2):
        w.grad = None
        ln.layer_norm(x, w, b).sum().backward()
        grads.append(w.grad.clone())
    assert torch.equal(*grads)
