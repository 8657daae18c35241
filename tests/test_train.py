"""main.py end to end in subprocesses: train -> checkpoint -> resume -> eval, DDP on CPU, errors."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CFG = os.path.join(ROOT, 'configs/demo/swin_micro_shapes10.yaml')
# Small and quick: 160 training images, batch 16 -> 10 steps an epoch.
FAST = ['DATA.BATCH_SIZE', '16', 'DATA.NUM_WORKERS', '1', 'TRAIN.WARMUP_EPOCHS', '1', 'PRINT_FREQ', '5']


def run_main(args, cwd=ROOT, launcher=(), expect_ok=True, env=None):
    cmd = list(launcher or [sys.executable]) + ['main.py'] + args
    e = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    e.pop('TRITON_INTERPRET', None)
    e.update(env or {})
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=e)
    out = p.stdout + p.stderr
    if expect_ok:
        assert p.returncode == 0, out[-4000:]
    else:
        assert p.returncode != 0, out[-4000:]
    return out


def result(out: str) -> dict:
    lines = [l for l in out.splitlines() if l.startswith('RESULT ')]
    assert lines, out[-3000:]
    return json.loads(lines[-1][len('RESULT '):])


def epoch_losses(out: str) -> dict:
    losses = {}
    for line in out.splitlines():
        if 'training takes' in line:
            parts = line.split()
            losses[int(parts[parts.index('EPOCH') + 1])] = parts[-1]
    return losses


def test_train_checkpoint_resume_eval(demo_data, tmp_path):
    base = ['--cfg', DEMO_CFG, '--data-path', demo_data]
    out = run_main(base + ['--output', str(tmp_path / 'a'), '--opts', 'TRAIN.EPOCHS', '2'] + FAST)
    run_dir = tmp_path / 'a' / 'swin_micro_shapes10' / 'default'
    for f in ('ckpt_epoch_0.pth', 'ckpt_epoch_1.pth', 'ckpt_best.pth', 'config.json', 'log_rank0.txt'):
        assert (run_dir / f).exists(), f
    full = epoch_losses(out)
    assert set(full) == {0, 1}
    for tag in ('grad_norm', 'lr', 'eta', 'mem', 'Acc@1', 'Acc@5', 'Max accuracy'):
        assert tag in out

    ckpt = torch.load(run_dir / 'ckpt_epoch_0.pth', map_location='cpu', weights_only=True)
    assert {'model', 'optimizer', 'lr_scheduler', 'max_accuracy', 'scaler', 'epoch', 'config'} <= set(ckpt)
    assert ckpt['epoch'] == 0 and 'layers.0.blocks.1.attn_mask' in ckpt['model']

    # Resume from epoch 0 in another folder: epoch 1 must repeat the uninterrupted run's loss.
    out = run_main(base + ['--output', str(tmp_path / 'b'), '--resume', str(run_dir / 'ckpt_epoch_0.pth'),
                           '--opts', 'TRAIN.EPOCHS', '2'] + FAST)
    resumed = epoch_losses(out)
    assert set(resumed) == {1}
    assert resumed[1] == full[1]

    # Auto-resume: rerunning in the finished folder trains nothing more.
    out = run_main(base + ['--output', str(tmp_path / 'a'), '--opts', 'TRAIN.EPOCHS', '2'] + FAST)
    assert 'auto resuming from' in out and 'ckpt_epoch_1.pth' in out and epoch_losses(out) == {}

    # --eval of an explicit checkpoint is never overridden by auto-resume.
    out = run_main(base + ['--output', str(tmp_path / 'a'), '--eval', '--resume', str(run_dir / 'ckpt_best.pth'),
                           '--opts'] + FAST)
    r = result(out)
    assert 'auto resuming' not in out and 0.0 <= r['acc1'] <= 100.0 and r['acc5'] >= r['acc1']


def test_throughput_says_its_precision(demo_data, tmp_path):
    out = run_main(['--cfg', DEMO_CFG, '--data-path', demo_data, '--output', str(tmp_path), '--throughput',
                    '--opts'] + FAST)
    assert result(out)['throughput'] > 0 and '(precision: O0 fp32)' in out


@pytest.mark.parametrize('launcher', ['torchrun', 'distributed.launch'])
def test_two_process_cpu_ddp(demo_data, tmp_path, launcher):
    if launcher == 'torchrun':
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29511']
    else:
        cmd = [sys.executable, '-m', 'torch.distributed.launch', '--nproc_per_node', '2', '--master_port', '29512']
    # the no_sync path; O2: DDP makes the half copy it wraps the same on every rank, the fp32 master
    # weights must be made so before the copy (main.py refuses to train replicas that start apart)
    extra, opts = ((['--accumulation-steps', '2'], []) if launcher != 'torchrun' else
                   (['--amp-opt-level', 'O2'], ['AMP_ENABLE', 'True', 'AMP_DTYPE', 'bfloat16']))
    out = run_main(['--cfg', DEMO_CFG, '--data-path', demo_data, '--output', str(tmp_path)] + extra +
                   ['--opts'] + opts + ['TRAIN.EPOCHS', '1', 'DATA.BATCH_SIZE', '8', 'DATA.NUM_WORKERS', '0'],
                   launcher=cmd)
    # Exact validation over both ranks: every one of the 40 images counted once.
    assert '40 images)' in out and 'weights differ' not in out
    assert (tmp_path / 'swin_micro_shapes10' / 'default' / 'ckpt_epoch_0.pth').exists()


def _gloo_rank(target, rank_, path, results):
    import torch.distributed as dist
    sys.path.insert(0, ROOT)
    dist.init_process_group('gloo', init_method=f'file://{path}', rank=rank_, world_size=2)
    # plain Python values through the queue: a tensor would travel as a shared-memory handle that
    # dies with this process, which may exit before the parent reads it
    results.put((rank_, target(rank_)))
    dist.destroy_process_group()


def on_two_gloo_ranks(target, tmp_path) -> dict:
    """target(rank) in two spawned processes joined as a gloo group -> {rank: what it returned}."""
    ctx = torch.multiprocessing.get_context('spawn')
    results = ctx.Queue()
    procs = [ctx.Process(target=_gloo_rank, args=(target, r, str(tmp_path / 'store'), results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    return got


def _replicas(rank_):
    from utils import broadcast_weights, replicas_differ
    torch.manual_seed(rank_)                           # each rank its own initialisation, as main.py seeds
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    found = [replicas_differ(model)]
    broadcast_weights(model)
    found.append(replicas_differ(model))
    with torch.no_grad():
        if rank_ == 1:
            model[1].bias[2] += 1e-6                   # one element of one tensor, barely
    found.append(replicas_differ(model))
    with torch.no_grad():
        model[1].bias.fill_(float('nan'))              # NaN on both ranks: the same, not a difference
    found.append(replicas_differ(model))
    return found


def test_replicas_check_and_broadcast(tmp_path):
    """utils.broadcast_weights makes two gloo ranks' weights equal; replicas_differ names the first
    tensor that differs, however little."""
    for found in on_two_gloo_ranks(_replicas, tmp_path).values():
        assert found[0] is not None and found[0].startswith('0.weight')
        assert found[1] is None
        assert found[2] is not None and found[2].startswith('1.bias')
        assert found[3] is None


def test_missing_data_path_is_a_clear_error(tmp_path):
    out = run_main(['--cfg', DEMO_CFG, '--data-path', str(tmp_path / 'nowhere'), '--output', str(tmp_path)],
                   expect_ok=False)
    assert 'data folder not found' in out and 'ImageFolder' in out


def test_corrupt_image_is_named(demo_data, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(demo_data, data)
    bad = data / 'train' / 'circle' / 'broken.png'
    bad.write_bytes(b'not an image at all')
    out = run_main(['--cfg', DEMO_CFG, '--data-path', str(data), '--output', str(tmp_path / 'o'),
                    '--opts', 'TRAIN.EPOCHS', '1'] + FAST, expect_ok=False)
    assert 'cannot read image' in out and 'broken.png' in out


def test_checkpoint_of_another_architecture_is_rejected(demo_data, tmp_path):
    from models.swin_transformer import SwinTransformer
    other = SwinTransformer(img_size=32, patch_size=2, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                            window_size=4, num_classes=10)
    torch.save({'model': other.state_dict()}, tmp_path / 'other.pth')
    out = run_main(['--cfg', DEMO_CFG, '--data-path', demo_data, '--output', str(tmp_path), '--eval',
                    '--resume', str(tmp_path / 'other.pth'), '--opts'] + FAST, expect_ok=False)
    assert 'does not fit this model' in out and 'shape mismatch' in out


def test_num_classes_mismatch_is_an_error(demo_data, tmp_path):
    out = run_main(['--cfg', DEMO_CFG, '--data-path', demo_data, '--output', str(tmp_path),
                    '--opts', 'MODEL.NUM_CLASSES', '7'] + FAST, expect_ok=False)
    assert 'MODEL.NUM_CLASSES is 7 but the dataset has 10 classes' in out


def test_finetune_from_pretrained(demo_data, tmp_path):
    """--pretrained from a checkpoint with another class count: head re-initialised, rest loaded."""
    from models.swin_transformer import SwinTransformer
    src = SwinTransformer(img_size=32, patch_size=2, embed_dim=48, depths=(2, 2), num_heads=(3, 6),
                          window_size=4, num_classes=5)
    torch.save({'model': src.state_dict()}, tmp_path / 'pre.pth')
    out = run_main(['--cfg', DEMO_CFG, '--data-path', demo_data, '--output', str(tmp_path / 'o'),
                    '--pretrained', str(tmp_path / 'pre.pth'), '--opts', 'TRAIN.EPOCHS', '1'] + FAST)
    assert 'head re-initialised' in out and 'loaded successfully' in out


def test_compile_flag_trains(demo_data, tmp_path):
    """--compile through main.py (inductor on the CPU; on CUDA it also compiles around our custom ops)."""
    out = run_main(['--cfg', DEMO_CFG, '--data-path', demo_data, '--output', str(tmp_path), '--compile',
                    '--opts', 'TRAIN.EPOCHS', '1'] + FAST)
    assert 'torch.compile, mode default' in out and 'EPOCH 0 training takes' in out


def test_kill_and_resume_repeats_the_uninterrupted_losses(demo_data, tmp_path):
    """SIGKILL a run once its first checkpoint exists; rerunning the same command auto-resumes and
    every epoch after the checkpoint has the uninterrupted run's loss."""
    import signal
    import time
    base = ['--cfg', DEMO_CFG, '--data-path', demo_data, '--opts', 'TRAIN.EPOCHS', '3'] + FAST
    full = epoch_losses(run_main(['--output', str(tmp_path / 'full')] + base))
    assert set(full) == {0, 1, 2}

    cmd = [sys.executable, 'main.py', '--output', str(tmp_path / 'killed')] + base
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env.pop('TRITON_INTERPRET', None)
    first = tmp_path / 'killed' / 'swin_micro_shapes10' / 'default' / 'ckpt_epoch_0.pth'
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not first.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert first.exists()
    out = run_main(['--output', str(tmp_path / 'killed')] + base)
    assert 'auto resuming from' in out
    resumed = epoch_losses(out)
    assert resumed and min(resumed) >= 1
    for epoch, loss in resumed.items():
        assert loss == full[epoch], (epoch, loss, full[epoch])


