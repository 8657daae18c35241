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


@pytest.mark.parametrize('flags', [[f] for f in FLAGS] + PAIRS + [FLAGS], ids=lambda f: '+'.join(f))
def test_fused_model_equals_reference(flags):
    torch.manual_seed(0)
    ref = SwinTransformer(**SMALL).to(DEVICE)
    with torch.no_grad():                       # non-trivial norms and bias tables
        for p in ref.parameters():
            if p.ndim == 1 or p.shape[-1] in (2, 4):
                p.add_(torch.randn_like(p) * 0.2)
    fused = SwinTransformer(**SMALL, **{f: True for f in flags}, kernel_backend='triton').to(DEVICE)
    fused.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 3, 32, 32, device=DEVICE)
    g = torch.randn(3, 10, device=DEVICE)
    out_ref, out = ref(x), fused(x)
    (out_ref * g).sum().backward()
    (out * g).sum().backward()
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    ref_grads = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)


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
