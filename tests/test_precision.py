"""Precision levels O0-O3 (amp.py): each trains the same model with a loss curve close to O0's,
O2 keeps fp32 master weights, and checkpoints are fp32 in the standard layout at every level."""
import pytest
import torch

from amp import Precision
from conftest import DEVICE
from models.swin_transformer import SwinTransformer
from optimizer import param_groups
from utils import model_state_fp32

SMALL = dict(img_size=32, patch_size=2, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4,
             num_classes=10, drop_path_rate=0.0)


def _train(level, dtype, steps=25):
    torch.manual_seed(0)
    precision = Precision(level, dtype, torch.device(DEVICE))
    model, master = precision.prepare(SwinTransformer(**SMALL).to(DEVICE))
    opt = torch.optim.AdamW(param_groups(master, 0.05), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    # A learnable task: the label is which quadrant holds the bright square.
    losses = []
    for _ in range(steps):
        y = torch.randint(0, 4, (16,), generator=g)
        x = torch.randn(16, 3, 32, 32, generator=g) * 0.1
        for i, q in enumerate(y.tolist()):
            r, c = divmod(q, 2)
            x[i, :, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] += 1.0
        x, y = precision.cast_input(x.to(DEVICE)), y.to(DEVICE)
        with precision.autocast():
            out = model(x)
        loss = torch.nn.functional.cross_entropy(out.float(), y)
        precision.backward(loss)
        precision.step(opt, master.parameters(), 5.0)
        precision.zero_grad(opt, model)
        losses.append(loss.item())
    return losses, model, master


@pytest.fixture(scope='module')
def o0_losses():
    return _train('O0', 'float16')[0]


# (level, dtype, tolerance on the mean |loss - O0 loss| over the last 10 steps, while the loss falls
# from ~2.4 to ~1.5). Measured on the CPU: O1 4e-4, O2 3e-4, O3 4e-3 (bf16).
LEVELS = [('O1', 'bfloat16', 0.02), ('O2', 'bfloat16', 0.02), ('O3', 'bfloat16', 0.05),
          ('O1', 'float16', 0.01), ('O2', 'float16', 0.01)]


@pytest.mark.parametrize('level,dtype,tol', LEVELS)
def test_levels_track_o0(o0_losses, level, dtype, tol):
    losses, model, master = _train(level, dtype)
    assert o0_losses[-1] < o0_losses[0] * 0.7, 'the task must be learned for the comparison to mean anything'
    gap = sum(abs(a - b) for a, b in zip(losses[-10:], o0_losses[-10:])) / 10
    assert gap < tol, (gap, losses[-10:], o0_losses[-10:])
    half = {'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    if level == 'O2':
        assert next(model.parameters()).dtype == half and next(master.parameters()).dtype == torch.float32
        # the half model is the rounded master
        for p, pm in zip(model.parameters(), master.parameters()):
            assert torch.equal(p, pm.to(half))
    if level == 'O3':
        assert next(model.parameters()).dtype == half
    sd = model_state_fp32(master)
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    SwinTransformer(**SMALL).load_state_dict(sd, strict=True)


def test_bad_level_is_rejected():
    with pytest.raises(ValueError, match='O4'):
        Precision('O4')
