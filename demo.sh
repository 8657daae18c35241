#!/usr/bin/env bash
# The demo: a virtual environment, the requirements, the generated 10-class shapes dataset,
# a short training run through main.py, then main.py --eval on the best checkpoint.
# Uses the GPU where there is one. Extra arguments go to the training run.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -r requirements.txt
PY="$VENV/bin/python"
CFG=configs/demo/swin_micro_shapes10.yaml
OUT=output/demo
"$PY" -m data.demo_dataset --out datasets/shapes10
"$PY" main.py --cfg "$CFG" --data-path datasets/shapes10 --output "$OUT" "$@"
"$PY" main.py --cfg "$CFG" --data-path datasets/shapes10 --output "$OUT" --eval \
    --resume "$OUT/swin_micro_shapes10/default/ckpt_best.pth" 2>&1 | grep -E 'Acc@1|RESULT'
echo "demo done: accuracy of the best checkpoint above (chance is 10%)"
