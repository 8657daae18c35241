"""--fused_mlp and --fused_dense (kernels/mlp.py, kernels/dense.py, their bias gradients in
kernels/bias_grad.py): forward and every gradient against float64 from the same rounded inputs,
over dtypes and odd shapes; CPU under TRITON_INTERPRET=1 and the GPU. Errors are relative (norm of
the difference over the norm of the reference): the unfused half-precision ops round z, GELU(z)
and dz to the dtype, and so do we."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE
from kernels import bias_grad, dense, mlp

TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
MLP_SHAPES = [((37, 20), 80), ((3, 5, 96), 384), ((130, 24), 48), ((1, 16), 64)]


def _rel(a, b):
    return ((a.double().cpu() - b).norm() / b.norm()).item()


@pytest.mark.parametrize('dtype', list(TOLERANCE), ids=str)
@pytest.mark.parametrize('shape,hidden', MLP_SHAPES, ids=str)
def test_fused_mlp_forward_and_gradients(shape, hidden, dtype):
    g = torch.Generator().manual_seed(hidden)
    C = shape[-1]
    x = torch.randn(*shape, generator=g).to(dtype)
    w1 = (torch.randn(hidden, C, generator=g) * C ** -0.5).to(dtype)
    b1 = (torch.randn(hidden, generator=g) * 0.1).to(dtype)
    w2 = (torch.randn(C, hidden, generator=g) * hidden ** -0.5).to(dtype)
    b2 = (torch.randn(C, generator=g) * 0.1).to(dtype)
    dy = torch.randn(*shape, generator=g).to(dtype)
    ref_in = [t.double().requires_grad_() for t in (x, w1, b1, w2, b2)]
    y_ref = mlp.mlp_ref(*ref_in)
    y_ref.backward(dy.double())
    ins = [t.to(DEVICE).requires_grad_() for t in (x, w1, b1, w2, b2)]
    y = mlp.fused_mlp(*ins)
    assert y.dtype == dtype and y.shape == x.shape
    y.backward(dy.to(DEVICE))
    tol = TOLERANCE[dtype]
    assert _rel(y, y_ref.detach()) < tol
    for name, got, want in zip(('x', 'w1', 'b1', 'w2', 'b2'), ins, ref_in):
        assert got.grad.dtype == dtype, name
        assert _rel(got.grad, want.grad) < 2 * tol, name


@pytest.mark.parametrize('dtype', list(TOLERANCE), ids=str)
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('rows,cin,cout', [(37, 20, 30), (2 * 49, 96, 288), (5, 64, 10)])
def test_fused_dense_forward_and_gradients(rows, cin, cout, bias, dtype):
    g = torch.Generator().manual_seed(rows + cin)
    x = torch.randn(rows, cin, generator=g).to(dtype)
    w = (torch.randn(cout, cin, generator=g) * cin ** -0.5).to(dtype)
    b = torch.randn(cout, generator=g).to(dtype) if bias else None
    dy = torch.randn(rows, cout, generator=g).to(dtype)
    ref_in = [t.double().requires_grad_() if t is not None else None for t in (x, w, b)]
    y_ref = F.linear(*ref_in)
    y_ref.backward(dy.double())
    ins = [t.to(DEVICE).requires_grad_() if t is not None else None for t in (x, w, b)]
    y = dense.fused_dense(*ins)
    y.backward(dy.to(DEVICE))
    tol = TOLERANCE[dtype]
    assert _rel(y, y_ref.detach()) < tol
    for got, want in zip(ins, ref_in):
        if got is not None:
            assert got.grad.dtype == dtype and _rel(got.grad, want.grad) < 2 * tol


def test_autocast_matches_f_linear_dtypes():
    dev = 'cuda' if DEVICE == 'cuda' else 'cpu'
    x = torch.randn(2, 7, 24, device=DEVICE)
    w1, b1 = torch.randn(48, 24, device=DEVICE, requires_grad=True), torch.randn(48, device=DEVICE)
    w2, b2 = torch.randn(24, 48, device=DEVICE), torch.randn(24, device=DEVICE)
    with torch.autocast(dev, dtype=torch.bfloat16):
        got, want = mlp.fused_mlp(x, w1, b1, w2, b2), mlp.mlp_ref(x, w1, b1, w2, b2)
        assert got.dtype == want.dtype == torch.bfloat16
        assert dense.fused_dense(x, w1, b1).dtype == torch.bfloat16
    got.float().sum().backward()
    assert w1.grad.dtype == torch.float32         # fp32 weights get fp32 gradients, as with F.linear
    assert _rel(got.detach().float(), want.detach().double().cpu()) < TOLERANCE[torch.bfloat16]


# M x N: one band and a column tail (37 x 20); several bands with a short last one and two column
# blocks, the second a tail (1000 x 300: blocks of 256 columns x 16 rows); a whole number of
# everything (64 x 256); no rows (0 x 24)
BIAS_SHAPES = [(37, 20), (1000, 300), (64, 256), (0, 24)]


@pytest.mark.parametrize('dtype', list(TOLERANCE), ids=str)
@pytest.mark.parametrize('shape', BIAS_SHAPES, ids=str)
def test_bias_gradients_against_float64(shape, dtype):
    """db = column sums of dy; with GELU's input z, dz = dy * gelu'(z) rounded to the dtype and its
    column sums. Relative to float64 from the same rounded inputs; run twice, bit-identical."""
    g = torch.Generator().manual_seed(shape[0] + shape[1])
    dy = torch.randn(*shape, generator=g).to(dtype)
    z = (torch.randn(*shape, generator=g) * 2).to(dtype)
    want_dz = torch.ops.aten.gelu_backward(dy.double(), z.double())
    db = bias_grad.bias_grad(dy.to(DEVICE))
    dz, db1 = bias_grad.bias_grad(dy.to(DEVICE), z.to(DEVICE))
    assert db.dtype == dz.dtype == db1.dtype == dtype and db.shape == db1.shape == (shape[1],)
    if shape[0] == 0:
        assert not db.any() and not db1.any() and dz.shape == shape
        return
    tol = TOLERANCE[dtype]
    assert _rel(db, dy.double().sum(0)) < tol
    assert _rel(dz, want_dz) < tol
    # db1 sums the dz this op stored (as torch sums its stored dz), to fp32 rounding of that sum
    assert _rel(db1, dz.double().cpu().sum(0)) < max(tol, 1e-6)
    assert _rel(db1, want_dz.sum(0)) < 2 * tol
    again = bias_grad.bias_grad(dy.to(DEVICE), z.to(DEVICE))
    assert torch.equal(again[0], dz) and torch.equal(again[1], db1)
    assert torch.equal(bias_grad.bias_grad(dy.to(DEVICE)), db)


def test_mlp_dropout_with_fused_mlp_is_rejected():
    from models.swin_transformer import SwinTransformer
    with pytest.raises(ValueError, match='--fused_mlp needs MLP dropout 0'):
        SwinTransformer(img_size=32, patch_size=2, embed_dim=32, depths=(2,), num_heads=(2,), window_size=4,
                        drop_rate=0.1, fused_mlp=True, kernel_backend='triton')
