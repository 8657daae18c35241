"""Swin V2 (models/swin_transformer_v2.py): timm's SwinV2 on the same weights (converted by timm's
own filter), the fused flags that apply at model level, --pretrained across windows, every shipped
V2 config, and main.py end to end."""
import argparse
import glob
import os

import pytest
import torch

from conftest import DEVICE, ROOT
from models.swin_transformer import relative_position_index, shifted_window_mask
from models.swin_transformer_v2 import SwinTransformerV2, relative_coords_table
from test_train import DEMO_CFG, FAST, epoch_losses, result, run_main

# window 4 at 16x16 and 8x8 tokens: shifted blocks in stage 0, a window-sized map in stage 1
SMALL = dict(img_size=64, patch_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4,
             num_classes=10, drop_path_rate=0.0)


def _perturbed(model):
    """Non-trivial weights: V2's post-norms start at zero (every block the identity)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or 'logit_scale' in name or 'cpb_mlp' in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def test_matches_timm_swinv2():
    import timm.models.swin_transformer_v2 as tv2
    torch.manual_seed(0)
    ours = _perturbed(SwinTransformerV2(**SMALL)).eval()
    theirs = tv2.SwinTransformerV2(img_size=64, patch_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                                   window_size=4, num_classes=10, drop_path_rate=0.0).eval()
    theirs.load_state_dict(tv2.checkpoint_filter_fn(ours.state_dict(), theirs), strict=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_state_dict_layout_is_upstreams():
    sd = SwinTransformerV2(**SMALL).state_dict()
    for key in ('layers.0.blocks.0.attn.logit_scale', 'layers.0.blocks.0.attn.q_bias', 'layers.0.blocks.0.attn.v_bias',
                'layers.0.blocks.0.attn.cpb_mlp.0.weight', 'layers.0.blocks.0.attn.cpb_mlp.0.bias',
                'layers.0.blocks.0.attn.cpb_mlp.2.weight', 'layers.0.blocks.0.attn.relative_coords_table',
                'layers.0.blocks.0.attn.relative_position_index', 'layers.0.blocks.1.attn_mask',
                'layers.0.downsample.reduction.weight', 'layers.0.downsample.norm.weight', 'head.weight'):
        assert key in sd, key
    assert 'layers.0.blocks.0.attn.qkv.bias' not in sd and 'layers.0.blocks.0.attn.cpb_mlp.2.bias' not in sd
    assert sd['layers.0.downsample.norm.weight'].shape == (64,)          # norm over 2C, after the reduction
    assert torch.equal(sd['layers.0.blocks.0.norm1.weight'], torch.zeros(32))   # res-post-norm init


def test_relative_coords_table_math():
    t = relative_coords_table(4)
    assert t.shape == (1, 7, 7, 2)
    # corners: +-(w-1)/(w-1) * 8 -> sign * log2(9) / 3
    assert torch.allclose(t[0, 0, 0], torch.full((2,), -torch.log2(torch.tensor(9.)) / 3))
    assert torch.equal(t[0, 3, 3], torch.zeros(2))
    # a pretrained window rescales the same coordinates
    t12 = relative_coords_table(16, pretrained_window_size=12)
    assert torch.allclose(t12[0, 0, 0], torch.full((2,), -torch.log2(torch.tensor(15 / 11 * 8 + 1)) / 3))


FLAGS = ['fused_window_process', 'fused_attention', 'fused_layernorm', 'fused_mlp', 'fused_dense']


@pytest.mark.parametrize('flags', [[f] for f in FLAGS] + [FLAGS], ids=lambda f: '+'.join(f))
def test_fused_flags_equal_reference(flags):
    """Each flag that applies to V2 (Triton kernels; on the CPU under the interpreter) against the
    reference model: logits and every parameter gradient, logit_scale, q/v biases and cpb MLP included."""
    from test_fused_model import assert_flags_match_reference
    small = dict(SMALL, img_size=32, patch_size=2)
    fused = SwinTransformerV2(**small, **{f: True for f in flags}, kernel_backend='triton')
    assert {op for op, b in fused.ops.chosen if b == 'triton'} >= {
        {'fused_window_process': 'window_process', 'fused_layernorm': 'layer_norm', 'fused_mlp': 'mlp',
         'fused_dense': 'dense', 'fused_attention': 'window_attention'}[f] for f in flags}
    if 'fused_layernorm' in flags:      # the post-norm residuals run as one kernel (with the merge folded in)
        assert fused.ops.post_norm_add is not None and ('post_norm_add', 'triton') in fused.ops.chosen
        folded = ('merge_post_norm_add', 'triton') in fused.ops.chosen
        assert folded == ('fused_window_process' in flags)
    # V2's post-norms start at zero (every block the identity): perturb them, the biases, logit scales, cpb MLP
    assert_flags_match_reference(SwinTransformerV2, small, flags,
                                 lambda n, p: p.ndim == 1 or 'logit_scale' in n or 'cpb_mlp' in n, rtol=(1e-4, 1e-3))

def test_fused_attention_refuses_what_the_kernel_cannot_hold():
    from kernels import KernelUnavailable
    with pytest.raises(KernelUnavailable, match='windows of up to 32x32.*40x40'):
        SwinTransformerV2(**dict(SMALL, img_size=160, patch_size=4, window_size=40, depths=(2,), num_heads=(2,)),
                          fused_attention=True, kernel_backend='triton')
    with pytest.raises(ValueError, match='attention dropout 0'):
        SwinTransformerV2(**SMALL, fused_attention=True, attn_drop_rate=0.1, kernel_backend='triton')


# (batch, window, heads, head_dim, shifted). Window 12 (144 tokens) takes the keys in 3 blocks of 64
# and the queries in 3 blocks; window 16 in 4 x 4, window 24 (576 tokens) in 9 x 9 (about 3 minutes of
# the CPU interpreter for its three dtypes). Head dim 128 and more heads and windows on the GPU only.
COSINE_CASES = [(2, 8, 2, 32, True), (1, 12, 2, 64, False), (1, 12, 3, 32, True), (1, 4, 2, 48, True),
                (1, 16, 2, 32, True), (1, 24, 2, 32, False)]
GPU_COSINE_CASES = [(2, 16, 4, 32, True), (2, 8, 2, 128, True), (4, 12, 4, 64, True), (2, 24, 4, 32, True),
                    (1, 24, 2, 64, False)]
COSINE_TOL = {torch.float32: 2e-6, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize('dtype', list(COSINE_TOL), ids=str)
@pytest.mark.parametrize('case', COSINE_CASES + (GPU_COSINE_CASES if DEVICE == 'cuda' else []), ids=str)
def test_cosine_attention_kernel_matches_float64(case, dtype):
    """--unfused_mha on V2: the fused kernel with V2's inputs against upstream's math in float64,
    forward and the gradients of qkv, logit_scale (one head clamped at log 100: zero gradient) and
    the cpb table (through 16 sigmoid)."""
    from kernels import window_attention as wa
    batch, window, heads, d, shifted = case
    g = torch.Generator().manual_seed(window * 100 + d)
    N, C, nW = window * window, heads * d, 4
    qkv = torch.randn(batch * nW, N, 3 * C, generator=g, dtype=torch.float64)
    logit_scale = torch.log(10 * torch.ones(heads, 1, 1, dtype=torch.float64)) + torch.randn(heads, 1, 1, generator=g,
                                                                                            dtype=torch.float64)
    logit_scale[0] = 5.0                                                  # above log(100): clamped
    table = torch.randn((2 * window - 1) ** 2, heads, generator=g, dtype=torch.float64)
    index = relative_position_index(window)
    mask = shifted_window_mask(2 * window, 2 * window, window, window // 2).double() if shifted else None
    dout = torch.randn(batch * nW, N, C, generator=g, dtype=torch.float64)
    ref_in = [t.clone().requires_grad_() for t in (qkv, logit_scale, table)]
    ref = wa.cosine_window_attention_ref(ref_in[0], ref_in[1], ref_in[2], index, mask, heads)
    ref.backward(dout)
    got_in = [qkv.to(DEVICE, dtype).requires_grad_(), logit_scale.float().to(DEVICE).requires_grad_(),
              table.float().to(DEVICE).requires_grad_()]
    out = wa.cosine_window_attention(got_in[0], got_in[1], got_in[2], index.to(DEVICE),
                                     mask.float().to(DEVICE) if mask is not None else None, heads)
    assert out.dtype == dtype
    out.backward(dout.to(DEVICE, dtype))
    tol = COSINE_TOL[dtype]
    rel = lambda a, b: ((a.double().cpu() - b).norm() / b.norm()).item()      # noqa: E731
    assert rel(out, ref) < tol, ('out', rel(out, ref))
    # the same math in PyTorch at the same dtype: half precision's own error on the reductions (the
    # logit-scale gradient sums N * N products per window) bounds what the kernel can be asked for
    same = [t.detach().to(DEVICE, dtype if i == 0 else torch.float32).requires_grad_() for i, t in enumerate(ref_in)]
    with torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
        same_out = wa.cosine_window_attention_ref(same[0], same[1], same[2], index.to(DEVICE),
                                                  mask.float().to(DEVICE) if mask is not None else None, heads)
    same_out.backward(dout.to(DEVICE, same_out.dtype))
    # The logit-scale gradient sums tau * dS * cos over every window, terms 10 to 5000 times the result
    # here, so in fp32 it is held to what a sum can promise: per head, |error| <= 16 eps32 * sum |terms|
    # (measured: CPU interpreter up to 3.1 eps * sum, H200 1.8, PyTorch's fp32 1.0). Half precision and
    # every other gradient: bounded by upstream's own error at that dtype (the GPU's window-24 case
    # fails it when D_i comes from the rounded output: fp16 0.025 vs 0.014, bf16 0.13 vs 0.12).
    for name, a, b, c in zip(('qkv', 'logit_scale', 'table'), got_in, ref_in, same):
        if name == 'logit_scale' and dtype == torch.float32:
            bound = 16 * 2.0 ** -24 * _logit_scale_grad_abs_terms(*ref_in, index, mask, heads, dout)
            err = (a.grad.double().cpu() - b.grad).view(-1).abs()
            assert (err <= bound).all(), (name, err.tolist(), bound.tolist())
            continue
        assert rel(a.grad, b.grad) < max(4 * tol, 2 * rel(c.grad, b.grad)), (name, rel(a.grad, b.grad),
                                                                              rel(c.grad, b.grad))
    assert got_in[1].grad[0].item() == 0 and ref_in[1].grad[0].item() == 0


def _logit_scale_grad_abs_terms(qkv, logit_scale, table, index, mask, heads, dout):
    """Per head, sum |tau dS cos| over windows, queries and keys (float64): the terms whose sum is
    dL/dlogit_scale (0 for a clamped head), the scale of its rounding error."""
    from kernels.window_attention import LOGIT_SCALE_MAX, cosine_scores_ref
    with torch.no_grad():
        B_, N, _ = qkv.shape
        cos, s, v = cosine_scores_ref(qkv, logit_scale, table, index, mask, heads)
        tau = logit_scale.exp() * (logit_scale <= LOGIT_SCALE_MAX)
        p = s.softmax(-1)
        dp = dout.view(B_, N, heads, -1).transpose(1, 2) @ v.transpose(-2, -1)
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))
        return (ds * cos * tau).abs().sum((0, 2, 3))


def test_pretrained_across_windows_and_22k_head(tmp_path):
    """A 22k model at window 6 (pre-training) -> a 1k model at window 8 with PRETRAINED_WINDOW_SIZES:
    weights (cpb MLP included) load as they are, the coordinate/index/mask buffers are the new
    window's, the 21841-class head maps to 1000 classes."""
    import logging
    from config import get_config
    from utils import load_pretrained
    pre = _perturbed(SwinTransformerV2(img_size=48, patch_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                                       window_size=6, num_classes=21841))
    torch.save({'model': pre.state_dict()}, tmp_path / 'pre22k.pth')
    cfg = get_config(argparse.Namespace(cfg=os.path.join(ROOT, 'configs/swinv2/swinv2_base_patch4_window12to16_192to256_22kto1k_ft.yaml'),
                                        opts=['MODEL.PRETRAINED', str(tmp_path / 'pre22k.pth')]))
    model = SwinTransformerV2(img_size=64, patch_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=8,
                              num_classes=1000, pretrained_window_sizes=(6, 6))
    load_pretrained(cfg, model, logging.getLogger('test'))
    sd, psd = model.state_dict(), pre.state_dict()
    for k in ('layers.0.blocks.0.attn.cpb_mlp.0.weight', 'layers.0.blocks.1.attn.logit_scale', 'norm.weight'):
        assert torch.equal(sd[k], psd[k]), k
    assert torch.equal(sd['layers.0.blocks.0.attn.relative_coords_table'], relative_coords_table(8, 6))
    from utils import imagenet_22k_to_1k_indices
    assert torch.equal(sd['head.weight'], psd['head.weight'][imagenet_22k_to_1k_indices()])


