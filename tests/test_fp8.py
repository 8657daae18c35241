"""--fp8: which layers run in float8, that the checkpoint does not change, the math against the bf16
model (torchao's emulated float8 on the CPU), and the refusals. torchao is optional: without it the
flag's error is tested, and the rest skips."""
import argparse
import os

import pytest
import torch

from amp import FP8_LAYERS, check_fp8, enable_fp8
from config import ConfigError, get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs/swin/swin_tiny_patch4_window7_224.yaml')
try:
    import torchao.float8  # noqa: F401
    HAS_TORCHAO = True
except Exception:
    HAS_TORCHAO = False
needs_torchao = pytest.mark.skipif(not HAS_TORCHAO, reason='torchao is not installed (optional)')
SMALL = dict(img_size=64, patch_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4,
             num_classes=10, drop_path_rate=0.0)


def _config(*opts):
    return get_config(argparse.Namespace(cfg=TINY, opts=list(opts) or None))


def test_refusals_name_the_reason():
    o2 = ('AMP_OPT_LEVEL', 'O2', 'AMP_DTYPE', 'bfloat16')
    if not HAS_TORCHAO:
        with pytest.raises(ConfigError, match='--fp8 needs torchao'):
            check_fp8(_config(*o2), torch.device('cpu'))
        return
    with pytest.raises(ConfigError, match='refused on the CPU'):
        check_fp8(_config(*o2), torch.device('cpu'))
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        with pytest.raises(ConfigError, match='O2 bf16'):
            check_fp8(_config(), torch.device('cuda'))
        with pytest.raises(ConfigError, match='fused_mlp'):
            check_fp8(_config(*o2, 'FUSED_MLP', 'True'), torch.device('cuda'))
        check_fp8(_config(*o2), torch.device('cuda'))


def test_fp8_config_keys_are_validated():
    """An unknown recipe, or layers outside the FP8 set (or none), fail when the config is built."""
    with pytest.raises(ConfigError, match='FP8_RECIPE'):
        _config('EXTRA.FP8_RECIPE', 'delayed')
    for bad in ("['fc1', 'head']", '[]'):
        with pytest.raises(ConfigError, match='EXTRA.FP8_LAYERS .* subset of'):
            _config('EXTRA.FP8_LAYERS', bad)
    assert list(_config('EXTRA.FP8_LAYERS', "['fc1', 'fc2']").EXTRA.FP8_LAYERS) == ['fc1', 'fc2']


def test_main_refuses_fp8_on_the_cpu(demo_data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip('the CPU case')
    from test_train import DEMO_CFG, FAST, run_main
    out = run_main(['--cfg', DEMO_CFG, '--data-path', demo_data, '--output', str(tmp_path), '--fp8',
                    '--amp-opt-level', 'O2', '--amp-dtype', 'bfloat16', '--opts', 'TRAIN.EPOCHS', '1'] + FAST,
                   expect_ok=False)
    assert 'error: --fp8' in out and 'Traceback' not in out
    assert not os.path.exists(tmp_path / 'swin_micro_shapes10')     # refused before anything was written


@needs_torchao
@pytest.mark.parametrize('model_type', ['swin', 'swinv2'])
def test_fp8_layers_are_the_documented_ones_and_the_checkpoint_is_unchanged(model_type):
    from models.swin_transformer import SwinTransformer
    from models.swin_transformer_v2 import SwinTransformerV2
    cls = SwinTransformer if model_type == 'swin' else SwinTransformerV2
    torch.manual_seed(0)
    ref = cls(**SMALL)
    model = cls(**SMALL)
    model.load_state_dict(ref.state_dict())
    chosen = enable_fp8(model)
    swapped = {n for n, m in model.named_modules() if type(m).__name__ == 'Float8Linear'}
    assert swapped == set(chosen) and swapped
    assert {n.split('.')[-1] for n in swapped} == set(FP8_LAYERS)
    assert type(model.head) is torch.nn.Linear                          # the head stays
    assert all(type(m) is not type(model.layers[0].blocks[0].attn.qkv)
               for n, m in model.named_modules() if 'cpb_mlp' in n)      # V2's cpb MLP stays
    sd = model.state_dict()
    assert sd.keys() == ref.state_dict().keys()
    plain = cls(**SMALL)
    plain.load_state_dict(sd, strict=True)                              # loads without --fp8
    for k, v in ref.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k


@needs_torchao
@pytest.mark.parametrize('layers', [('fc1', 'fc2'), ('qkv',), ('reduction', 'proj')], ids='+'.join)
def test_fp8_layers_narrowed_by_config(layers):
    """EXTRA.FP8_LAYERS: exactly the named Linears are swapped, in every block that has them."""
    from models.swin_transformer import SwinTransformer
    model = SwinTransformer(**SMALL)
    expected = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split('.')[-1] in layers}
    chosen = enable_fp8(model, layers=layers)
    swapped = {n for n, m in model.named_modules() if type(m).__name__ == 'Float8Linear'}
    assert swapped == set(chosen) == expected and expected
    with pytest.raises(ValueError, match='subset of'):
        enable_fp8(SwinTransformer(**SMALL), layers=('head',))


@needs_torchao
def test_fp8_model_tracks_the_bf16_model():
    """torchao's emulated float8 (the same scaling and e4m3/e5m2 rounding as on the GPU): logits and
    gradients within float8's precision of the model's own, and every parameter gets a gradient."""
    from models.swin_transformer import SwinTransformer
    torch.manual_seed(0)
    ref = SwinTransformer(**SMALL)
    model = SwinTransformer(**SMALL)
    model.load_state_dict(ref.state_dict())
    enable_fp8(model, emulate=True)
    x = torch.randn(4, 3, 64, 64)
    g = torch.randn(4, 10)
    out_ref, out = ref(x), model(x)
    (out_ref * g).sum().backward()
    (out * g).sum().backward()
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()     # noqa: E731
    assert 0 < rel(out, out_ref) < 0.1, rel(out, out_ref)     # float8: ~2-3 significant bits lost
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert rel(p.grad, ref_grads[name].grad) < 0.25, (name, rel(p.grad, ref_grads[name].grad))


@needs_torchao
def test_fp8_model_has_no_graph_breaks():
    """--fp8 is meant for --compile: dynamo traces the swapped layers (and our dense() dispatch)
    without a break."""
    from models.swin_transformer import SwinTransformer
    model = SwinTransformer(**SMALL)
    enable_fp8(model, emulate=True)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64))
    assert explanation.graph_break_count == 0, explanation.break_reasons
