"""Swin-MLP (models/swin_mlp.py): the spatial MLP against an explicit per-window, per-head matrix
product, upstream's state-dict layout, each fused flag that applies against the reference, every
shipped config, and main.py."""
import argparse
import glob
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, ROOT
from models.swin_mlp import SwinMLP, SwinMLPBlock
from test_train import DEMO_CFG, FAST, epoch_losses, result, run_main

SMALL = dict(img_size=32, patch_size=2, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4,
             num_classes=10, drop_path_rate=0.0)


def _spatial_by_hand(block: SwinMLPBlock, x: torch.Tensor) -> torch.Tensor:
    """out[window, n, head channels] = W_head @ x[window, :, head channels] + b_head, window by window,
    on the map padded by (w - s, s) on both axes and cut back."""
    B, H, W, C = x.shape
    w, s, heads = block.window_size, block.shift_size, block.num_heads
    hd, N = C // heads, w * w
    if s:
        x = F.pad(x, [0, 0, w - s, s, w - s, s])
    out = torch.zeros_like(x)
    weight = block.spatial_mlp.weight.view(heads, N, N)
    bias = block.spatial_mlp.bias.view(heads, N)
    for b in range(B):
        for i in range(0, x.shape[1], w):
            for j in range(0, x.shape[2], w):
                win = x[b, i:i + w, j:j + w].reshape(N, C)
                for h in range(heads):
                    cols = slice(h * hd, (h + 1) * hd)
                    out[b, i:i + w, j:j + w, cols] = (weight[h] @ win[:, cols] + bias[h][:, None]).view(w, w, hd)
    return out[:, w - s:w - s + H, w - s:w - s + W] if s else out


@pytest.mark.parametrize('shift', [0, 1, 2])   # 1: w - s != s, the padding is asymmetric
def test_spatial_mlp_is_a_per_window_per_head_matrix(shift):
    torch.manual_seed(0)
    block = SwinMLPBlock(32, (8, 12), num_heads=4, window_size=4, shift_size=shift)
    with torch.no_grad():
        block.spatial_mlp.weight.normal_()
        block.spatial_mlp.bias.normal_()
    x = torch.randn(2, 8, 12, 32)
    torch.testing.assert_close(block.spatial(x), _spatial_by_hand(block, x), rtol=1e-5, atol=1e-5)


def test_state_dict_layout_is_upstreams():
    sd = SwinMLP(**SMALL).state_dict()
    assert sd['layers.0.blocks.0.spatial_mlp.weight'].shape == (2 * 16, 16, 1)
    assert sd['layers.0.blocks.0.spatial_mlp.bias'].shape == (2 * 16,)
    assert sd['layers.0.downsample.norm.weight'].shape == (4 * 32,)        # V1's merging: norm, then reduce
    assert not any('attn' in k or 'relative' in k for k in sd)


FLAGS = ['fused_window_process', 'fused_layernorm', 'fused_mlp', 'fused_dense']


@pytest.mark.parametrize('flags', [[f] for f in FLAGS] + [FLAGS], ids=lambda f: '+'.join(f))
def test_fused_flags_equal_reference(flags):
    from test_fused_model import assert_flags_match_reference
    assert_flags_match_reference(SwinMLP, SMALL, flags, lambda n, p: p.ndim == 1, rtol=(1e-4, 1e-3))

@pytest.mark.parametrize('window_process', [False, True], ids=['spatial MLP as torch ops', 'fused spatial MLP'])
def test_stage_defers_the_mlp_residual_to_the_next_norm1(window_process, monkeypatch):
    """A Swin-MLP stage of three blocks with drop-path, training: with --fused_layernorm each block's MLP
    residual is added inside the next block's norm1 kernel (the last one's by the stage); output and every
    gradient as the reference stage's, from the same random draws."""
    import kernels
    from models.swin_mlp import BasicLayerMLP
    from test_layer_norm import assert_stages_agree, stage_pair
    ref, fused = stage_pair(BasicLayerMLP, kernels.build_ops(layer_norm=True, window_process=window_process,
                                                             backend='triton', spatial_mlp=True))
    assert fused.blocks[0].defers_mlp_residual and not ref.blocks[0].defers_mlp_residual
    deferred = []          # per block call: whether a residual came with it
    plain = SwinMLPBlock.forward_deferred
    monkeypatch.setattr(SwinMLPBlock, 'forward_deferred',
                        lambda blk, x, pending=None: deferred.append(pending is not None) or plain(blk, x, pending))
    assert_stages_agree(ref, fused)
    assert deferred == [False, False, False, False, True, True]    # the reference's forward(), then the stage's


def test_fused_attention_is_refused_with_the_reason():
    from kernels import KernelUnavailable
    with pytest.raises(KernelUnavailable, match='no attention'):
        SwinMLP(**SMALL, fused_attention=True)


def test_every_shipped_mlp_config_builds():
    from config import get_config
    from models import build_model
    files = sorted(glob.glob(os.path.join(ROOT, 'configs/swinmlp/*.yaml')))
    assert len(files) == 4
    for f in files:
        cfg = get_config(argparse.Namespace(cfg=f, opts=None))
        with torch.device('meta'):
            assert type(build_model(cfg)).__name__ == 'SwinMLP', f


def test_main_trains_and_evaluates_swin_mlp(demo_data, tmp_path):
    opts = ['MODEL.TYPE', 'swin_mlp', 'MODEL.NAME', 'swin_mlp_micro', 'MODEL.SWIN_MLP.PATCH_SIZE', '2',
            'MODEL.SWIN_MLP.EMBED_DIM', '32', 'MODEL.SWIN_MLP.DEPTHS', '[2, 2]', 'MODEL.SWIN_MLP.NUM_HEADS', '[2, 4]',
            'MODEL.SWIN_MLP.WINDOW_SIZE', '4']
    base = ['--cfg', DEMO_CFG, '--data-path', demo_data]
    out = run_main(base + ['--output', str(tmp_path), '--opts', 'TRAIN.EPOCHS', '1'] + opts + FAST)
    assert set(epoch_losses(out)) == {0}
    ckpt = tmp_path / 'swin_mlp_micro' / 'default' / 'ckpt_best.pth'
    out = run_main(base + ['--output', str(tmp_path / 'e'), '--eval', '--resume', str(ckpt), '--opts'] + opts + FAST)
    assert 0 <= result(out)['acc1'] <= 100