def test_old_upstream_checkpoint_with_pickled_config_evaluates(demo_data, tmp_path):
    """Upstream pickled its yacs CfgNode into checkpoints: such files still load for --eval."""
    from config import get_config
    from models.swin_transformer import SwinTransformer
    import argparse
    cfg = get_config(argparse.Namespace(cfg=DEMO_CFG, opts=None))
    model = SwinTransformer(img_size=32, patch_size=2, embed_dim=48, depths=(2, 2), num_heads=(3, 6),
                            window_size=4, num_classes=10)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith('attn_mask')}   # older files had none
    torch.save({'model': sd, 'config': cfg, 'epoch': 5, 'max_accuracy': 12.5}, tmp_path / 'old.pth')
    out = run_main(['--cfg', DEMO_CFG, '--data-path', demo_data, '--output', str(tmp_path), '--eval',
                    '--resume', str(tmp_path / 'old.pth'), '--opts'] + FAST)
    assert 'acc1' in result(out)


def test_ddp_resume_repeats_every_rank(demo_data, tmp_path):
    """2-process DDP: resuming from epoch 0 repeats epoch 1's loss, so every rank's random streams
    (drop path, augmentation) were restored, not only rank 0's."""
    def launch(port):
        return [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(port)]
    opts = ['--opts', 'TRAIN.EPOCHS', '2', 'DATA.BATCH_SIZE', '8', 'DATA.NUM_WORKERS', '0', 'TRAIN.WARMUP_EPOCHS', '1']
    base = ['--cfg', DEMO_CFG, '--data-path', demo_data]
    full = epoch_losses(run_main(base + ['--output', str(tmp_path / 'a')] + opts, launcher=launch(29521)))
    ckpt = tmp_path / 'a' / 'swin_micro_shapes10' / 'default' / 'ckpt_epoch_0.pth'
    assert len(torch.load(ckpt, map_location='cpu', weights_only=True)['rng']) == 2
    resumed = epoch_losses(run_main(base + ['--output', str(tmp_path / 'b'), '--resume', str(ckpt)] + opts,
                                    launcher=launch(29522)))
    assert set(resumed) == {1} and resumed[1] == full[1]


