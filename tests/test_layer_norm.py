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


@pytest.mark.parametrize('P, C', [(600, 100), (256, 16), (1, 7), (2112, 96)])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_weight_gradient_partials_sum_in_one_launch(P, C, dtype):
    """The backward's per-program partial sums of dw and db, summed over the programs and cast in one
    kernel: several row tiles with a tail (P = 600: 256 + 256 + 88), column blocks with a tail (C = 100:
    6 x 16 + 4), a single row, and Swin-T's stage-1 count on an H100 (2112 programs, C = 96), against
    float64 sums cast the same way. fp32: within 1e-5 relative (summation order); half outputs: within
    one rounding of the exact sum."""
    part = torch.randn(2, P, C, device=DEVICE) * torch.logspace(-2, 2, C, device=DEVICE)
    dw, db = ln.sum_partials(part, dtype)
    exact = part.double().sum(1)
    for got, want in zip((dw, db), exact):
        assert got.dtype == dtype and got.shape == (C,)
        rel = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
        assert torch.allclose(got.double(), want, rtol=rel, atol=1e-6 * want.abs().max().item()), \
            (got.double() - want).abs().max()
    assert torch.equal(ln.sum_partials(part, dtype)[0], dw)     # deterministic


def test_no_rows_gives_zero_weight_gradients():
    w = torch.randn(40, device=DEVICE, requires_grad=True)
    b = torch.randn(40, device=DEVICE, requires_grad=True)
    x = torch.randn(0, 40, device=DEVICE, requires_grad=True)
    ln.layer_norm(x, w, b).sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


# --------------------------------------------------------------------------- residual add + norm
ADD_CASES = [  # (shape, shortcut dtype, branch dtype, drop-path scale?)
    ((2, 49, 96), torch.float32, torch.float32, True),
    ((3, 20, 100), torch.float16, torch.float16, True),
    ((1, 33, 61), torch.bfloat16, torch.bfloat16, False),
    ((2, 16, 192), torch.float32, torch.bfloat16, True),     # O1: fp32 residual stream, half branch
    ((4, 7, 24), torch.float32, torch.float16, False),
]


