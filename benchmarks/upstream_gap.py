"""Why our reference path trains faster than an earlier measurement of upstream's code on an H100
(1445 img/s, Swin-T, O1 fp16): the same reference model and step, adding what upstream's training loop
does per step, one at a time.

    python benchmarks/upstream_gap.py
"""
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from bench_train import MODELS
from common import cuda_time_ms, environment, write_results

from amp import Precision
from models.swin_transformer import SwinTransformer
from optimizer import param_groups


def measure(sync_per_step: bool, mixup: bool, batch: int = 128) -> float:
    torch.manual_seed(0)
    precision = Precision('O1', 'float16', torch.device('cuda'))
    model, master = precision.prepare(SwinTransformer(**MODELS['tiny']).cuda())
    opt = torch.optim.AdamW(param_groups(master, 0.05), lr=1e-4)
    mixup_fn = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=1000) if mixup else None
    criterion = SoftTargetCrossEntropy() if mixup else torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    x0 = torch.randn(batch, 3, 224, 224, device='cuda')
    y0 = torch.randint(0, 1000, (batch,), device='cuda')
    model.train()

    def step():
        x, y = (mixup_fn(x0, y0) if mixup_fn else (x0, y0))
        with precision.autocast():
            out = model(x)
            loss = criterion(out, y)           # upstream computes the loss inside autocast
        precision.backward(loss)
        norm = precision.step(opt, master.parameters(), 5.0)
        precision.zero_grad(opt, model)
        if sync_per_step:                      # upstream: synchronize, loss.item(), grad norm, scale
            torch.cuda.synchronize()
            loss.item(), float(norm), precision.get_scale()

    return batch / cuda_time_ms(step, warmup=10, iters=30) * 1e3


def main():
    rows = []
    for sync, mix in [(False, False), (True, False), (False, True), (True, True)]:
        rows.append({'per-step syncs (upstream loop)': sync, 'mixup + soft-target CE (upstream default)': mix,
                     'img/s': measure(sync, mix)})
        print(rows[-1], flush=True)
    print(write_results('upstream_gap', rows, list(rows[0]), environment()))


if __name__ == '__main__':
    main()
