"""--unfused_mha (fused window attention): forward and every gradient (qkv, bias table) against a
float64 reference, on window sizes 7, 8 and 12, masked and unmasked, odd batches; CPU under
TRITON_INTERPRET=1 and the GPU."""
import pytest
import torch

from conftest import DEVICE
from kernels import window_attention as wa
from models.swin_transformer import relative_position_index, shifted_window_mask

# (dtype, max relative error ||got - ref|| / ||ref||), against float64 on unrounded inputs; measured
# ~2.5e-7 (fp32), ~5e-4 (fp16), ~7e-3 (bf16). fp32 runs IEEE fp32 products; the half types round
# q, k, v, P and dS to 11 (fp16) or 8 (bf16) mantissa bits before fp32-accumulated products.
TOLERANCE = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

CASES = [  # batch, window, heads, head_dim, shifted
    (1, 7, 3, 32, True),       # Swin-T stage 1 head shape, one image
    (3, 7, 2, 16, False),      # odd batch, unshifted
    (2, 8, 2, 32, True),       # window 8 (N = 64)
    (1, 12, 2, 16, True),      # window 12 (N = 144): several query blocks
    (1, 4, 2, 64, True),       # head_dim 64
    (1, 4, 1, 128, False),     # head_dim 128, one head
    (2, 7, 2, 24, True),       # head_dim 24: not a power of two
]