@pytest.mark.parametrize('shape,sdtype,bdtype,with_scale', ADD_CASES, ids=str)
def test_add_layer_norm_matches_the_unfused_ops(shape, sdtype, bdtype, with_scale):
    """h equals `shortcut + branch * scale` (bit-exact on the CPU; within one rounding on the GPU, where
    the multiply-add may become one FMA); y and
    every gradient within the LayerNorm tolerances of float64, including h's gradient from its
    other use (the block's second residual) and drop-path's zeroed samples."""
    g = torch.Generator().manual_seed(shape[1])
    B, C = shape[0], shape[-1]
    shortcut = torch.randn(*shape, generator=g).to(sdtype)
    branch = torch.randn(*shape, generator=g).to(bdtype)
    scale = None
    if with_scale:    # drop-path's factor: 0 (dropped) or 1/keep, in the branch's dtype
        scale = (torch.arange(B) % 2 == 0).to(bdtype).div_(0.9).view(B, 1, 1)
    w = (torch.randn(C, generator=g) * 0.5 + 1)
    b = torch.randn(C, generator=g)
    dh = torch.randn(*shape, generator=g).to(torch.promote_types(sdtype, bdtype))
    dy = torch.randn(*shape, generator=g).to(torch.promote_types(sdtype, bdtype))

    h_ref, _ = ln.add_layer_norm_ref(shortcut, branch, scale, w, b)
    dev = [t.detach().clone().to(DEVICE).requires_grad_() for t in (shortcut, branch, w, b)]
    h, y = ln.add_layer_norm(dev[0], dev[1], scale.to(DEVICE) if scale is not None else None, dev[2], dev[3])
    assert h.dtype == h_ref.dtype
    if DEVICE == 'cpu' and h_ref.dtype == torch.bfloat16:
        # Triton's interpreter truncates fp32 -> bf16 (the GPU rounds to nearest): one bf16 ulp
        torch.testing.assert_close(h.detach().float(), h_ref.float(), rtol=2 ** -7, atol=2 ** -7 * 4)
    elif DEVICE == 'cpu' and bdtype == torch.bfloat16:
        # O1's fp32 residual + bf16 branch: h is fp32, exactly shortcut + bf16(branch * scale), where the
        # interpreter's bf16 rounding of the product truncates. Held to that exactly, so a kernel that
        # rounded h itself to bf16 fails.
        prod = branch.float() * (scale.float() if scale is not None else 1.0)
        truncated = (prod.view(torch.int32) & -65536).view(torch.float32)
        assert torch.equal(h.detach().cpu(), shortcut.float() + truncated)
    elif DEVICE == 'cpu':
        assert torch.equal(h.detach().cpu(), h_ref)
    else:
        # on the GPU the compiler may fuse `shortcut + branch * scale` into one FMA: one rounding
        # fewer than the unfused ops, so h may differ from them in the last bit
        ulp = torch.finfo(h.dtype).eps
        torch.testing.assert_close(h.detach().cpu().float(), h_ref.float(), rtol=2 * ulp, atol=2 * ulp)

    s64, b64, w64, bias64 = (t.double().requires_grad_() for t in (shortcut, branch, w, b))
    h64 = s64 + (b64 * scale.double() if scale is not None else b64)
    h64 = h64 + (h.detach().cpu().double() - h64).detach()    # h's roundings, as constants
    y64 = F.layer_norm(h64, (C,), w64, bias64, 1e-5)
    torch.autograd.backward([h64, y64], [dh.double(), dy.double()])

    torch.autograd.backward([h, y], [dh.to(DEVICE), dy.to(DEVICE)])
    tol = TOLERANCE[torch.promote_types(sdtype, bdtype)]
    assert _rel(y, y64.detach()) < tol
    for got, want, dtype in ((dev[0].grad, s64.grad, sdtype), (dev[1].grad, b64.grad, bdtype),
                             (dev[2].grad, w64.grad, torch.float32), (dev[3].grad, bias64.grad, torch.float32)):
        assert got.dtype == dtype
        # h is rounded to its dtype before the norm: no gradient is closer than that rounding
        assert _rel(got, want) < max(TOLERANCE[dtype], tol) * 2
    if with_scale:
        assert torch.all(dev[1].grad[1::2] == 0), 'dropped samples get no branch gradient'


def test_fused_block_equals_reference_block_with_drop_path():
    """A Swin block with drop-path in training: same random draws, same output and gradients."""
    from models.swin_transformer import SwinTransformerBlock
    import kernels
    torch.manual_seed(0)
    ref = SwinTransformerBlock(32, (8, 8), 2, window_size=4, shift_size=2, drop_path=0.5).to(DEVICE)
    fused = SwinTransformerBlock(32, (8, 8), 2, window_size=4, shift_size=2, drop_path=0.5,
                                 ops=kernels.build_ops(layer_norm=True, backend='triton')).to(DEVICE)
    # with --fused_window_process too, norm1 and norm2 take the window-layout kernels
    folded = SwinTransformerBlock(32, (8, 8), 2, window_size=4, shift_size=2, drop_path=0.5,
                                  ops=kernels.build_ops(layer_norm=True, window_process=True,
                                                        backend='triton')).to(DEVICE)
    assert folded.ops.norm_partition is ln.layer_norm_partition
    fused.load_state_dict(ref.state_dict())
    folded.load_state_dict(ref.state_dict())
    x = torch.randn(6, 64, 32, device=DEVICE)
    outs = []
    for block in (ref, fused, folded):
        torch.manual_seed(1)
        xi = x.clone().requires_grad_()
        out = block(xi)
        out.backward(torch.ones_like(out))
        outs.append((out, xi.grad, block.norm2.weight.grad))
    for got in outs[1:]:
        for a, b in zip(outs[0], got):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- window layout (norm1 +
# partition, merge + residual + norm2): the same per-row arithmetic as the plain kernels with
# different addressing, checked against them composed with the reference shuffles. Bit-exact on
# the CPU; on the GPU each specialisation is compiled on its own and may contract a multiply-add
# differently, so values may differ in their last bit (2 ulp of the dtype; the weight and bias
# gradients, sums over rows of such values, to 1e-5 relative).
WINDOW_CASES = [  # B, H, W, C, window, shift, dtype
    (1, 8, 8, 24, 4, 2, torch.float32),
    (3, 14, 7, 61, 7, 3, torch.float16),     # H != W, C odd, shift = window // 2
    (2, 12, 8, 40, 4, 0, torch.bfloat16),    # unshifted
    (2, 7, 7, 96, 7, 0, torch.float32),      # one window covers the map
]


def _window_inputs(B, H, W, C, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, H * W, C, generator=g) * 2 + 1).to(dtype).to(DEVICE)
    w = (torch.randn(C, generator=g) * 0.5 + 1).to(DEVICE)
    b = torch.randn(C, generator=g).to(DEVICE)
    return x, w, b, g


