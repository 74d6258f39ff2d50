#!/usr/bin/env bash
# GPU check, about 6-7 minutes on one H100/H200 (each step has its own time limit, together ~10 min):
#   1. nvidia-smi
#   2. pytest-cuda: tests/gpu/test_cuda.py: CUDA == CPU forward/generation, bf16 and fp16+GradScaler training,
#      QLoRA (when bitsandbytes imports), feature cache on CUDA
#   3. deepspeed: tests/gpu/test_deepspeed_cuda.py: `accelerate launch` of ZeRO-2 / ZeRO-3 on this GPU, bf16,
#      losses of the plain run (skipped unless deepspeed imports: carry its wheels in .whl/)
#   4. bench-generate: benchmarks/bench_generate.py --device cuda   (ours vs transformers' Llava, fp32 and bf16)
#   5. bench-train: benchmarks/bench_train.py --device cuda --compile  (stage 1 / 2 step time vs the peer, MFU;
#      eager and with compiled decoder layers, both sides)
#   5b. bench-train-large: the same on the large shape (CLIP-L/14-336 + a 1.7B-shaped Llama, batch 8)
#   6. gpu-check: benchmarks/gpu_check.py       (bench + large shapes in bf16: step time, tokens/s, memory, MFU)
#   7. one JSON summary (also $OUT/summary.json)
# A failing step is reported and the next one runs. Run from anywhere (SKIP: step names to leave out):
#   OUT=/some/dir [SKIP="bench-train gpu-check"] bash benchmarks/gpu_check.sh
#   SKIP="bench-generate bench-train gpu-check" bash benchmarks/gpu_check.sh   # the tests only
# minillava needs no install (PYTHONPATH); wheels in .whl/ (e.g. bitsandbytes; deepspeed, a pure wheel built with
# DS_BUILD_OPS=0, and those of its requirements the machine lacks) are installed to /tmp/site first.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT="${OUT:-$ROOT/gpu-check-out}"
mkdir -p "$OUT"
: >"$OUT/steps.tsv"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH" || echo "wheel install FAILED"
fi

step() {  # step NAME SECONDS CMD...: run with a time limit, log, record status and duration
    local name=$1 limit=$2 status
    shift 2
    case " ${SKIP:-} " in *" $name "*) echo "=== $name: skipped (SKIP)"; return ;; esac
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    if timeout "$limit" "$@"; then status=ok; else status="FAILED($?)"; fi
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >>"$OUT/steps.tsv"
    echo "=== $name: $status in $((SECONDS - t0))s"
}

{
    step nvidia-smi 30 nvidia-smi
    GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
    case "$GPU" in *H200*) TAG=h200 ;; *H100*) TAG=h100 ;; *) TAG=gpu ;; esac
    "$PY" -c "import torch, transformers as t; print(torch.__version__, t.__version__, torch.cuda.is_available())" \
        || echo "python check FAILED"
    "$PY" -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)" 2>/dev/null || echo "no bitsandbytes"
    "$PY" -c "from importlib.metadata import version as v; print('deepspeed', v('deepspeed'), 'pydantic', v('pydantic'))" \
        2>/dev/null || echo "no deepspeed"
    step pytest-cuda 90 "$PY" -m pytest tests/gpu/test_cuda.py -q -rs -p no:cacheprovider \
        --junitxml "$OUT/pytest-cuda.xml"
    step deepspeed 120 "$PY" -m pytest tests/gpu/test_deepspeed_cuda.py -q -rs -p no:cacheprovider \
        --junitxml "$OUT/pytest-deepspeed.xml"
    step bench-generate 80 "$PY" benchmarks/bench_generate.py --device cuda --out "$OUT/generate-cuda-$TAG.json"
    step bench-train 90 "$PY" benchmarks/bench_train.py --device cuda --compile --out "$OUT/train-cuda-$TAG.json"
    step bench-train-large 150 "$PY" benchmarks/bench_train.py --device cuda --shapes large --compile \
        --out "$OUT/train-large-cuda-$TAG.json"
    step gpu-check 60 "$PY" benchmarks/gpu_check.py --out "$OUT/gpu-check-cuda-$TAG.json"
} 2>&1 | tee "$OUT/gpu_check.log"

echo "=== summary"
"$PY" benchmarks/gpu_check.py --summary "$OUT" || { echo "summary FAILED; steps:"; cat "$OUT/steps.tsv"; }
