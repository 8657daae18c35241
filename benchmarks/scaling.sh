#!/usr/bin/env bash
# DDP scaling of main.py itself: Swin-T, batch 128 per GPU, 1 GPU vs N GPUs; synthetic data, or with
# DATA_PATH set a JPEG folder through --data-pipeline gpu (WORKERS DataLoader workers a rank, default 12;
# one epoch over the folder each, so N GPUs take 1/N of the steps each); EXTRA_OPTS: more --opts pairs.
#   bash benchmarks/scaling.sh N [extra main.py flags]
#   DATA_PATH=/tmp/bench_jpeg bash benchmarks/scaling.sh 2 --fused_window_process ...
set -uo pipefail
cd "$(dirname "$0")/.."
N=${1:-2}; shift || true
COMMON=(--cfg configs/swin/swin_tiny_patch4_window7_224.yaml --output /tmp/scaling "$@")
OPTS=(TRAIN.EPOCHS 1 TRAIN.AUTO_RESUME False PRINT_FREQ 1000 ${EXTRA_OPTS:-})
if [ -n "${DATA_PATH:-}" ]; then
  COMMON+=(--data-path "$DATA_PATH" --data-pipeline gpu)
  OPTS+=(DATA.NUM_WORKERS "${WORKERS:-12}")
  ONE=(); MANY=()
else
  OPTS+=(DATA.DATASET synthetic EXTRA.SYNTHETIC_VAL_SIZE 512)
  ONE=(EXTRA.SYNTHETIC_TRAIN_SIZE 7680); MANY=(EXTRA.SYNTHETIC_TRAIN_SIZE $((7680 * N)))
fi
echo "== 1 GPU $* ${DATA_PATH:-synthetic}"
CUDA_VISIBLE_DEVICES=0 python3 main.py "${COMMON[@]}" --tag g1 --opts "${OPTS[@]}" "${ONE[@]}" 2>&1 | grep -E "EPOCH|Error"
echo "== $N GPUs $* ${DATA_PATH:-synthetic}"
python3 -m torch.distributed.run --nproc_per_node "$N" main.py "${COMMON[@]}" --tag g$N \
  --opts "${OPTS[@]}" "${MANY[@]}" 2>&1 | grep -E "EPOCH|Error"
