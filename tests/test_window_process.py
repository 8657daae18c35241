"""--fused_window_process: the Triton gather is bit-exact against roll + partition (pure data
movement), forward and backward, on odd shapes; CPU under TRITON_INTERPRET=1, and the GPU."""
import pytest
import torch

from conftest import DEVICE
from kernels import window_process as wp

SHAPES = [  # B, H, W, C, window, shift
    (1, 8, 8, 3, 4, 2),
    (3, 14, 7, 5, 7, 3),       # H != W, C odd, shift = window // 2
    (2, 12, 24, 6, 4, 0),      # unshifted: plain partition
    (1, 56, 28, 96, 7, 3),     # Swin-T stage-1 widths, non-square
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('shape', SHAPES, ids=str)
def test_partition_and_merge_are_bit_exact(shape, dtype):
    B, H, W, C, w, s = shape
    x = torch.randn(B, H, W, C, device=DEVICE).to(dtype)
    win = wp.window_partition(x, w, s)
    assert torch.equal(win, wp.window_partition_ref(x, w, s))
    g = torch.randn_like(win)
    assert torch.equal(wp.window_merge(g, H, W, s), wp.window_merge_ref(g, H, W, s))
    assert torch.equal(wp.window_merge(win, H, W, s), x)          # merge inverts partition


@pytest.mark.parametrize('shape', SHAPES, ids=str)
def test_gradients_are_bit_exact(shape):
    B, H, W, C, w, s = shape
    x = torch.randn(B, H, W, C, device=DEVICE)
    g = torch.randn(B * H * W // (w * w), w, w, C, device=DEVICE)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    wp.window_partition(x1, w, s).backward(g)
    wp.window_partition_ref(x2, w, s).backward(g)
    assert torch.equal(x1.grad, x2.grad)
    g1, g2 = g.clone().requires_grad_(), g.clone().requires_grad_()
    wp.window_merge(g1, H, W, s).backward(x)
    wp.window_merge_ref(g2, H, W, s).backward(x)
    assert torch.equal(g1.grad, g2.grad)


def test_non_contiguous_input():
    x = torch.randn(2, 5, 8, 12, device=DEVICE).permute(0, 2, 3, 1)   # B, H, W, C with C strided
    assert not x.is_contiguous()
    assert torch.equal(wp.window_partition(x, 4, 2), wp.window_partition_ref(x, 4, 2))


def test_size_not_a_multiple_of_the_window_is_rejected():
    with pytest.raises(ValueError, match='not a multiple of the window'):
        wp.window_partition(torch.randn(1, 9, 8, 4, device=DEVICE), 4, 2)


def test_more_tokens_than_int32_indexing_is_rejected_before_allocating():
    # 2**26 samples of a 7x7 map: 3.3e9 tokens, a zero-stride view (no memory behind it)
    x = torch.zeros(1, 7, 7, 1, device=DEVICE).expand(2 ** 26, 7, 7, 1)
    with pytest.raises(ValueError, match='at most 2\\*\\*31 - 1'):
        wp.window_partition(x, 7, 0)
