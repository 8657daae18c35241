"""Model level: Swin with each fused flag (and all together) equals the reference model, logits
and every parameter gradient, from the same weights and the same upstream gradient."""
import pytest
import torch

from conftest import DEVICE
from models.swin_transformer import SwinTransformer

# A small Swin whose blocks are all shifted/unshifted pairs; head_dim 16 (the kernels' minimum).
SMALL = dict(img_size=32, patch_size=2, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4,
             num_classes=10, drop_path_rate=0.0)
FLAGS = ['fused_window_process', 'fused_attention', 'fused_layernorm', 'fused_mlp', 'fused_dense']


# window process + layernorm: the shuffles fold into the LayerNorm kernels
PAIRS = [['fused_window_process', 'fused_layernorm']]


def assert_flags_match_reference(model_cls, kwargs: dict, flags, perturb, x_shape=(3, 3, 32, 32),
                                 rtol=(1e-5, 1e-4), atol=1e-5, backend='triton', autocast=None) -> None:
    """model_cls(**kwargs) with `flags` on the `backend` kernels against the same model with every flag
    off, from the same weights (`perturb` makes them non-trivial) and the same upstream gradient:
    logits within rtol[0], every parameter gradient within rtol[1] (elementwise, with atol; under
    `autocast`, a dtype on CUDA, both run in it and the errors are norm-wise)."""
    torch.manual_seed(0)
    ref = model_cls(**kwargs).to(DEVICE)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if perturb(name, p):
                p.add_(torch.randn_like(p) * 0.2)
    fused = model_cls(**kwargs, **{f: True for f in flags}, kernel_backend=backend).to(DEVICE)
    fused.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(*x_shape, device=DEVICE)
    g = torch.randn(x_shape[0], kwargs['num_classes'], device=DEVICE)
    with torch.autocast(DEVICE, dtype=autocast or torch.float32, enabled=autocast is not None):
        out_ref, out = ref(x).float(), fused(x).float()
    (out_ref * g).sum().backward()
    (out * g).sum().backward()
    if autocast is None:
        torch.testing.assert_close(out, out_ref, rtol=rtol[0], atol=atol)
    else:   # half precision rounds in different places: compare norm-wise
        assert _rel(out, out_ref) < rtol[0], ('logits', _rel(out, out_ref))
    ref_grads = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        if autocast is None:
            torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=rtol[1], atol=atol, msg=name)
        else:
            assert _rel(p.grad, ref_grads[name].grad) < rtol[1], (name, _rel(p.grad, ref_grads[name].grad))


def _rel(a, b) -> float:
    """Norm of the difference over the norm of the reference."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize('flags', [[f] for f in FLAGS] + PAIRS + [FLAGS], ids=lambda f: '+'.join(f))
def test_fused_model_equals_reference(flags):
    # non-trivial norms and bias tables
    assert_flags_match_reference(SwinTransformer, SMALL, flags, lambda n, p: p.ndim == 1 or p.shape[-1] in (2, 4))

def test_block_built_alone_honours_fused_window_process():
    """Upstream's block and stage take fused_window_process; built alone they use the fused shuffles."""
    from models.swin_transformer import BasicLayer, SwinTransformerBlock
    from kernels.window_process import window_partition
    block = SwinTransformerBlock(32, (8, 8), 2, window_size=4, shift_size=2, fused_window_process=True)
    layer = BasicLayer(32, (8, 8), 2, 2, 4, fused_window_process=True)
    expected = window_partition if DEVICE == 'cuda' else None    # 'auto' resolves to the reference on the CPU
    for ops in (block.ops, layer.blocks[0].ops):
        assert ops.chosen == (('window_process', 'triton' if DEVICE == 'cuda' else 'torch'),)
        if expected is not None:
            assert ops.window_partition is expected
    assert SwinTransformerBlock(32, (8, 8), 2, window_size=4).ops.chosen == ()


def test_registry_window_layout_norms_need_both_flags_on_our_kernels():
    """The window-layout LayerNorms are registry entries of their own, needing both flags; they
    run only where both flags resolve to Triton, and otherwise the two chosen ops are composed."""
    import functools
    from kernels import OPS, build_ops, get_impl
    from kernels.layer_norm import layer_norm_partition, merge_add_layer_norm, layer_norm_partition_ref
    assert OPS['norm_partition'].flags == OPS['merge_add_norm'].flags == ('--fused_layernorm',
                                                                          '--fused_window_process')
    assert get_impl('norm_partition', 'torch') == ('torch', layer_norm_partition_ref)
    both = build_ops(window_process=True, layer_norm=True, backend='triton')
    assert {'norm_partition': 'triton', 'merge_add_norm': 'triton'}.items() <= dict(both.chosen).items()
    assert both.norm_partition is layer_norm_partition and both.merge_add_norm is merge_add_layer_norm
    for ops in (build_ops(window_process=True, layer_norm=True, backend='triton', fold_window_norm=False),
                build_ops(layer_norm=True, backend='triton'), build_ops(window_process=True, backend='triton'),
                build_ops(window_process=True, layer_norm=True, backend='torch')):
        assert not {'norm_partition', 'merge_add_norm'} & set(dict(ops.chosen))
        assert isinstance(ops.norm_partition, functools.partial)
        assert ops.norm_partition.keywords == {'layer_norm': ops.layer_norm, 'window_partition': ops.window_partition}
