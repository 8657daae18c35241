#!/usr/bin/env bash
# Every GPU test and benchmark in one call, printing short tables at the end.
#   bash benchmarks/run_all.sh [tiny|large|both] [tests|tests2|kernels|optim|host|tune|train|fused-dense|infer-autotune|train-eager|train-compiled|main|input|nvjpeg|input-engines|input-locked|input-locked-main|input-main|input-main-nvjpeg|input-workers|input-prefetch|input-contention|input-streams|scaling-jpeg|profile-main|gil-main|input-graph|scaling-graph|apex|v2|v2-fold|spatial-mlp|v2-finetune|v2-upstream|fp8|fp8-finetune|fp8-profile|convergence-pipeline|convergence-fp8|convergence-v2|convergence-mlp|convergence-recommended ...]
# (tune, the launch sweeps of the window, LayerNorm and attention kernels, is not in the default list)
# Results (JSON + markdown) go to $OUT (else benchmarks/results).
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-tiny}; shift || true
PARTS=${*:-tests tests2 kernels optim host train main}
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.total --format=csv,noheader || true
# pytest-xdist, where installed, spreads the tests over processes: the GPU tests' time is mostly Triton
# compiling each kernel variant on the host's cores
XDIST=""; python3 -c "import xdist" 2>/dev/null && XDIST="-n ${PYTEST_WORKERS:-12}"
for part in $PARTS; do
  case $part in
    # the GPU tests in two parts that each fit a 10-minute call (Triton compiles every kernel variant)
    tests)   python3 -m pytest -q -rf $XDIST --durations=8 tests/test_window_process.py tests/test_window_attention.py \
               tests/test_layer_norm.py tests/test_fused_model.py tests/test_precision.py \
               tests/test_optimizers.py tests/test_compile.py tests/test_mlp.py tests/test_input_pipeline.py \
               2>&1 | tee "$OUT/pytest_tests.log" | grep -E "^(FAILED|ERROR)|passed|failed|^[0-9.]+s (call|setup)" | tail -30 ;;
    tests2)  python3 -m pytest -q -rf $XDIST --durations=8 tests/test_swinv2.py tests/test_swin_mlp.py tests/test_spatial_mlp.py \
               tests/test_cuda_graph.py tests/test_fp8.py 2>&1 | tee "$OUT/pytest_tests2.log" | grep -E "^(FAILED|ERROR)|passed|failed|^[0-9.]+s (call|setup)" | tail -30 ;;
    fused-dense) # --fused_dense / --fused_mlp (cuBLAS's GEMMs, our bias gradients and GELU backward): the kernels
             # alone, then whole steps with and without the two flags: eager, --cuda-graph, compile
             python3 benchmarks/bench_kernels.py bias_grad mlp dense
             for m in $([ "$MODEL" = both ] && echo tiny large || echo "$MODEL"); do
               python3 benchmarks/bench_train.py --model $m --skip-infer --exact --only \
                 "all flags + --fused_adam eager, O2 bf16" "all five flags + --fused_adam eager, O2 bf16" \
                 "all flags + --fused_adam + --cuda-graph (whole step, no compile), O2 bf16" \
                 "all five flags + --fused_adam + --cuda-graph (whole step, no compile), O2 bf16" \
                 "all flags + --fused_adam + compile (CUDA graphs), O2 bf16" \
                 "all five flags + --fused_adam + compile (CUDA graphs), O2 bf16" \
                 "all five flags + --fused_adam + --cuda-graph, MLP residual not deferred, O2 bf16" \
                 "all five flags + --fused_adam + compile (CUDA graphs), MLP residual not deferred, O2 bf16"; done ;;
    infer-autotune) # inference, compiled: CUDA graphs alone vs inductor's max-autotune (its GEMM templates, bias
             # and GELU inside), our flags and the reference
             for m in $([ "$MODEL" = both ] && echo tiny large || echo "$MODEL"); do
               python3 benchmarks/bench_train.py --model $m --compiled only --only "O3 bf16" 2>"$OUT/autotune_$m.log"
             done ;;
    fp8)     # --fp8 (needs torchao: pip install it, or a wheel on PYTHONPATH) beside bf16 under compile: every
             # FP8 layer, the MLP only, and upstream's ops (no custom ops between inductor and the casts);
             # tiny, base or large (both: tiny and large), one model a call
             for m in $([ "$MODEL" = both ] && echo tiny large || echo "$MODEL"); do
               python3 benchmarks/bench_train.py --model $m --skip-infer --exact --only \
                 "all flags + --fused_adam + compile (CUDA graphs), O2 bf16" \
                 "--fp8 (tensorwise) + all flags + --fused_adam + compile (CUDA graphs), O2 bf16" \
                 "--fp8 fc1/fc2 only (tensorwise) + all flags + --fused_adam + compile (CUDA graphs), O2 bf16" \
                 "reference + --fused_adam + compile (CUDA graphs), O2 bf16" \
                 "--fp8 (tensorwise) + reference + --fused_adam + compile (CUDA graphs), O2 bf16"; done ;;
    fp8-finetune) # Swin-L fine-tuning from the same weights (a short bf16 pre-training on the 224-px shapes), bf16
             # seeds 0 and 1 vs --fp8 seed 0: the train loss at about step 200 (benchmarks/fp8_finetune.py; torchao)
             python3 benchmarks/fp8_finetune.py --out "$OUT/fp8_finetune" ;;
    fp8-profile) # where the FP8 step's time goes: the top kernels with and without --fp8 (compiled, all flags)
             for m in $([ "$MODEL" = both ] && echo tiny large || echo "$MODEL"); do
               for f in "" "--fp8 tensorwise"; do
                 python3 benchmarks/profile_step.py --model $m --flags all --level O2 --dtype bfloat16 --fused_adam \
                   --compile --top 25 $f; done; done ;;
    v2)      # Swin V2-T/256 (tiny) and V2-B/192 (base; both: the two): upstream's own module (from
             # $SWIN_UPSTREAM, default .upstream: a checkout of microsoft/Swin-Transformer; its clamp fixed in
             # memory) beside ours, one process each. V2-T alone needs most of a 10-minute call (one H200:
             # upstream's compile takes minutes)
             for m in $(case $MODEL in both) echo v2tiny v2base;; base) echo v2base;; *) echo v2tiny;; esac); do
               python3 benchmarks/bench_train.py --model $m; done ;;
    v2-fold) # Swin V2-T: the MLP residual kernel writing the next block's windows vs each block partitioning its
             # own input, compiled and with --cuda-graph (our rows only: no upstream compile)
             python3 benchmarks/bench_train.py --model v2tiny --skip-infer --exact --only \
               "all flags + --fused_adam + compile (CUDA graphs), O2 bf16" \
               "all flags + --fused_adam + compile (CUDA graphs), next partition not folded, O2 bf16" \
               "all flags + --fused_adam + --cuda-graph (whole step, no compile), O2 bf16" \
               "all flags + --fused_adam + --cuda-graph, next partition not folded, O2 bf16" ;;
    spatial-mlp) # Swin-MLP's fused spatial MLP (--fused_window_process on swin_mlp): the kernel against upstream's
             # ops eager and compiled, then Swin-MLP-T/256 training with and without it beside upstream's module
             python3 benchmarks/bench_kernels.py spatial_mlp
             python3 benchmarks/bench_train.py --model mlptiny --skip-infer ;;
    v2-finetune) # SwinV2-B fine-tuning shapes: window 16 at 256 px (batch 128) and window 24 at 384 px (batch 32),
             # upstream's eager and compiled code beside our best (compile and --cuda-graph); upstream's compile
             # takes minutes: each model may need its own 10-minute call (the two commands below)
             python3 benchmarks/bench_train.py --model v2base16 --skip-infer
             python3 benchmarks/bench_train.py --model v2base24 --skip-infer --batch 32 ;;
    v2-upstream) # the same, upstream's rows only (its eager and compiled training, its --throughput)
             for m in $(case $MODEL in both) echo v2tiny v2base;; base) echo v2base;; *) echo v2tiny;; esac); do
               python3 benchmarks/bench_train.py --model $m --only upstream; done ;;
    apex)    # KERNEL_BACKEND apex: build apex from the source checkout in $APEX_SRC (default .apex) into
             # .apex_site unless it is importable, then its tests, its ops beside ours, and whole-model rows
             if ! python3 -c "import apex.optimizers, apex.normalization, apex.fused_dense" 2>/dev/null; then
               export PYTHONPATH="$PWD/.apex_site${PYTHONPATH:+:$PYTHONPATH}"
               python3 -c "import apex.optimizers, apex.normalization, apex.fused_dense" 2>/dev/null || \
                 { t0=$(date +%s); python3 build_apex.py "${APEX_SRC:-.apex}" --pip-args "--target .apex_site" \
                   2>&1 | grep -vE "^(  |creating|copying|running|building|g\+\+|/usr|\[)" | tail -20
                   echo "apex build: $(( $(date +%s) - t0 )) s"; }
             fi
             python3 -m pytest -q tests/test_apex.py 2>&1 | grep -E "^E |passed|failed|Error" | tail -30
             python3 benchmarks/bench_kernels.py layer_norm dense
             for m in $([ "$MODEL" = both ] && echo tiny large || echo "$MODEL"); do
               python3 benchmarks/bench_train.py --model "$m" --skip-infer --only "reference eager O1 fp16" \
                 "apex:" "ours:" "all flags + --fused_adam eager, O2" "all five flags + --fused_adam eager, O2 bf16" \
                 "all flags + --fused_adam + compile (CUDA graphs), O2 bf16"; done ;;
    input)   # the input pipelines alone on a generated ImageNet-like JPEG folder (benchmarks/bench_input.py),
             # ours with each decode (nvJPEG, the workers), and one worker's cost a training image
             python3 benchmarks/bench_input.py --parts folder pipelines gputime worker --decode-batches 1 2 ;;
    input-locked) # the pipelines alone with the workers' pooled segments page-locked where they lie vs copied
             # into pinned memory a batch at a time; the val pipeline with nvJPEG taking all / 70% / 80% of the
             # files (the workers decode the rest), one and two batches an nvJPEG call
             python3 benchmarks/bench_input.py --parts folder pipelines --pipelines gpu --decode workers \
               --segments lock copy
             python3 benchmarks/bench_input.py --parts folder pipelines --pipelines gpu --splits val --decode \
               device device@0.7 device@0.8 --segments lock copy --decode-batches 1 2 ;;
    input-locked-main) # main.py on the JPEG folder (1219-step epochs, decode in the workers) with the segments
             # page-locked, copied (the default there), and page-locked with 4 batches ahead a worker; synthetic inputs
             B="python3 benchmarks/bench_input.py --images 156000 --val-images 256 --parts folder main"
             L="import data.gpu_pipeline as g; g.LOCK_SEGMENTS = True"
             $B --main-runs gpu:jpeg gpu:synthetic --main-prelude "$L"
             $B --main-runs gpu:jpeg --main-prelude 'import data.gpu_pipeline as g; g.LOCK_SEGMENTS = False'
             $B --main-runs gpu:jpeg --main-prelude "$L; g.WORKER_PREFETCH = 4"
             # nvJPEG taking a quarter of the files off the workers (EXTRA.DEVICE_DECODE_SHARE): a host whose
             # workers decode below the step's speed
             $B --main-runs gpu:jpeg:compile:1:device@0.25 --main-prelude "$L" ;;
    input-engines) # nvJPEG's engines called directly (data/nvjpeg.py) vs torchvision's decode_jpeg: the pipelines
             # alone (val with 1 / 2 / 4 batches a call, all files or 70% to nvJPEG; train), then main.py on the JPEG
             # folder (1219-step epochs, 14 workers) with the workers' decode and 15% / 25% of the files to nvJPEG
             # (15% also with 4 batches a call: a small share's call is mostly its fixed cost)
             O=$OUT; mkdir -p "$O/val" "$O/train" "$O/main"
             OUT=$O/val python3 benchmarks/bench_input.py --parts folder pipelines --pipelines gpu --splits val \
               --decode device device@0.7 --engines on off --decode-batches 1 2 4
             OUT=$O/train python3 benchmarks/bench_input.py --parts folder pipelines --pipelines gpu --splits train \
               --decode device --engines on off
             OUT=$O/main python3 benchmarks/bench_input.py --images 156000 --val-images 256 --workers 14 --parts folder \
               main --main-runs gpu:jpeg gpu:synthetic gpu:jpeg:compile:1:device@0.15 gpu:jpeg:compile:4:device@0.15 \
               gpu:jpeg:compile:1:device@0.25 ;;
    nvjpeg)  # nvJPEG's hardware batched decode alone: each output format and 1 / 2 / 4 decoders at once,
             # with the GPU idle and kept busy by GEMMs (benchmarks/nvjpeg_formats.py)
             python3 benchmarks/nvjpeg_formats.py ;;
    input-main)  # main.py end to end on that folder (decode in the workers) and on synthetic inputs, two rounds in
             # turn (medians printed), beside the harness. 1219-step epochs: the timed steps begin with ~30
             # batches queued, which hide an input deficit of 15% for ~200 steps (H100, 2026-12-07)
             python3 benchmarks/bench_input.py --images 156000 --val-images 256 --parts folder main harness --repeat 2 \
               --main-runs gpu:jpeg gpu:synthetic ;;
    input-main-nvjpeg) # the same with nvJPEG decoding all / half of the files (shorter epochs: they wait from the start)
             python3 benchmarks/bench_input.py --val-images 256 --parts folder main --main-runs \
               gpu:jpeg:compile:1:device gpu:jpeg:compile:1:device@0.5 ;;
    input-workers) # main.py on the JPEG folder with 12 / 13 / 14 workers decoding (1219-step epochs): the workers'
             # decode is what is left (12 of them alone 5035 img/s, 0.85x the Swin-T step; H100, 2026-12-07)
             for w in 12 13 14; do
               python3 benchmarks/bench_input.py --images 156000 --val-images 256 --workers $w --parts folder main \
                 --main-runs gpu:jpeg | grep -E "^\{'part'"; done ;;
    input-prefetch) # main.py on the JPEG folder (1219-step epochs), each worker preparing 2 batches ahead (torch's
             # default) and 4 (data/gpu_pipeline.py WORKER_PREFETCH, its segment pool sized to match); the rows'
             # workers_busy_% says whether the workers idle while the loop waits (H100, 2026-12-07: 30-35% of
             # the host idle during a run waiting 29% for input)
             python3 benchmarks/bench_input.py --images 156000 --val-images 256 --parts folder main --main-runs gpu:jpeg
             python3 benchmarks/bench_input.py --images 156000 --val-images 256 --parts folder main --main-runs gpu:jpeg \
               --main-prelude "import data.gpu_pipeline as g; g.WORKER_PREFETCH = 4" ;;
    input-contention) # the pipeline's decode and finish stages alone, GPU idle vs kept busy by GEMMs; the
             # decode under the profiler (which host calls and kernels it waits on)
             python3 benchmarks/bench_input.py --images 6000 --val-images 256 --parts folder contention decode-profile ;;
    profile-main) # where main.py's step waits, synthetic inputs and the JPEG folder (benchmarks/profile_main.py)
             python3 benchmarks/bench_input.py --parts folder profile --main-runs gpu:synthetic gpu:jpeg ;;
    input-streams) # the finish stage with batches on two high-priority streams in turn: alone under a GEMM
             # load (the contention part's last row), and in main.py on JPEGs beside the default (one stream)
             python3 benchmarks/bench_input.py --images 26000 --val-images 256 --parts folder contention main \
               --main-runs gpu:jpeg
             python3 benchmarks/bench_input.py --images 26000 --val-images 256 --parts folder main --main-runs gpu:jpeg \
               --main-prelude "import data.gpu_pipeline as g; g.DeviceLoader.finish_streams, g.DeviceLoader.finish_priority = 2, -1" ;;
    scaling-jpeg) # main.py on the JPEG folder (26000 images), one GPU vs all of the host's, best flags + compile
             # (CUDA graphs), the decode in 12 workers a rank (benchmarks/scaling.sh with DATA_PATH)
             python3 benchmarks/bench_input.py --images 26000 --val-images 512 --parts folder | grep folder
             DATA_PATH=/tmp/bench_jpeg EXTRA_OPTS="EXTRA.COMPILE_MODE reduce-overhead SAVE_FREQ 10" \
               bash benchmarks/scaling.sh "$(nvidia-smi -L | wc -l)" --fused_window_process --unfused_mha \
               --fused_layernorm --fused_adam --amp-opt-level O2 --amp-dtype bfloat16 --compile ;;
    scaling-graph) # DDP scaling with --cuda-graph (the gradients averaged inside the captured step, not
             # overlapped with the backward) beside --compile (CUDA graphs, DDP's overlapped buckets); synthetic
             F="--fused_window_process --unfused_mha --fused_layernorm --fused_adam"
             F="$F --amp-opt-level O2 --amp-dtype bfloat16"; N=$(nvidia-smi -L | wc -l)
             bash benchmarks/scaling.sh "$N" $F --cuda-graph --fused_mlp --fused_dense
             EXTRA_OPTS="EXTRA.COMPILE_MODE reduce-overhead" bash benchmarks/scaling.sh "$N" $F --compile ;;
    gil-main) # which of main.py's threads hold the GIL (benchmarks/gil_profile.py: py-spy, from a wheel on PATH),
             # synthetic inputs and the JPEG folder
             python3 benchmarks/bench_input.py --images 26000 --val-images 256 --parts folder gil \
               --main-runs gpu:synthetic gpu:jpeg ;;
    input-graph) # the same with --cuda-graph in place of --compile
             python3 benchmarks/bench_input.py --images 13000 --val-images 1024 --parts folder main harness \
               --main-runs gpu:synthetic:graph gpu:jpeg:graph --harness-steps graph ;;
    convergence-pipeline|convergence-fp8|convergence-v2|convergence-mlp|convergence-recommended)
             # benchmarks/convergence.py's sets (each run a real
             # main.py training, two seeds a variant, spread over the GPUs; data and runs in /tmp); the curves
             # (csv) are copied to $OUT
             python3 benchmarks/convergence.py run --out /tmp/convergence --set "${part#convergence-}" --epochs 15 \
               --gpus "$(nvidia-smi -L | wc -l)" && cp /tmp/convergence/*.csv "$OUT"/ ;;
    kernels) python3 benchmarks/bench_kernels.py ;;
    optim)   python3 benchmarks/bench_optim.py ;;
    host)    python3 benchmarks/launch_overhead.py ;;
    tune)    python3 benchmarks/tune_window_process.py; python3 benchmarks/tune_layer_norm.py
             python3 benchmarks/tune_window_attention.py ;;
    train|train-eager|train-compiled)
             c=all; [ $part = train-eager ] && c=no; [ $part = train-compiled ] && c=only
             for m in $([ "$MODEL" = both ] && echo tiny large || echo "$MODEL"); do
               python3 benchmarks/bench_train.py --model "$m" --compiled $c; done ;;
    main)    # main.py itself: Swin-T, synthetic data, batch 128, reference path, AMP fp16 (upstream default)
             python3 main.py --cfg configs/swin/swin_tiny_patch4_window7_224.yaml --output /tmp/out \
               --opts DATA.DATASET synthetic TRAIN.EPOCHS 1 EXTRA.SYNTHETIC_TRAIN_SIZE 7680 \
               EXTRA.SYNTHETIC_VAL_SIZE 512 PRINT_FREQ 20 2>&1 | grep -E "Train:|Acc@1|RESULT" | tail -4 ;;
  esac
done