def test_zip_part_cache_trains(demo_data, tmp_path):
    """--zip --cache-mode part through main.py, upstream's zip layout built from the demo data."""
    from test_parity import _zip_split
    for split in ('train', 'val'):
        _zip_split(demo_data, str(tmp_path), split)
    out = run_main(['--cfg', DEMO_CFG, '--data-path', str(tmp_path), '--zip', '--cache-mode', 'part',
                    '--output', str(tmp_path / 'o'), '--opts', 'TRAIN.EPOCHS', '1'] + FAST)
    assert 'EPOCH 0 training takes' in out and '40 images)' in out


def test_tensorboard_scalars(demo_data, tmp_path):
    """EXTRA.TENSORBOARD writes per-epoch scalars that read back with tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_main(['--cfg', DEMO_CFG, '--data-path', demo_data, '--output', str(tmp_path),
              '--opts', 'TRAIN.EPOCHS', '2', 'EXTRA.TENSORBOARD', 'True'] + FAST)
    acc = EventAccumulator(str(tmp_path / 'swin_micro_shapes10' / 'default' / 'tensorboard'))
    acc.Reload()
    assert {'train/loss', 'val/acc1', 'val/loss', 'train/lr'} <= set(acc.Tags()['scalars'])
    assert [e.step for e in acc.Scalars('val/acc1')] == [0, 1]
    # the convergence plot reads its curves from these scalars, and they agree with the text log
    sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
    import convergence
    run_dir = str(tmp_path / 'swin_micro_shapes10' / 'default')
    from_tb = convergence.read_curves(run_dir, 'demo', 0)
    from_log = convergence.parse_log(os.path.join(run_dir, 'log_rank0.txt'), 'demo', 0)
    assert [r['epoch'] for r in from_tb] == [0, 1]
    for a, b in zip(from_tb, from_log):
        assert abs(a['train_loss'] - b['train_loss']) < 1e-3 and abs(a['val_acc1'] - b['val_acc1']) < 1e-2


def test_compile_with_ddp(demo_data, tmp_path):
    """--compile under 2-process DDP (gloo on the CPU)."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29531']
    out = run_main(['--cfg', DEMO_CFG, '--data-path', demo_data, '--output', str(tmp_path), '--compile',
                    '--opts', 'TRAIN.EPOCHS', '1', 'DATA.BATCH_SIZE', '8', 'DATA.NUM_WORKERS', '0'], launcher=cmd)
    assert 'torch.compile, mode default' in out and 'EPOCH 0 training takes' in out and '40 images)' in out


