"""Loading a checkpoint never runs code from it; --eval / --throughput need only a val split.

Every entry point that reads a checkpoint (--resume, --eval --resume, --pretrained, auto-resume,
utils.read_checkpoint) is fed files whose unpickling would create a marker file: a raw pickle and a
torch.save zip, each with the code-running object at the top level and nested in the state dict.
Each must be refused in a subprocess with a non-zero exit, one clear last line, no marker, and
(for explicit paths) nothing written to the output folder.
"""
import os
import pickle
import shutil

import pytest
import torch

from test_train import DEMO_CFG, FAST, epoch_losses, result, run_main


class _RunsCode:
    """Unpickling this calls os.system(command)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _malicious_files(folder, marker) -> dict:
    """{name: path} of four files that would create `marker` if fully unpickled."""
    evil = _RunsCode(f'touch {marker}')
    good = {'layers.0.weight': torch.randn(3)}
    files = {}
    raw_top, raw_nested = folder / 'raw_top.pth', folder / 'raw_nested.pth'
    raw_top.write_bytes(pickle.dumps(evil, protocol=2))
    # (plain pickle would reach a tensor through torch.storage._load_from_bytes, refused first)
    raw_nested.write_bytes(pickle.dumps({'model': {'layers.0.weight': [1.0, 2.0], 'evil': evil}}, protocol=2))
    files['raw_top'], files['raw_nested'] = raw_top, raw_nested
    torch.save(evil, folder / 'zip_top.pth')
    torch.save({'model': dict(good, evil=evil), 'epoch': 3}, folder / 'zip_nested.pth')
    files['zip_top'], files['zip_nested'] = folder / 'zip_top.pth', folder / 'zip_nested.pth'
    return files


def _last_line(out: str) -> str:
    return [l for l in out.splitlines() if l.strip()][-1]


def test_read_checkpoint_refuses_code_in_process(tmp_path):
    from utils import CheckpointError, read_checkpoint
    marker = tmp_path / 'PWNED'
    for name, path in _malicious_files(tmp_path, marker).items():
        with pytest.raises(CheckpointError, match='refused to load') as e:
            read_checkpoint(str(path))
        assert str(path) in str(e.value) and 'system' in str(e.value), name
        assert not marker.exists(), name


@pytest.mark.parametrize('entry', ['resume', 'eval_resume', 'pretrained', 'auto_resume'])
def test_malicious_checkpoint_refused_by_every_entry_point(demo_data, tmp_path, entry):
    marker = tmp_path / 'PWNED'
    (tmp_path / 'files').mkdir()
    files = _malicious_files(tmp_path / 'files', marker)
    # raw and zip formats on every entry point would take ~16 subprocesses: each entry point gets
    # both formats, alternating which one carries the object nested.
    picks = ['raw_top', 'zip_nested'] if entry in ('resume', 'pretrained') else ['raw_nested', 'zip_top']
    for name in picks:
        out_dir = tmp_path / f'out_{name}'
        run_dir = out_dir / 'swin_micro_shapes10' / 'default'
        args = ['--cfg', DEMO_CFG, '--data-path', demo_data, '--output', str(out_dir)]
        if entry == 'resume':
            args += ['--resume', str(files[name])]
        elif entry == 'eval_resume':
            args += ['--eval', '--resume', str(files[name])]
        elif entry == 'pretrained':
            args += ['--pretrained', str(files[name])]
        else:
            run_dir.mkdir(parents=True)
            shutil.copy(files[name], run_dir / 'ckpt_epoch_5.pth')
        out = run_main(args + ['--opts', 'TRAIN.EPOCHS', '1'] + FAST, expect_ok=False)
        last = _last_line(out)
        assert not marker.exists(), (entry, name, out[-2000:])
        assert last.startswith('error: refused to load') and 'system' in last, (entry, name, last)
        assert 'Traceback' not in out, out[-2000:]
        if entry == 'auto_resume':
            assert sorted(os.listdir(run_dir)) == ['ckpt_epoch_5.pth'], os.listdir(run_dir)
        else:
            assert not out_dir.exists(), list(out_dir.rglob('*'))


def test_truncated_and_foreign_files_are_named(demo_data, tmp_path):
    from models.swin_transformer import SwinTransformer
    good = tmp_path / 'good.pth'
    torch.save({'model': SwinTransformer(img_size=32, patch_size=2, embed_dim=48, depths=(2, 2), num_heads=(3, 6),
                                         window_size=4, num_classes=10).state_dict()}, good)
    data = good.read_bytes()
    (tmp_path / 'truncated.pth').write_bytes(data[:len(data) // 2])
    (tmp_path / 'text.pth').write_text('this is not a checkpoint\n')
    for name in ('truncated.pth', 'text.pth'):
        path = tmp_path / name
        out = run_main(['--cfg', DEMO_CFG, '--data-path', demo_data, '--output', str(tmp_path / 'o'),
                        '--eval', '--resume', str(path), '--opts'] + FAST, expect_ok=False)
        last = _last_line(out)
        assert last.startswith('error: cannot read') and str(path) in last and 'truncated' in last, last
        assert 'Traceback' not in out and not (tmp_path / 'o').exists()


def _val_only(demo_data, tmp_path):
    data = tmp_path / 'valonly'
    shutil.copytree(os.path.join(demo_data, 'val'), data / 'val')
    return str(data)


def test_upstream_style_checkpoint_resumes_and_evaluates_with_val_only(demo_data, tmp_path):
    """A checkpoint laid out as upstream writes it (its 'config' a pickled yacs CfgNode, no 'rng')
    resumes training and evaluates; --eval and --throughput run on a folder with only val/."""
    import argparse
    from config import get_config
    base = ['--cfg', DEMO_CFG, '--data-path', demo_data]
    run_main(base + ['--output', str(tmp_path / 'a'), '--opts', 'TRAIN.EPOCHS', '1'] + FAST)
    ours = torch.load(tmp_path / 'a' / 'swin_micro_shapes10' / 'default' / 'ckpt_epoch_0.pth',
                      map_location='cpu', weights_only=True)
    upstream_style = {k: ours[k] for k in ('model', 'optimizer', 'lr_scheduler', 'max_accuracy', 'scaler', 'epoch')}
    upstream_style['config'] = get_config(argparse.Namespace(cfg=DEMO_CFG, opts=None))
    assert type(upstream_style['config']).__name__ == 'CfgNode'
    path = tmp_path / 'upstream.pth'
    torch.save(upstream_style, path)

    out = run_main(base + ['--output', str(tmp_path / 'b'), '--resume', str(path), '--opts', 'TRAIN.EPOCHS', '2']
                   + FAST)
    assert set(epoch_losses(out)) == {1}

    val_only = _val_only(demo_data, tmp_path)
    out = run_main(['--cfg', DEMO_CFG, '--data-path', val_only, '--output', str(tmp_path / 'c'), '--eval',
                    '--resume', str(path), '--opts'] + FAST)
    r = result(out)
    assert 0.0 <= r['acc1'] <= 100.0 and '40 images)' in out
    out = run_main(['--cfg', DEMO_CFG, '--data-path', val_only, '--output', str(tmp_path / 'd'), '--throughput',
                    '--opts'] + FAST)
    assert result(out)['throughput'] > 0
    # training still needs the train split, and says so in one line
    out = run_main(['--cfg', DEMO_CFG, '--data-path', val_only, '--output', str(tmp_path / 'e'), '--opts'] + FAST,
                   expect_ok=False)
    assert _last_line(out).startswith('error: data folder not found') and 'Traceback' not in out


def test_resume_keeps_the_best_checkpoint(demo_data, tmp_path):
    """Resuming an earlier epoch into the same folder must not let a worse model replace
    ckpt_best.pth: the run starts from the best accuracy already recorded there."""
    base = ['--cfg', DEMO_CFG, '--data-path', demo_data, '--output', str(tmp_path)]
    run_main(base + ['--opts', 'TRAIN.EPOCHS', '2'] + FAST)
    run_dir = tmp_path / 'swin_micro_shapes10' / 'default'
    best = torch.load(run_dir / 'ckpt_best.pth', map_location='cpu', weights_only=True)
    # Make the recorded best unbeatable, then resume epoch 0 into the same folder.
    best['max_accuracy'] = 100.0
    torch.save(best, run_dir / 'ckpt_best.pth')
    before = (run_dir / 'ckpt_best.pth').read_bytes()
    out = run_main(base + ['--resume', str(run_dir / 'ckpt_epoch_0.pth'), '--opts', 'TRAIN.EPOCHS', '2'] + FAST)
    assert 'Max accuracy: 100.00%' in out
    assert (run_dir / 'ckpt_best.pth').read_bytes() == before


def test_misspelled_model_switch_is_rejected():
    from models.swin_transformer import SwinTransformer
    with pytest.raises(TypeError, match='fused_layer_norm'):
        SwinTransformer(img_size=32, patch_size=2, embed_dim=48, depths=(2, 2), num_heads=(3, 6), window_size=4,
                        fused_layer_norm=True)


def test_zip_map_with_gappy_or_negative_labels_is_one_line(demo_data, tmp_path):
    from test_parity import _zip_split
    for split in ('train', 'val'):
        _zip_split(demo_data, str(tmp_path), split)
    lines = (tmp_path / 'train_map.txt').read_text().splitlines()
    for bad_label in ('-1', '12'):
        path, _ = lines[0].split('\t')
        (tmp_path / 'train_map.txt').write_text('\n'.join([f'{path}\t{bad_label}'] + lines[1:]) + '\n')
        out = run_main(['--cfg', DEMO_CFG, '--data-path', str(tmp_path), '--zip', '--output', str(tmp_path / 'o'),
                        '--opts', 'TRAIN.EPOCHS', '1'] + FAST, expect_ok=False)
        last = _last_line(out)
        assert last.startswith('error:') and 'labels must be 0..N-1' in last and 'Traceback' not in out, last
