#!/usr/bin/env bash
# DDP scaling of main.py itself: Swin-T, synthetic data, batch 128 per GPU, 1 GPU vs N GPUs.
#   bash benchmarks/scaling.sh N [extra main.py flags]
set -uo pipefail
cd "$(dirname "$0")/.."
N=${1:-2}; shift || true
COMMON=(--cfg configs/swin/swin_tiny_patch4_window7_224.yaml --output /tmp/scaling "$@")
OPTS=(DATA.DATASET synthetic TRAIN.EPOCHS 1 TRAIN.AUTO_RESUME False EXTRA.SYNTHETIC_VAL_SIZE 512 PRINT_FREQ 1000)
echo "== 1 GPU $*"
CUDA_VISIBLE_DEVICES=0 python3 main.py "${COMMON[@]}" --tag g1 --opts "${OPTS[@]}" EXTRA.SYNTHETIC_TRAIN_SIZE 7680 2>&1 | grep -E "EPOCH|Error"
echo "== $N GPUs $*"
python3 -m torch.distributed.run --nproc_per_node "$N" main.py "${COMMON[@]}" --tag g$N \
  --opts "${OPTS[@]}" EXTRA.SYNTHETIC_TRAIN_SIZE $((7680 * N)) 2>&1 | grep -E "EPOCH|Error"
