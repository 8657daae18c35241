"""Config merging: BASE inheritance, --opts, every CLI flag to its key, clear errors."""
import argparse
import os

import pytest

import main
from config import ConfigError, get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs/swin/swin_tiny_patch4_window7_224.yaml')


def test_upstream_config_values():
    c = main.parse_option(['--cfg', TINY])[1]
    assert (c.MODEL.SWIN.EMBED_DIM, list(c.MODEL.SWIN.DEPTHS), list(c.MODEL.SWIN.NUM_HEADS)) == \
        (96, [2, 2, 6, 2], [3, 6, 12, 24])
    assert c.MODEL.DROP_PATH_RATE == 0.2 and c.DATA.BATCH_SIZE == 128 and c.TRAIN.BASE_LR == 5e-4
    assert c.OUTPUT == os.path.join('output', 'swin_tiny_patch4_window7_224', 'default')
    L = main.parse_option(['--cfg', os.path.join(ROOT, 'configs/swin/swin_large_patch4_window7_224_22kto1k_finetune.yaml')])[1]
    assert (L.MODEL.SWIN.EMBED_DIM, list(L.MODEL.SWIN.DEPTHS), list(L.MODEL.SWIN.NUM_HEADS)) == \
        (192, [2, 2, 18, 2], [6, 12, 24, 48])
    assert (L.TRAIN.EPOCHS, L.TRAIN.WARMUP_EPOCHS, L.TRAIN.WEIGHT_DECAY, L.TRAIN.BASE_LR,
            L.TRAIN.WARMUP_LR, L.TRAIN.MIN_LR) == (30, 5, 1e-8, 2e-5, 2e-8, 2e-7)


def test_base_inheritance_and_opts(tmp_path):
    base = tmp_path / 'base.yaml'
    base.write_text('MODEL:\n  NAME: from_base\n  SWIN:\n    EMBED_DIM: 64\nTRAIN:\n  EPOCHS: 7\n')
    child = tmp_path / 'child.yaml'
    child.write_text("BASE: ['base.yaml']\nTRAIN:\n  EPOCHS: 9\n")
    args, c = main.parse_option(['--cfg', str(child), '--opts', 'TRAIN.WARMUP_EPOCHS', '2', 'MODEL.SWIN.DEPTHS', '[1, 1]'])
    assert c.MODEL.NAME == 'from_base' and c.MODEL.SWIN.EMBED_DIM == 64
    assert c.TRAIN.EPOCHS == 9 and c.TRAIN.WARMUP_EPOCHS == 2 and list(c.MODEL.SWIN.DEPTHS) == [1, 1]


FLAG_TO_KEY = [
    (['--batch-size', '32'], 'DATA.BATCH_SIZE', 32),
    (['--data-path', '/d'], 'DATA.DATA_PATH', '/d'),
    (['--zip'], 'DATA.ZIP_MODE', True),
    (['--cache-mode', 'full'], 'DATA.CACHE_MODE', 'full'),
    (['--pretrained', 'p.pth'], 'MODEL.PRETRAINED', 'p.pth'),
    (['--resume', 'r.pth'], 'MODEL.RESUME', 'r.pth'),
    (['--accumulation-steps', '4'], 'TRAIN.ACCUMULATION_STEPS', 4),
    (['--use-checkpoint'], 'TRAIN.USE_CHECKPOINT', True),
    (['--disable_amp'], 'AMP_ENABLE', False),
    (['--amp-opt-level', 'O2'], 'AMP_OPT_LEVEL', 'O2'),
    (['--amp-dtype', 'bfloat16'], 'AMP_DTYPE', 'bfloat16'),
    (['--tag', 'x'], 'TAG', 'x'),
    (['--eval'], 'EVAL_MODE', True),
    (['--throughput'], 'THROUGHPUT_MODE', True),
    (['--local_rank', '3'], 'LOCAL_RANK', 3),
    (['--local-rank', '2'], 'LOCAL_RANK', 2),
    (['--optim', 'sgd'], 'TRAIN.OPTIMIZER.NAME', 'sgd'),
    (['--fused_adam'], 'TRAIN.OPTIMIZER.NAME', 'fused_adam'),
    (['--fused_window_process'], 'FUSED_WINDOW_PROCESS', True),
    (['--fused_layernorm'], 'FUSED_LAYERNORM', True),
    (['--fused_mlp'], 'FUSED_MLP', True),
    (['--fused_dense'], 'FUSED_DENSE', True),
    (['--unfused_mha'], 'UNFUSED_MHA', True),
    (['--fused_window_attention'], 'UNFUSED_MHA', True),
    (['--kernel-backend', 'torch'], 'KERNEL_BACKEND', 'torch'),
    (['--compile'], 'COMPILE', True),
]


@pytest.mark.parametrize('flags,key,value', FLAG_TO_KEY, ids=[f[0][0] for f in FLAG_TO_KEY])
def test_every_flag_reaches_its_key(flags, key, value, monkeypatch):
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    c = main.parse_option(['--cfg', TINY] + flags)[1]
    node = c
    for part in key.split('.'):
        node = node[part]
    assert node == value


def test_output_folder_and_default_key_values():
    c = main.parse_option(['--cfg', TINY, '--output', '/o', '--tag', 't'])[1]
    assert c.OUTPUT == '/o/swin_tiny_patch4_window7_224/t'
    d = main.parse_option(['--cfg', TINY])[1]
    assert not any([d.FUSED_WINDOW_PROCESS, d.FUSED_LAYERNORM, d.FUSED_MLP, d.FUSED_DENSE, d.UNFUSED_MHA])
    assert d.KERNEL_BACKEND == 'auto' and d.AMP_DTYPE == 'float16' and d.AMP_OPT_LEVEL == ''