def test_every_shipped_v2_config_builds():
    from config import get_config
    from models import build_model
    files = sorted(glob.glob(os.path.join(ROOT, 'configs/swinv2/*.yaml')))
    assert len(files) == 12
    for f in files:
        cfg = get_config(argparse.Namespace(cfg=f, opts=None))
        with torch.device('meta'):
            model = build_model(cfg)
        assert type(model).__name__ == 'SwinTransformerV2', f
        assert model.layers[-1].blocks[0].attn.pretrained_window_size == cfg.MODEL.SWINV2.PRETRAINED_WINDOW_SIZES[-1]


V2_OPTS = ['MODEL.TYPE', 'swinv2', 'MODEL.NAME', 'swinv2_micro', 'MODEL.SWINV2.PATCH_SIZE', '2',
           'MODEL.SWINV2.EMBED_DIM', '32', 'MODEL.SWINV2.DEPTHS', '[2, 2]', 'MODEL.SWINV2.NUM_HEADS', '[2, 4]',
           'MODEL.SWINV2.WINDOW_SIZE', '4']


def test_main_trains_resumes_and_evaluates_v2(demo_data, tmp_path):
    base = ['--cfg', DEMO_CFG, '--data-path', demo_data]
    out = run_main(base + ['--output', str(tmp_path / 'a'), '--opts', 'TRAIN.EPOCHS', '2'] + V2_OPTS + FAST)
    full = epoch_losses(out)
    assert set(full) == {0, 1}
    run_dir = tmp_path / 'a' / 'swinv2_micro' / 'default'
    out = run_main(base + ['--output', str(tmp_path / 'b'), '--resume', str(run_dir / 'ckpt_epoch_0.pth'),
                           '--opts', 'TRAIN.EPOCHS', '2'] + V2_OPTS + FAST)
    assert epoch_losses(out) == {1: full[1]}
    out = run_main(base + ['--output', str(tmp_path / 'c'), '--eval', '--resume', str(run_dir / 'ckpt_best.pth'),
                           '--opts'] + V2_OPTS + FAST)
    assert 0 <= result(out)['acc1'] <= 100
    out = run_main(base + ['--output', str(tmp_path / 'd'), '--unfused_mha', '--opts', 'TRAIN.EPOCHS', '1']
                   + V2_OPTS + FAST)     # V2's cosine attention through the fused-attention path
    assert 'window_attention=' in out and set(epoch_losses(out)) == {0}