def _same(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    if DEVICE == 'cpu':
        assert torch.equal(got, want)
    else:
        ulp = torch.finfo(got.dtype).eps
        torch.testing.assert_close(got, want, rtol=2 * ulp if got.dtype != torch.float32 else 1e-5,
                                   atol=2 * ulp if got.dtype != torch.float32 else 1e-5)


def _same_outputs_and_grads(got, want, want_grads, upstream, inputs):
    """A fused form's outputs `got` and the gradients `upstream` gives `inputs` through them, against the
    composed ops' `want` and `want_grads`."""
    for a, e in zip(got, want):
        _same(a, e)
    for a, e in zip(_grads(list(got), upstream, inputs), want_grads):
        _same(a, e)


def _grads(outputs, grads, inputs):
    torch.autograd.backward(outputs, grads)
    out = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    return out


@pytest.mark.parametrize('case', WINDOW_CASES, ids=str)
def test_layer_norm_partition_matches_the_unfolded_kernels(case):
    from kernels import window_process as wp
    B, H, W, C, ws, s, dtype = case
    x, w, b, g = _window_inputs(B, H, W, C, dtype, C)
    dy = torch.randn(B * H * W // ws ** 2, ws, ws, C, generator=g).to(dtype).to(DEVICE)
    inputs = [t.clone().requires_grad_() for t in (x, w, b)]
    want = wp.window_partition_ref(ln.layer_norm(*inputs).view(B, H, W, C), ws, s)
    want_grads = _grads([want], [dy], inputs)
    got = ln.layer_norm_partition(*inputs, 1e-5, H, W, ws, s)
    _same(got, want)
    for a, e in zip(_grads([got], [dy], inputs), want_grads):
        _same(a, e)


@pytest.mark.parametrize('with_scale', [False, True], ids=['no_drop_path', 'drop_path'])
@pytest.mark.parametrize('case', WINDOW_CASES, ids=str)
def test_merge_add_layer_norm_matches_the_unfolded_kernels(case, with_scale):
    from kernels import window_process as wp
    B, H, W, C, ws, s, dtype = case
    shortcut, w, b, g = _window_inputs(B, H, W, C, dtype, C + 1)
    windows = torch.randn(B * H * W // ws ** 2, ws, ws, C, generator=g).to(dtype).to(DEVICE)
    scale = (torch.arange(B) % 2 == 1).to(dtype).div_(0.8).view(B, 1, 1).to(DEVICE) if with_scale else None
    dh, dy = (torch.randn(B, H * W, C, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    inputs = [t.clone().requires_grad_() for t in (shortcut, windows, w, b)]
    merged = wp.window_merge_ref(inputs[1], H, W, s).view(B, H * W, C)
    want = ln.add_layer_norm(inputs[0], merged, scale, inputs[2], inputs[3])
    want_grads = _grads(list(want), [dh, dy], inputs)
    got = ln.merge_add_layer_norm(inputs[0], inputs[1], scale, inputs[2], inputs[3], 1e-5, H, W, s)
    for a, e in zip(got, want):
        _same(a, e)
    for a, e in zip(_grads(list(got), [dh, dy], inputs), want_grads):
        _same(a, e)


@pytest.mark.parametrize('with_scale', [False, True], ids=['no_drop_path', 'drop_path'])
@pytest.mark.parametrize('case', WINDOW_CASES, ids=str)
def test_add_layer_norm_partition_matches_the_unfolded_kernels(case, with_scale):
    """The previous block's MLP residual + norm1 + roll + partition (h in the map's layout, y in
    window layout) against add_layer_norm then the reference partition."""
    from kernels import window_process as wp
    B, H, W, C, ws, s, dtype = case
    shortcut, w, b, g = _window_inputs(B, H, W, C, dtype, C + 2)
    branch = torch.randn(B, H * W, C, generator=g).to(dtype).to(DEVICE)
    scale = (torch.arange(B) % 2 == 1).to(dtype).div_(0.8).view(B, 1, 1).to(DEVICE) if with_scale else None
    dh = torch.randn(B, H * W, C, generator=g).to(dtype).to(DEVICE)
    dy = torch.randn(B * H * W // ws ** 2, ws, ws, C, generator=g).to(dtype).to(DEVICE)
    inputs = [t.clone().requires_grad_() for t in (shortcut, branch, w, b)]
    h, y = ln.add_layer_norm(inputs[0], inputs[1], scale, inputs[2], inputs[3])
    want = (h, wp.window_partition_ref(y.view(B, H, W, C), ws, s))
    want_grads = _grads(list(want), [dh, dy], inputs)
    got = ln.add_layer_norm_partition(inputs[0], inputs[1], scale, inputs[2], inputs[3], 1e-5, H, W, ws, s)
    _same_outputs_and_grads(got, want, want_grads, [dh, dy], inputs)


def test_stage_defers_the_mlp_residual_to_the_next_norm1():
    """A V1 stage of three blocks with drop-path, training: with both folding flags each block's MLP
    residual is added inside the next block's norm1 kernel (the last one's by the stage); output and
    every gradient as the reference stage's, from the same random draws."""
    import kernels
    from models.swin_transformer import BasicLayer
    ref, fused = stage_pair(BasicLayer, kernels.build_ops(layer_norm=True, window_process=True, backend='triton'))
    assert fused.blocks[0].ops.defer_mlp_residual and not ref.blocks[0].ops.defer_mlp_residual
    assert_stages_agree(ref, fused)


def stage_pair(stage_cls, fused_ops):
    """A stage of three blocks with drop-path ([B, 8x8, 32], 2 heads, window 4) on upstream's ops and the
    same on `fused_ops`, from one initialisation."""
    import kernels
    stages = []
    for ops in (kernels.Ops(), fused_ops):
        torch.manual_seed(0)
        stages.append(stage_cls(32, (8, 8), 3, 2, 4, drop_path=[0.3, 0.5, 0.4], ops=ops).to(DEVICE))
    return stages


def assert_stages_agree(ref, fused):
    """Two [B, 64, 32]-token stages, the second given the first's weights, trained one step from the
    same random draws: output and every gradient agree (to fp32 rounding: sums in another order)."""
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(6, 64, 32, device=DEVICE)
    outs = []
    for stage in (ref, fused):
        torch.manual_seed(1)
        xi = x.clone().requires_grad_()
        out = stage(xi)
        out.backward(torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out))
        outs.append([out, xi.grad] + [p.grad for p in stage.parameters()])
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(outs[0][1:], outs[1][1:]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_window_layout_rejects_bad_geometry_before_allocating():
    x, w, b, _ = _window_inputs(1, 9, 8, 16, torch.float32, 0)
    with pytest.raises(ValueError, match='not a multiple of the window'):
        ln.layer_norm_partition(x, w, b, 1e-5, 9, 8, 4, 2)
    # 2**26 samples of a 7x7 map (3.3e9 tokens) as a zero-stride view: refused, nothing allocated
    huge = torch.zeros(1, 49, 16, device=DEVICE).expand(2 ** 26, 49, 16)
    with pytest.raises(ValueError, match='at most 2\\*\\*31 - 1'):
        ln.layer_norm_partition(huge, w, b, 1e-5, 7, 7, 7, 0)


# --------------------------------------------------------------------------- post-norm (Swin V2)
POST_CASES = [  # (shape, shortcut dtype, branch dtype, drop-path scale?)
    ((2, 49, 96), torch.float32, torch.float32, True),
    ((3, 20, 100), torch.float16, torch.float16, True),
    ((1, 33, 61), torch.bfloat16, torch.bfloat16, False),
    ((2, 16, 192), torch.float32, torch.bfloat16, True),     # fp32 residual stream, half branch
    ((5, 300, 24), torch.float32, torch.float32, True),      # many rows: several programs in the backward
]


@pytest.mark.parametrize('shape,sdtype,bdtype,with_scale', POST_CASES, ids=str)
def test_post_norm_add_matches_float64(shape, sdtype, bdtype, with_scale):
    """h = shortcut + LayerNorm(branch) * scale (V2's res-post-norm residual): h and the gradients of
    shortcut, branch, weight and bias against float64 from the same rounded inputs; dropped samples
    get no branch gradient and the shortcut's gradient is h's, untouched."""
    g = torch.Generator().manual_seed(shape[1])
    B, C = shape[0], shape[-1]
    shortcut = torch.randn(*shape, generator=g).to(sdtype)
    branch = (torch.randn(*shape, generator=g) * 3 + 1).to(bdtype)
    scale = (torch.arange(B) % 2 == 0).to(bdtype).div_(0.9).view(B, 1, 1) if with_scale else None
    w = (torch.randn(C, generator=g) * 0.5 + 1)
    b = torch.randn(C, generator=g)
    dh = torch.randn(*shape, generator=g).to(torch.promote_types(sdtype, bdtype))
    dev = [t.detach().clone().to(DEVICE).requires_grad_() for t in (shortcut, branch, w, b)]
    h = ln.post_norm_add(dev[0], dev[1], scale.to(DEVICE) if scale is not None else None, dev[2], dev[3])
    assert h.dtype == torch.promote_types(sdtype, bdtype)
    s64, b64, w64, bias64 = (t.double().requires_grad_() for t in (shortcut, branch, w, b))
    h64 = s64 + F.layer_norm(b64, (C,), w64, bias64, 1e-5) * (scale.double() if scale is not None else 1.)
    h64.backward(dh.double())
    h.backward(dh.to(DEVICE))
    tol = max(TOLERANCE[sdtype], TOLERANCE[bdtype])     # the norm's output is rounded to the branch's dtype
    assert _rel(h, h64.detach()) < tol
    for got, want, dtype in ((dev[0].grad, s64.grad, sdtype), (dev[1].grad, b64.grad, bdtype),
                             (dev[2].grad, w64.grad, torch.float32), (dev[3].grad, bias64.grad, torch.float32)):
        assert got.dtype == dtype
        assert _rel(got, want) < max(TOLERANCE[dtype], tol) * 2
    assert torch.equal(dev[0].grad.cpu(), dh.to(sdtype))
    if with_scale:
        assert torch.all(dev[1].grad[1::2] == 0), 'dropped samples get no branch gradient'


@pytest.mark.parametrize('with_scale', [False, True], ids=['no_drop_path', 'drop_path'])
@pytest.mark.parametrize('case', WINDOW_CASES, ids=str)
def test_merge_post_norm_add_matches_the_unfolded_kernels(case, with_scale):
    """V2's merge + norm1 + drop-path + residual folded into one kernel each way, against the window
    merge followed by post_norm_add: the same bits (the same arithmetic, only the addressing differs)."""
    from kernels import window_process as wp
    B, H, W, C, ws, s, dtype = case
    shortcut, w, b, g = _window_inputs(B, H, W, C, dtype, C + 2)
    windows = (torch.randn(B * H * W // ws ** 2, ws, ws, C, generator=g) * 2).to(dtype).to(DEVICE)
    scale = (torch.arange(B) % 2 == 1).to(dtype).div_(0.8).view(B, 1, 1).to(DEVICE) if with_scale else None
    dh = torch.randn(B, H * W, C, generator=g).to(dtype).to(DEVICE)
    inputs = [t.clone().requires_grad_() for t in (shortcut, windows, w, b)]
    merged = wp.window_merge_ref(inputs[1], H, W, s).view(B, H * W, C)
    want = ln.post_norm_add(inputs[0], merged, scale, inputs[2], inputs[3])
    want_grads = _grads([want], [dh], inputs)
    got = ln.merge_post_norm_add(inputs[0], inputs[1], scale, inputs[2], inputs[3], 1e-5, H, W, s)
    _same(got, want)
    for a, e in zip(_grads([got], [dh], inputs), want_grads):
        _same(a, e)


@pytest.mark.parametrize('with_scale', [False, True], ids=['no_drop_path', 'drop_path'])
@pytest.mark.parametrize('case', WINDOW_CASES, ids=str)
def test_post_norm_add_partition_matches_the_unfolded_kernels(case, with_scale):
    """V2's MLP residual with the next block's roll + partition in one kernel each way (h written to the map
    and to window layout; backward, h's two gradients summed in the same pass), against post_norm_add
    followed by the window partition: the same bits. bf16 gradients on quarter-integers: the sum of h's two
    gradients is then exact, which the CPU interpreter's fp32 -> bf16 cast (not round-to-nearest-even)
    would otherwise round differently from torch's add."""
    from kernels import window_process as wp
    B, H, W, C, ws, s, dtype = case
    shortcut, w, b, g = _window_inputs(B, H, W, C, dtype, C + 3)
    branch = (torch.randn(B, H * W, C, generator=g) * 2).to(dtype).to(DEVICE)
    scale = (torch.arange(B) % 2 == 1).to(dtype).div_(0.8).view(B, 1, 1).to(DEVICE) if with_scale else None
    if dtype == torch.bfloat16:
        dh = torch.randint(-8, 9, (B, H * W, C), generator=g).div(4).to(dtype).to(DEVICE)
        dwin = torch.randint(-8, 9, (B * H * W // ws ** 2, ws, ws, C), generator=g).div(4).to(dtype).to(DEVICE)
    else:
        dh = torch.randn(B, H * W, C, generator=g).to(dtype).to(DEVICE)
        dwin = torch.randn(B * H * W // ws ** 2, ws, ws, C, generator=g).to(dtype).to(DEVICE)
    inputs = [t.clone().requires_grad_() for t in (shortcut, branch, w, b)]
    h = ln.post_norm_add(inputs[0], inputs[1], scale, inputs[2], inputs[3])
    want = [h, wp.window_partition_ref(h.view(B, H, W, C), ws, s)]
    want_grads = _grads(want, [dh, dwin], inputs)
    got = ln.post_norm_add_partition(inputs[0], inputs[1], scale, inputs[2], inputs[3], 1e-5, H, W, ws, s)
    _same_outputs_and_grads(got, want, want_grads, [dh, dwin], inputs)


def test_post_norm_add_partition_composes_where_h_is_wider_than_the_norm():
    """A bf16 branch on an fp32 residual stream outside CUDA autocast: h is fp32, the norm's output bf16;
    the one kernel needs them equal, so the two ops run composed (same results as composing them)."""
    from kernels import window_process as wp
    shortcut, w, b, g = _window_inputs(2, 8, 8, 16, torch.float32, 5)
    branch = torch.randn(2, 64, 16, generator=g).to(torch.bfloat16).to(DEVICE)
    h, windows = ln.post_norm_add_partition(shortcut, branch, None, w, b, 1e-5, 8, 8, 4, 2)
    want = ln.post_norm_add(shortcut, branch, None, w, b)
    assert h.dtype == torch.float32 and torch.equal(h, want)
    assert torch.equal(windows, wp.window_partition_ref(want.view(2, 8, 8, 16), 4, 2))