def test_unknown_key_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match='TRAIN.EPOCSH'):
        main.parse_option(['--cfg', TINY, '--opts', 'TRAIN.EPOCSH', '3'])
    bad = tmp_path / 'bad.yaml'
    bad.write_text('MODEL:\n  SWIN:\n    EMBED_DIMS: 96\n')
    with pytest.raises(ConfigError, match='EMBED_DIMS'):
        main.parse_option(['--cfg', str(bad)])
    with pytest.raises(ConfigError, match='not found'):
        main.parse_option(['--cfg', str(tmp_path / 'missing.yaml')])
    with pytest.raises(ConfigError, match='KERNEL_BACKEND'):
        main.parse_option(['--cfg', TINY, '--opts', 'KERNEL_BACKEND', 'cuda'])


def test_bad_flag_value_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main.parse_option(['--cfg', TINY, '--amp-opt-level', 'O4'])
    assert "invalid choice: 'O4'" in capsys.readouterr().err


def test_num_classes_follows_data_unless_set():
    assert get_config(argparse.Namespace(cfg=TINY, opts=None)).EXTRA.NUM_CLASSES_FROM_DATA
    c = get_config(argparse.Namespace(cfg=TINY, opts=['MODEL.NUM_CLASSES', '10']))
    assert not c.EXTRA.NUM_CLASSES_FROM_DATA and c.MODEL.NUM_CLASSES == 10
    k22 = get_config(argparse.Namespace(cfg=os.path.join(ROOT, 'configs/swin/swin_base_patch4_window7_224_22k.yaml'), opts=None))
    assert not k22.EXTRA.NUM_CLASSES_FROM_DATA and k22.MODEL.NUM_CLASSES == 21841


@pytest.mark.parametrize('key,value,says', [('SAVE_FREQ', '0', 'SAVE_FREQ must be >= 1'),
                                            ('PRINT_FREQ', '0', 'PRINT_FREQ must be >= 1'),
                                            ('DATA.BATCH_SIZE', '0', 'DATA.BATCH_SIZE must be >= 1'),
                                            ('TRAIN.BASE_LR', '-1.0', 'TRAIN.BASE_LR must be >= 0'),
                                            ('AUG.REPROB', '1.5', 'AUG.REPROB is a probability')])
def test_numeric_keys_are_validated_at_start(key, value, says):
    with pytest.raises(ConfigError, match=says):
        get_config(argparse.Namespace(cfg=TINY, opts=[key, value]))


def test_disable_amp_with_an_amp_level_is_an_error():
    with pytest.raises(ConfigError, match='contradicts'):
        get_config(argparse.Namespace(cfg=TINY, opts=None, disable_amp=True, amp_opt_level='O2'))
    assert get_config(argparse.Namespace(cfg=TINY, opts=None, disable_amp=True, amp_opt_level='O0')).AMP_OPT_LEVEL == 'O0'


def test_speed_hint_names_what_the_fastest_configuration_adds():
    """main.py's one line on a GPU training run: upstream's command line is told every flag of the
    fastest measured configuration; a run with all of them is told nothing; --eval / --throughput and
    the CPU get no line; Swin-MLP is not told to fuse an attention it does not have."""
    import torch
    cuda, cpu = torch.device('cuda'), torch.device('cpu')
    best = ['--fused_window_process', '--unfused_mha', '--fused_layernorm', '--fused_adam',
            '--amp-opt-level', 'O2', '--amp-dtype', 'bfloat16']
    plain = main.speed_hint(main.parse_option(['--cfg', TINY])[1], cuda)
    for flag in best[:4] + ['--amp-opt-level O2 --amp-dtype bfloat16', '--compile', '--cuda-graph']:
        assert flag in plain, (flag, plain)
    eager = main.speed_hint(main.parse_option(['--cfg', TINY] + best)[1], cuda)
    assert eager.startswith('speed: this run leaves out --compile') and '--fused_layernorm' not in eager
    graph = main.speed_hint(main.parse_option(['--cfg', TINY] + best + ['--cuda-graph'])[1], cuda)
    assert graph.startswith('speed: this run leaves out --fused_mlp --fused_dense (measured faster with --cuda-graph')
    assert main.speed_hint(main.parse_option(['--cfg', TINY] + best + ['--cuda-graph', '--fused_mlp',
                                                                     '--fused_dense'])[1], cuda) is None
    assert main.speed_hint(main.parse_option(['--cfg', TINY] + best + ['--compile'])[1], cuda) is None
    assert main.speed_hint(main.parse_option(['--cfg', TINY] + best[:3] + ['--compile'])[1], cuda) == (
        'speed: this run leaves out --fused_adam; --amp-opt-level O2 --amp-dtype bfloat16 (the fastest measured '
        'configuration, README.md "What to use"; the fused flags change speed, not the math)')
    assert main.speed_hint(main.parse_option(['--cfg', TINY])[1], cpu) is None
    assert main.speed_hint(main.parse_option(['--cfg', TINY, '--throughput'])[1], cuda) is None
    mlp_cfg = os.path.join(ROOT, 'configs/swinmlp/swin_mlp_tiny_c24_patch4_window8_256.yaml')
    mlp = main.speed_hint(main.parse_option(['--cfg', mlp_cfg] + best[:1] + best[2:] + ['--compile'])[1], cuda)
    assert mlp is None
