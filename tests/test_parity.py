"""Upstream parity: --pretrained adaptation (windows, resolution, 22k head), --zip with every
cache mode, activation checkpointing, and the non-finite-loss stop."""
import io
import os
import zipfile

import pytest
import torch

import main
from data.build import build_dataset
from models.swin_transformer import SwinTransformer
from utils import (CheckpointError, adapt_pretrained_state, imagenet_22k_to_1k_indices, load_model_state,
                   save_checkpoint)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CFG = os.path.join(ROOT, 'configs/demo/swin_micro_shapes10.yaml')
ARCH = dict(embed_dim=32, depths=(2, 2), num_heads=(2, 4), drop_path_rate=0.0)


def test_22k_to_1k_map():
    idx = imagenet_22k_to_1k_indices()
    assert len(idx) == 1000 and len(set(idx)) == 1000
    assert idx[850] == 5564                      # n04399382 (teddy bear), absent from the 22k list
    assert all(0 <= i < 21841 for i in idx)
    from importlib import resources
    info = resources.files('timm.data') / '_info'
    synsets_1k = (info / 'imagenet_synsets.txt').read_text().split()
    synsets_22k = (info / 'imagenet21k_goog_synsets.txt').read_text().split()
    assert synsets_1k[850] == 'n04399382' and 'n04399382' not in synsets_22k
    assert all(synsets_22k[idx[i]] == s for i, s in enumerate(synsets_1k) if i != 850)


def test_pretrained_w7_224_22k_to_w12_384_1k():
    torch.manual_seed(0)
    src = SwinTransformer(img_size=224, window_size=7, num_classes=21841, **ARCH)
    dst = SwinTransformer(img_size=384, window_size=12, num_classes=1000, **ARCH)
    sd, notes = adapt_pretrained_state(src.state_dict(), dst)
    assert not any(k.endswith(('relative_position_index', 'attn_mask')) for k in sd)
    dst.load_state_dict(sd, strict=False)
    t = 'layers.0.blocks.0.attn.relative_position_bias_table'
    assert dst.state_dict()[t].shape == (23 * 23, 2)
    # bicubic resize keeps the table's centre value (zero offset) close and changes the grid
    assert torch.allclose(dst.state_dict()[t].view(23, 23, 2)[11, 11], src.state_dict()[t].view(13, 13, 2)[6, 6],
                          atol=0.02)
    assert torch.equal(dst.head.weight, src.head.weight[imagenet_22k_to_1k_indices()])
    assert torch.equal(dst.layers[1].blocks[1].mlp.fc2.weight, src.layers[1].blocks[1].mlp.fc2.weight)
    assert any('21841 -> 1000' in n for n in notes) and any('bicubic' in n for n in notes)
    with torch.no_grad():
        assert torch.isfinite(dst(torch.randn(1, 3, 384, 384))).all()


def test_pretrained_other_class_count_reinitialises_head():
    src = SwinTransformer(img_size=224, num_classes=21841, **ARCH)
    dst = SwinTransformer(img_size=224, num_classes=10, **ARCH)
    fresh = dst.head.weight.clone()
    sd, notes = adapt_pretrained_state(src.state_dict(), dst)
    load_model_state(dst, sd, 'pretrained')          # strict, but for the recomputed buffers
    assert torch.equal(dst.head.weight, fresh) and any('re-initialised' in n for n in notes)
    assert torch.equal(dst.patch_embed.proj.weight, src.patch_embed.proj.weight)


def test_pretrained_of_another_embed_dim_is_rejected(tmp_path):
    src = SwinTransformer(img_size=224, embed_dim=48, depths=(2, 2), num_heads=(2, 4))
    dst = SwinTransformer(img_size=224, **ARCH)
    sd, _ = adapt_pretrained_state(src.state_dict(), dst)
    with pytest.raises(CheckpointError, match='shape mismatch'):
        load_model_state(dst, sd, 'pretrained')


