"""--fused_mlp and --fused_dense (kernels/mlp.py, kernels/dense.py on kernels/gemm.py): forward and
every gradient against float64 from the same rounded inputs, over dtypes and odd shapes; CPU
under TRITON_INTERPRET=1 and the GPU. Errors are relative (norm of the difference over the norm
of the reference): the unfused half-precision ops round z and GELU(z) to the dtype, and so do we."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE
from kernels import dense, gemm, mlp

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


def test_split_k_weight_gradient_is_deterministic_and_exact_in_fp32():
    """The weight-gradient GEMM cut into several k slices equals one slice and torch's."""
    g = torch.Generator().manual_seed(0)
    dy = torch.randn(300, 40, generator=g).to(DEVICE)
    x = torch.randn(300, 24, generator=g).to(DEVICE)
    one, s1 = gemm.gemm(dy.t(), x, rowsum=True, split=1)
    many, s4 = gemm.gemm(dy.t(), x, rowsum=True, split=4)
    torch.testing.assert_close(many, dy.t() @ x, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(s4, dy.sum(0), rtol=1e-5, atol=1e-4)
    again, _ = gemm.gemm(dy.t(), x, rowsum=True, split=4)
    assert torch.equal(again, many)


def test_mlp_dropout_with_fused_mlp_is_rejected():
    from models.swin_transformer import SwinTransformer
    with pytest.raises(ValueError, match='--fused_mlp needs MLP dropout 0'):
        SwinTransformer(img_size=32, patch_size=2, embed_dim=32, depths=(2,), num_heads=(2,), window_size=4,
                        drop_rate=0.1, fused_mlp=True, kernel_backend='triton')


@pytest.mark.skipif(DEVICE != 'cuda', reason='TF32 exists on the GPU only')
def test_tf32_is_the_callers_choice_not_the_process_flag():
    """fp32 GEMMs use IEEE products unless tf32=True is passed, whatever torch's global flag says."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(256, 512, generator=g).cuda()
    b = torch.randn(512, 192, generator=g).cuda()
    exact = (a.double() @ b.double()).cpu()
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert _rel(gemm.gemm(a, b), exact) < 1e-6
        torch.backends.cuda.matmul.allow_tf32 = False
        assert _rel(gemm.gemm(a, b, tf32=True), exact) > 1e-5     # TF32 keeps 10 mantissa bits
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_tf32_choice_travels_from_config_to_the_kernels():
    import argparse
    import os
    from config import get_config
    from kernels import build_ops
    from models import build_model
    ops = build_ops(mlp=True, dense=True, backend='triton', tf32=True)
    assert ops.mlp.func is mlp.fused_mlp and ops.mlp.keywords == {'tf32': True}
    assert ops.linear.func is dense.fused_dense and ops.linear.keywords == {'tf32': True}
    for tf32 in (False, True):
        cfg = os.path.join(os.path.dirname(__file__), '..', 'configs/swin/swin_tiny_patch4_window7_224.yaml')
        config = get_config(argparse.Namespace(cfg=cfg, opts=['MODEL.SWIN.EMBED_DIM', '32', 'MODEL.SWIN.DEPTHS', '[1, 1]',
                                       'MODEL.SWIN.NUM_HEADS', '[2, 2]', 'FUSED_MLP', 'True', 'FUSED_DENSE', 'True',
                                       'KERNEL_BACKEND', 'triton', 'EXTRA.TF32', str(tf32)]))
        model = build_model(config)
        assert model.ops.mlp.keywords == {'tf32': tf32} and model.ops.linear.keywords == {'tf32': tf32}
