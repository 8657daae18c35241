"""The apex paths (KERNEL_BACKEND apex). apex cannot be installed on our machines, so the
comparisons run only where it is importable with its CUDA extensions; without it, choosing apex
must fail at model build with an error that names the flag and the fix."""
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels._utils import apex_available

HAS_APEX_CUDA = torch.cuda.is_available()


@pytest.mark.skipif(apex_available('apex.normalization'), reason='apex is installed here')
def test_apex_layer_norm_without_apex_is_a_clear_error():
    with pytest.raises(kernels.KernelUnavailable, match='--fused_layernorm.*apex.normalization.*KERNEL_BACKEND auto'):
        kernels.build_ops(layer_norm=True, backend='apex')


@pytest.mark.skipif(apex_available('apex.fused_dense'), reason='apex is installed here')
def test_apex_dense_without_apex_is_a_clear_error():
    with pytest.raises(kernels.KernelUnavailable, match='--fused_dense.*apex.fused_dense'):
        kernels.build_ops(dense=True, backend='apex')


def test_apex_backend_uses_ours_where_apex_has_no_op():
    """apex has no window ops and no residual-add norm: ours stand in (never an error)."""
    ops = kernels.build_ops(window_process=True, window_attention=True, backend='apex')
    assert dict(ops.chosen)['window_process'] in ('triton', 'torch')


@pytest.mark.skipif(not (apex_available('apex.normalization') and HAS_APEX_CUDA), reason='needs apex + CUDA')
def test_apex_layer_norm_matches_reference():
    _, impl = kernels.get_impl('layer_norm', 'apex')
    x = torch.randn(64, 96, device='cuda', requires_grad=True)
    w = torch.randn(96, device='cuda', requires_grad=True)
    b = torch.randn(96, device='cuda', requires_grad=True)
    torch.testing.assert_close(impl(x, w, b, 1e-5), F.layer_norm(x, (96,), w, b, 1e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not (apex_available('apex.fused_dense') and HAS_APEX_CUDA), reason='needs apex + CUDA')
def test_apex_dense_matches_reference():
    _, impl = kernels.get_impl('dense', 'apex')
    x = torch.randn(2, 64, 96, device='cuda', dtype=torch.float16, requires_grad=True)
    w = torch.randn(288, 96, device='cuda', dtype=torch.float16, requires_grad=True)
    b = torch.randn(288, device='cuda', dtype=torch.float16, requires_grad=True)
    torch.testing.assert_close(impl(x, w, b), F.linear(x, w, b), rtol=2e-3, atol=2e-2)