def _zip_split(src_dir, dst_dir, split):
    classes = sorted(os.listdir(os.path.join(src_dir, split)))
    with zipfile.ZipFile(os.path.join(dst_dir, f'{split}.zip'), 'w') as z, \
            open(os.path.join(dst_dir, f'{split}_map.txt'), 'w') as m:
        for label, cls in enumerate(classes):
            for f in sorted(os.listdir(os.path.join(src_dir, split, cls))):
                z.write(os.path.join(src_dir, split, cls, f), f'{cls}/{f}')
                m.write(f'{cls}/{f}\t{label}\n')


@pytest.mark.parametrize('cache_mode', ['no', 'part', 'full'])
def test_zip_dataset_every_cache_mode(demo_data, tmp_path, cache_mode):
    for split in ('train', 'val'):
        _zip_split(demo_data, str(tmp_path), split)
    args, config = main.parse_option(['--cfg', DEMO_CFG, '--data-path', str(tmp_path), '--zip',
                                      '--cache-mode', cache_mode, '--output', str(tmp_path / 'o')])
    ds, n_classes = build_dataset(True, config)
    assert n_classes == 10 and len(ds) == 160
    img, label = ds[17]
    assert img.shape == (3, 32, 32) and 0 <= label < 10
    expected_cached = {'no': 0, 'part': 160, 'full': 160}[cache_mode]   # one rank: its shard is all
    assert len(ds._cache) == expected_cached


def test_zip_tiny_dataset_with_cache(tmp_path):
    """Fewer than 10 samples (upstream's cache crashed there)."""
    from data.zipdata import ZipImageDataset
    from PIL import Image
    with zipfile.ZipFile(tmp_path / 'val.zip', 'w') as z:
        for i in range(3):
            buf = io.BytesIO()
            Image.new('RGB', (8, 8), (i * 80, 0, 0)).save(buf, 'PNG')
            z.writestr(f'c{i}/{i}.png', buf.getvalue())
    (tmp_path / 'val_map.txt').write_text(''.join(f'c{i}/{i}.png\t{i}\n' for i in range(3)))
    ds = ZipImageDataset(str(tmp_path), 'val', None, cache_mode='part')
    assert len(ds) == 3 and ds[2][0].getpixel((0, 0)) == (160, 0, 0) and ds[2][1] == 2


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = SwinTransformer(img_size=32, patch_size=2, window_size=4, num_classes=10, **ARCH)
    b = SwinTransformer(img_size=32, patch_size=2, window_size=4, num_classes=10, use_checkpoint=True, **ARCH)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    a(x).sum().backward()
    b(x).sum().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


@pytest.mark.parametrize('optimizer', ['adamw', 'fused_adam'])
def test_non_finite_loss_stops_and_keeps_the_checkpoint(demo_data, tmp_path, optimizer):
    """adamw: the loss is read before the backward and the step skipped on the host; fused_adam: the
    optimizer skips on the device and the loss is read a step later (StepValues)."""
    from amp import Precision
    from data import build_loader
    from logger import create_logger
    from lr_scheduler import build_scheduler
    from models import build_model
    from optimizer import build_optimizer
    args, config = main.parse_option(['--cfg', DEMO_CFG, '--data-path', demo_data, '--output', str(tmp_path),
                                      '--opts', 'DATA.BATCH_SIZE', '16', 'DATA.NUM_WORKERS', '0',
                                      'EXTRA.MAX_NONFINITE_STEPS', '3', 'AMP_ENABLE', 'False',
                                      'TRAIN.OPTIMIZER.NAME', optimizer])
    logger = create_logger(config.OUTPUT, 0, name=f'nonfinite_{optimizer}')
    _, _, loader, _, mixup = build_loader(config)
    model = build_model(config)
    precision = Precision('O0')
    opt = build_optimizer(config, model)
    sched = build_scheduler(config, opt, len(loader))
    path = save_checkpoint(config, 0, model, 0.0, opt, sched, precision, logger)
    with torch.no_grad():
        model.head.bias[0] = float('nan')          # a real model whose loss is NaN
    before = model.layers[0].blocks[0].mlp.fc1.weight.clone()
    with pytest.raises(main.NonFiniteLossError, match='3 consecutive non-finite losses'):
        main.train_one_epoch(config, model, torch.nn.CrossEntropyLoss(), loader, opt, 0, mixup, sched,
                             precision, model, logger)
    assert torch.equal(model.layers[0].blocks[0].mlp.fc1.weight, before)   # every step was skipped
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    assert torch.isfinite(ckpt['model']['head.bias']).all()


