"""The reference model against an independent implementation (timm), its layout and its flops."""
import pytest
import timm
import torch
from timm.models.swin_transformer import checkpoint_filter_fn

from models.swin_transformer import SwinTransformer

SWIN_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))


def _timm_logits(ours: SwinTransformer, x: torch.Tensor, img: int, window: int) -> torch.Tensor:
    """Our weights converted by timm's own filter, run through timm's forward."""
    ref = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False, img_size=img,
                            window_size=window, drop_path_rate=0.0).eval()
    sd = {k: v for k, v in ours.state_dict().items() if k != 'absolute_pos_embed'}
    ref.load_state_dict(checkpoint_filter_fn(sd, ref), strict=True)
    with torch.no_grad():
        if not ours.ape:
            return ref(x)
        # timm has no absolute position embedding: add ours between timm's own stages.
        h = ref.patch_embed(x)                                         # B, H, W, C
        h = h + ours.absolute_pos_embed.view(1, *h.shape[1:3], -1)
        return ref.forward_head(ref.norm(ref.layers(h)))


@pytest.mark.parametrize('img,window,ape', [(224, 7, False), (256, 8, False), (384, 12, False), (224, 7, True)])
def test_logits_match_timm(img, window, ape):
    torch.manual_seed(img + window)
    ours = SwinTransformer(img_size=img, window_size=window, ape=ape, drop_path_rate=0.0, **SWIN_T).eval()
    # Non-trivial norms and biases, so a swapped parameter cannot go unnoticed.
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        got = ours(x)
    want = _timm_logits(ours, x, img, window)
    rel = ((got - want).norm() / want.norm()).item()
    assert want.abs().max() > 1e-2
    assert rel < 1e-5, rel


def test_state_dict_layout_is_upstreams():
    m = SwinTransformer(ape=True, **SWIN_T)
    keys = list(m.state_dict())
    expected = {'patch_embed.proj.weight', 'patch_embed.proj.bias', 'patch_embed.norm.weight',
                'patch_embed.norm.bias', 'absolute_pos_embed', 'norm.weight', 'norm.bias',
                'head.weight', 'head.bias'}
    depths = SWIN_T['depths']
    for i, d in enumerate(depths):
        for j in range(d):
            p = f'layers.{i}.blocks.{j}.'
            expected |= {p + s for s in ('norm1.weight', 'norm1.bias', 'norm2.weight', 'norm2.bias',
                                         'attn.relative_position_bias_table', 'attn.relative_position_index',
                                         'attn.qkv.weight', 'attn.qkv.bias', 'attn.proj.weight',
                                         'attn.proj.bias', 'mlp.fc1.weight', 'mlp.fc1.bias',
                                         'mlp.fc2.weight', 'mlp.fc2.bias')}
            if j % 2 == 1 and i < 3:     # stage 3 (7x7 map) has no shift, so no mask
                expected.add(p + 'attn_mask')
        if i < len(depths) - 1:
            expected |= {f'layers.{i}.downsample.{s}' for s in ('reduction.weight', 'norm.weight', 'norm.bias')}
    assert set(keys) == expected
    assert len(keys) == len(expected)
    sd = m.state_dict()
    assert sd['layers.0.blocks.0.attn.relative_position_bias_table'].shape == (13 * 13, 3)
    assert sd['layers.2.downsample.reduction.weight'].shape == (768, 1536)
    idx = sd['layers.0.blocks.0.attn.relative_position_index']
    # (dy + w-1) * (2w-1) + (dx + w-1): token 0 vs token 48 (dy = dx = -6) -> 0; diagonal -> centre.
    assert idx[0, 48] == 0 and idx[48, 0] == 168 and idx[5, 5] == 84
    mask = sd['layers.0.blocks.1.attn_mask']
    assert mask.shape == (64, 49, 49) and set(mask.unique().tolist()) == {0.0, -100.0}


def test_flops_and_params_match_upstream_swin_t():
    m = SwinTransformer(**SWIN_T)
    assert sum(p.numel() for p in m.parameters()) == 28288354
    assert abs(m.flops() / 1e9 - 4.49) < 0.01    # upstream logs 4.49 GFLOPs (multiply-adds) for Swin-T


def test_flags_keep_the_checkpoint_format():
    """A checkpoint saved with every flag off loads strictly into a model with every flag on."""
    plain = SwinTransformer(img_size=64, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4))
    fused = SwinTransformer(img_size=64, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4),
                            fused_window_process=True, fused_layernorm=True, fused_mlp=True,
                            fused_dense=True, fused_attention=True, kernel_backend='torch')
    assert list(plain.state_dict()) == list(fused.state_dict())
    fused.load_state_dict(plain.state_dict(), strict=True)