@pytest.mark.parametrize('optim', ['fused_adam', 'fused_lamb'])
def test_fused_optimizers_train_and_resume_across_optimizers(demo_data, tmp_path, optim):
    """The Triton optimizer kernels (interpreter on the CPU) through main.py at O2 bf16; the
    checkpoint resumes under the other implementation (torch's AdamW / our reference LAMB)."""
    base = ['--cfg', DEMO_CFG, '--data-path', demo_data, '--amp-opt-level', 'O2']
    out = run_main(base + ['--output', str(tmp_path / 'a'), '--optim', optim, '--kernel-backend', 'triton',
                           '--opts', 'TRAIN.EPOCHS', '1', 'AMP_ENABLE', 'True', 'AMP_DTYPE', 'bfloat16'] + FAST,
                   env={'TRITON_INTERPRET': '1'})
    assert 'EPOCH 0 training takes' in out and 'nan' not in epoch_losses(out)[0]
    ckpt = tmp_path / 'a' / 'swin_micro_shapes10' / 'default' / 'ckpt_epoch_0.pth'
    state = torch.load(ckpt, map_location='cpu', weights_only=True)['optimizer']
    if optim == 'fused_adam':
        assert {float(s['step']) for s in state['state'].values()} == {10.0}
    else:
        assert [float(g['step']) for g in state['param_groups']] == [10.0, 10.0]
    other = 'adamw' if optim == 'fused_adam' else 'fused_lamb'
    out = run_main(base + ['--output', str(tmp_path / 'b'), '--resume', str(ckpt), '--optim', other,
                           '--kernel-backend', 'torch', '--opts', 'TRAIN.EPOCHS', '2', 'AMP_ENABLE', 'True',
                           'AMP_DTYPE', 'bfloat16'] + FAST)
    assert set(epoch_losses(out)) == {1}