def test_fused_post_norm_block_with_drop_path_equals_reference_block():
    """A V2 block with drop-path 0.5 in training: the folded merge + norm1 + drop-path + residual and
    norm2 + drop-path + residual kernels against upstream's ops, the same random draws in the same
    order; output and every gradient."""
    import kernels
    from models.swin_transformer_v2 import SwinTransformerBlockV2
    args = dict(dim=32, input_resolution=(8, 8), num_heads=2, window_size=4, shift_size=2, drop_path=0.5)
    torch.manual_seed(0)
    ref = SwinTransformerBlockV2(**args).to(DEVICE)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ops = kernels.build_ops(window_process=True, layer_norm=True, backend='triton', post_norm=True)
    fused = SwinTransformerBlockV2(**args, ops=ops).to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(6, 64, 32, device=DEVICE)
    g = torch.randn(6, 64, 32, device=DEVICE)
    outs = []
    for block in (ref, fused):
        block.train()
        xi = x.clone().requires_grad_()
        torch.manual_seed(7)
        out = block(xi)
        out.backward(g)
        outs.append((out.detach(), xi.grad, {n: p.grad for n, p in block.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-5)
    # parameter gradients normwise: the cpb MLP's sum over every window's dS cancels, so elementwise
    # rtol fails on its near-zero entries from fp32 reordering alone (~3e-7 normwise on the CPU)
    for name, grad in outs[0][2].items():
        err = ((outs[1][2][name] - grad).norm() / grad.norm()).item()
        assert err < 1e-5, (name, err)


@pytest.mark.parametrize('ft', ['swinv2_base_patch4_window12to16_192to256_22kto1k_ft.yaml',
                                'swinv2_base_patch4_window12to24_192to384_22kto1k_ft.yaml'])
def test_pretrained_22k_window12_into_the_shipped_finetune_configs(tmp_path, ft):
    """The shipped pair of configs, as a user runs them: a 22k model of
    swinv2_base_patch4_window12_192_22k.yaml (shrunk in width and depth by --opts; windows, image
    sizes and pretrained-window settings as shipped) loaded with --pretrained into the 12to16 / 12to24
    fine-tune config: every weight lands, the coordinate tables are rebuilt for the new windows from
    PRETRAINED_WINDOW_SIZES, the head maps 21841 -> 1000, and the model runs at its new resolution."""
    import logging
    from config import get_config
    from models import build_model
    from utils import imagenet_22k_to_1k_indices, load_pretrained
    shrink = ['MODEL.SWINV2.EMBED_DIM', '32', 'MODEL.SWINV2.DEPTHS', '[2, 2, 2, 2]']
    pre_cfg = get_config(argparse.Namespace(       # 21841 classes: what the 22k dataset sets at run time
        cfg=os.path.join(ROOT, 'configs/swinv2/swinv2_base_patch4_window12_192_22k.yaml'),
        opts=shrink + ['MODEL.NUM_CLASSES', '21841']))
    assert pre_cfg.DATA.DATASET == 'imagenet22K' and pre_cfg.MODEL.SWINV2.WINDOW_SIZE == 12
    pre = _perturbed(build_model(pre_cfg))
    torch.save({'model': pre.state_dict()}, tmp_path / 'pre22k.pth')
    cfg = get_config(argparse.Namespace(cfg=os.path.join(ROOT, 'configs/swinv2', ft),
                                        opts=shrink + ['MODEL.PRETRAINED', str(tmp_path / 'pre22k.pth')]))
    window, size = cfg.MODEL.SWINV2.WINDOW_SIZE, cfg.DATA.IMG_SIZE
    assert (window, size) in ((16, 256), (24, 384)) and cfg.MODEL.NUM_CLASSES == 1000
    model = build_model(cfg)
    load_pretrained(cfg, model, logging.getLogger('test'))
    sd, psd = model.state_dict(), pre.state_dict()
    for k, v in psd.items():
        if 'relative_coords_table' in k or 'relative_position_index' in k or 'attn_mask' in k or k.startswith('head.'):
            continue
        assert torch.equal(sd[k], v), k
    pretrained = cfg.MODEL.SWINV2.PRETRAINED_WINDOW_SIZES
    for i, layer in enumerate(model.layers):
        attn = layer.blocks[0].attn
        w = attn.window_size[0]
        assert w == min(window, size // 4 // 2 ** i)
        assert torch.equal(sd[f'layers.{i}.blocks.0.attn.relative_coords_table'],
                           relative_coords_table(w, pretrained[i]))
    assert torch.equal(sd['head.weight'], psd['head.weight'][imagenet_22k_to_1k_indices()])
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_stage_hands_each_block_its_windows(monkeypatch):
    """A V2 stage of three blocks with drop-path, training, with --fused_layernorm and
    --fused_window_process: each block's MLP residual kernel also writes the next block's windows, which
    that block takes instead of partitioning; output and every gradient as the reference stage's."""
    import kernels
    from models.swin_transformer_v2 import BasicLayerV2, SwinTransformerBlockV2
    from test_layer_norm import assert_stages_agree, stage_pair
    ref, fused = stage_pair(BasicLayerV2, kernels.build_ops(layer_norm=True, window_process=True, backend='triton',
                                                            post_norm=True))
    assert fused.blocks[0].carries_windows and not ref.blocks[0].carries_windows
    handed = []            # per block call: whether the block was given its windows
    plain = SwinTransformerBlockV2.forward_windows
    monkeypatch.setattr(SwinTransformerBlockV2, 'forward_windows',
                        lambda blk, x, windows=None, next_shift=None: handed.append(windows is not None)
                        or plain(blk, x, windows, next_shift))
    assert_stages_agree(ref, fused)
    assert handed == [False, False, False, False, True, True]    # the reference's forward(), then the stage's