def _inputs(batch, window, heads, d, shifted, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    side = 2 * window                                   # a 2x2 grid of windows
    nW = 4
    N, C = window * window, heads * d
    qkv = torch.randn(batch * nW, N, 3 * C, generator=g, dtype=torch.float64)
    table = torch.randn((2 * window - 1) ** 2, heads, generator=g, dtype=torch.float64)
    index = relative_position_index(window)
    mask = shifted_window_mask(side, side, window, window // 2).double() if shifted else None
    dout = torch.randn(batch * nW, N, C, generator=g, dtype=torch.float64)
    return qkv, table, index, mask, dout


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize('dtype', list(TOLERANCE), ids=str)
@pytest.mark.parametrize('case', CASES, ids=str)
def test_forward_and_gradients_match_float64_reference(case, dtype):
    batch, window, heads, d, shifted = case
    qkv, table, index, mask, dout = _inputs(*case, dtype, seed=hash(case) % 1000)
    scale = d ** -0.5
    ref_qkv, ref_table = qkv.clone().requires_grad_(), table.clone().requires_grad_()
    ref = wa.window_attention_ref(ref_qkv, ref_table, index, mask, heads, scale)
    ref.backward(dout)

    f_qkv = qkv.to(DEVICE, dtype).requires_grad_()
    f_table = table.to(DEVICE, torch.float32).requires_grad_()
    f_mask = mask.to(DEVICE, torch.float32) if mask is not None else None
    out = wa.window_attention(f_qkv, f_table, index.to(DEVICE), f_mask, heads, scale)
    assert out.dtype == dtype and out.shape == ref.shape
    out.backward(dout.to(DEVICE, dtype))
    tol = TOLERANCE[dtype]
    assert _rel(out.cpu(), ref.detach()) < tol
    assert _rel(f_qkv.grad.cpu(), ref_qkv.grad) < tol
    assert _rel(f_table.grad.cpu(), ref_table.grad) < tol
    assert torch.isfinite(f_qkv.grad).all()


@pytest.mark.parametrize('window', [7, 12], ids=['one query block', 'several query blocks'])
def test_bias_table_gradient_is_deterministic(window):
    """Run-to-run identical qkv and table gradients (on the GPU programs race; a sum in a fixed
    order must not depend on that), single- and multi-block."""
    qkv, table, index, mask, dout = _inputs(2, window, 3, 32, True, torch.float32, seed=3)
    grads = []
    for _ in range(3):
        t = table.float().to(DEVICE).requires_grad_()
        q = qkv.float().to(DEVICE).requires_grad_()
        wa.window_attention(q, t, index.to(DEVICE), mask.float().to(DEVICE), 3, 32 ** -0.5) \
            .backward(dout.float().to(DEVICE))
        grads.append((t.grad, q.grad))
    for other in grads[1:]:
        assert torch.equal(grads[0][0], other[0]) and torch.equal(grads[0][1], other[1])


def test_table_gradient_follows_an_index_changed_in_place():
    """The table gradient's scatter keeps each index buffer's positions grouped by table row between
    calls; loading other values into the same buffer (load_state_dict copies in place) must regroup
    them: the gradient with the changed buffer equals the reference's with the new index."""
    qkv, table, index, mask, dout = _inputs(1, 7, 2, 16, True, torch.float32, seed=5)
    buffer = index.clone().to(DEVICE)
    for new_index in (index, index.flip(0), index.flip(1)):
        buffer.copy_(new_index.to(DEVICE))
        ref_table = table.clone().requires_grad_()
        wa.window_attention_ref(qkv, ref_table, new_index, mask, 2, 0.25).backward(dout)
        t = table.float().to(DEVICE).requires_grad_()
        wa.window_attention(qkv.float().to(DEVICE), t, buffer, mask.float().to(DEVICE), 2, 0.25) \
            .backward(dout.float().to(DEVICE))
        assert _rel(t.grad.cpu(), ref_table.grad) < TOLERANCE[torch.float32]


@pytest.mark.skipif(DEVICE != 'cuda', reason='device memory is measured on CUDA')
def test_backward_memory_does_not_grow_with_table_rows_times_tokens():
    """Window 24 (N = 576, 2209 table rows), one window: the backward's peak stays far below one
    [N*N, rows] tensor (a one-hot scatter needed 5.9 GB int64 + 2.9 GB fp32 a call)."""
    qkv, table, index, _, dout = _inputs(1, 24, 2, 16, False, torch.float32, seed=1)
    q = qkv[:1].float().cuda().requires_grad_()
    t = table.float().cuda().requires_grad_()
    out = wa.window_attention(q, t, index.cuda(), None, 2, 0.25)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out.backward(dout[:1].float().cuda())
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 256 * 2 ** 20
    assert torch.isfinite(t.grad).all()


def test_no_windows_gives_zero_table_gradient():
    index = relative_position_index(7).to(DEVICE)
    t = torch.randn(169, 2, device=DEVICE, requires_grad=True)
    q = torch.randn(0, 49, 3 * 2 * 16, device=DEVICE, requires_grad=True)
    wa.window_attention(q, t, index, None, 2, 0.25).sum().backward()
    assert torch.equal(t.grad, torch.zeros_like(t)) and q.grad.shape == q.shape


def test_bad_shapes_are_rejected():
    qkv = torch.randn(4, 49, 3 * 3 * 8, device=DEVICE)          # head_dim 8: below the kernel's 16
    with pytest.raises(ValueError, match='head_dim'):
        wa.window_attention(qkv, torch.randn(169, 3, device=DEVICE), relative_position_index(7).to(DEVICE),
                            None, 3, 1.0)


@pytest.mark.parametrize('window, shifted, dtype', [(4, True, torch.float32), (7, True, torch.bfloat16),
                                                    (7, False, torch.float32), (8, True, torch.float16),
                                                    (12, True, torch.bfloat16), (12, False, torch.float32)])
def test_bias_mask_tile_equals_torch_ops(window, shifted, dtype):
    """The padded bias + mask tile the kernels read, built in one launch, equals torch's gather, cast,
    add, zero fill and copy bit for bit (one fp32 add), at one key tile (window 4: unpadded, 7: padded
    to 64, 8) and at several (window 12: 192 x 192), with the mask and the table in the model's dtype."""
    N, heads = window * window, 3
    g = torch.Generator().manual_seed(window)
    table = torch.randn((2 * window - 1) ** 2, heads, generator=g).to(DEVICE, dtype)
    index = relative_position_index(window).to(DEVICE)
    mask = shifted_window_mask(2 * window, 3 * window, window, window // 2).to(DEVICE, dtype) if shifted else None
    block_m, block_n, _, num_m, num_k, _ = wa._blocks(N, 32)
    got = wa._bias_mask(table, index, mask, num_m * block_m, num_k * block_n)
    want = wa._bias_mask_ref(table, index, mask, num_m * block_m, num_k * block_n)
    assert got.shape == want.shape == ((6 if shifted else 1), heads, num_m * block_m, num_k * block_n)
    assert torch.equal(got, want)