def test_first_log_line_shows_the_first_steps_values(demo_data, tmp_path):
    """With the fused optimizer a step's values are read a step late; the epoch's first log line
    (step 0) still shows step 0's loss and grad norm, not the empty meters' zeros."""
    import re
    from amp import Precision
    from data import build_loader
    from logger import create_logger
    from lr_scheduler import build_scheduler
    from models import build_model
    from optimizer import build_optimizer
    _, config = main.parse_option(['--cfg', DEMO_CFG, '--data-path', demo_data, '--output', str(tmp_path),
                                   '--opts', 'DATA.BATCH_SIZE', '16', 'DATA.NUM_WORKERS', '0', 'AMP_ENABLE',
                                   'False', 'TRAIN.OPTIMIZER.NAME', 'fused_adam', 'PRINT_FREQ', '2'])
    logger = create_logger(config.OUTPUT, 0, name='first_line')
    _, _, loader, _, mixup = build_loader(config)
    model = build_model(config)
    opt = build_optimizer(config, model)
    assert main.is_fused(opt)
    main.train_one_epoch(config, model, torch.nn.CrossEntropyLoss(), loader, opt, 0, mixup,
                         build_scheduler(config, opt, len(loader)), Precision('O0'), model, logger)
    log = open(os.path.join(config.OUTPUT, 'log_rank0.txt')).read()
    lines = re.findall(r'Train: \[0/\d+\]\[(\d+)/\d+\].*?loss ([\d.]+) \(([\d.]+)\)\s+grad_norm ([\d.]+)', log)
    assert [int(m[0]) for m in lines][:2] == [0, 2], lines
    for _, val, avg, norm in lines:
        assert float(val) > 1.0 and float(avg) > 1.0 and float(norm) > 0.0, lines


@pytest.mark.parametrize('device', ['cpu', 'cuda'])
def test_step_values_keep_what_the_step_computed(device):
    """main.StepValues copies a step's values when made (on CUDA to pinned memory behind the step's
    work): a graph replay or the next step may overwrite the tensors before they are read."""
    if device == 'cuda' and not torch.cuda.is_available():
        pytest.skip('needs CUDA')
    loss, finite = torch.tensor(2.5, device=device), torch.ones(1, device=device)
    norm, scale = torch.tensor(0.75, device=device), torch.tensor(1024., device=device)
    values = main.StepValues(7, 16, loss, finite, norm, scale)
    plain = main.StepValues(8, 16, loss, finite)
    for t in (loss, finite, norm, scale):
        t.fill_(float('nan'))                   # what the next replay would do to its outputs
    assert values.read() == (2.5, 1.0, 0.75, 1024.0)
    read = plain.read()
    assert read[:2] == (2.5, 1.0) and all(v != v for v in read[2:])       # no norm, no scale: nan
    assert (values.step, values.n) == (7, 16)


def test_shard_samplers():
    from data.samplers import ShardSampler
    # validation: every index exactly once across 3 ranks, uneven counts allowed
    shards = [list(ShardSampler(10, 3, r)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10)) and [len(s) for s in shards] == [4, 3, 3]
    # zip + part cache: a rank keeps its shard every epoch, in a new order
    s = ShardSampler(20, 2, 1, shuffle=True, fixed_shard=True)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(e0) == sorted(e1) == list(range(1, 20, 2)) and e0 != e1
