#!/usr/bin/env bash
# The GPU benchmark in one go, on a fresh machine, most wanted first (what ran comes back if time runs out):
#  1. make a full-size fp16 random-weight checkpoint on the GPU;
#  2. time the fast-path candidates on text_to_image beside the reference in one process (bench.py --ours ...;
#     CANDIDATES_CUDNN_LIMIT=0 makes cuDNN try every convolution algorithm in that process);
#  3. bench.py (BENCH=1) for the three tasks at 512x512, 50 DDIM steps, fp16, batch 1, CFG 7.5, ours against diffusers
#     in the same process, with the fresh-process memory and load runs;
#  4. our UNet step and VAE decode under layout/autotuning variants (step_variants.py, STEP_VARIANTS=1);
#  5. where the step's kernel time goes (step_breakdown.py; BREAKDOWN_COMPILE=default adds torch.compile,
#     minutes; BREAKDOWN_CUDNN_LIMIT=0 lets cuDNN try every convolution algorithm);
#  6. the flows only we have (flows_run.py) and our fp16 path against diffusers' stage by stage (fp16_check.py);
#  7. torch.compile on top of the CUDA graphs, if fewer than COMPILE_IF_BEFORE seconds have passed.
# Writes *.json, *.md and the logs to $OUT. About 6-8 minutes on an H100.
#
#   bash benchmarks/gpu_run.sh                      # from the repository root
#   STEP_REPEATS=10 E2E_REPEATS=2 PROFILE=0 bash benchmarks/gpu_run.sh
#
# diffusers comes from the wheels in .whl/ if there are any (installed with --no-deps into /tmp/site); without
# diffusers the script still measures ours alone.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
OUT=${OUT:-out/gpu}
CKPT=${CKPT:-/tmp/vd-bench-fp16}
STEPS=${STEPS:-50}
SIZE=${SIZE:-512}
STEP_REPEATS=${STEP_REPEATS:-10}
E2E_REPEATS=${E2E_REPEATS:-2}
PROFILE=${PROFILE:-0}               # 1: also profile one 3-step run of each implementation per task
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-fp16}
mkdir -p "$OUT"

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

{
    date -Is
    nvidia-smi -L || true
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv || true
    "$PY" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version())
for name in ("diffusers", "transformers", "accelerate", "safetensors", "numpy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError as e:
        print(name, "not importable:", e)
EOF
} 2>&1 | tee "$OUT/env.txt"

start=$SECONDS
if [ ! -f "$CKPT/model_index.json" ]; then
    "$PY" benchmarks/make_checkpoint.py "$CKPT" --size full --dtype "$DTYPE" --device "$DEVICE" 2>&1 \
        | tee "$OUT/make_checkpoint.log"
fi
echo "checkpoint ready after $((SECONDS - start)) s"

if [ "${CANDIDATES:-1}" = 1 ]; then  # fast-path candidates, text_to_image, in one process with the reference
    "$PY" benchmarks/bench.py "$CKPT" --device "$DEVICE" --dtype "$DTYPE" --size "$SIZE" --steps "$STEPS" \
        --tasks text_to_image --no-isolate --step-repeats "$STEP_REPEATS" --e2e-repeats "$E2E_REPEATS" \
        --ours ${CANDIDATES_OURS:-eager graphs graphs+nhwc_norm} \
        ${CANDIDATES_CUDNN_LIMIT:+--cudnn-benchmark-limit "$CANDIDATES_CUDNN_LIMIT"} \
        --json "$OUT/candidates.json" 2>&1 | tee "$OUT/candidates.log" || echo "candidates failed; going on"
    echo "candidates done after $((SECONDS - start)) s"
fi

if [ "${BENCH:-1}" = 1 ]; then  # the three tasks, with the fresh-process memory and load runs
    profile=()
    if [ "$PROFILE" = 1 ]; then
        profile=(--profile "$OUT/profile" --profile-steps 3)
    fi
    "$PY" benchmarks/bench.py "$CKPT" --device "$DEVICE" --dtype "$DTYPE" --size "$SIZE" --steps "$STEPS" \
        --step-repeats "$STEP_REPEATS" --e2e-repeats "$E2E_REPEATS" --ours eager graphs "${profile[@]}" \
        --json "$OUT/bench.json" --markdown "$OUT/bench.md" 2>&1 | tee "$OUT/bench.log" || echo "bench failed; going on"
fi
echo "bench done after $((SECONDS - start)) s"

if [ "${STEP_VARIANTS:-1}" = 1 ]; then  # channels-last vs NCHW, cudnn.benchmark off/on (ours only)
    "$PY" benchmarks/step_variants.py "$CKPT" --device "$DEVICE" --json "$OUT/step_variants.json" 2>&1 \
        | tee "$OUT/step_variants.log"
fi
if [ "${BREAKDOWN:-1}" = 1 ]; then  # kernel time by kind, SDPA backends, channels-last GroupNorm, e2e split
    "$PY" benchmarks/step_breakdown.py "$CKPT" --device "$DEVICE" --steps "$STEPS" --size "$SIZE" \
        ${BREAKDOWN_COMPILE:+--compile "$BREAKDOWN_COMPILE"} \
        ${BREAKDOWN_CUDNN_LIMIT:+--cudnn-benchmark-limit "$BREAKDOWN_CUDNN_LIMIT"} \
        --json "$OUT/step_breakdown.json" 2>&1 \
        | tee "$OUT/step_breakdown.log" || echo "step_breakdown.py failed; going on"  # diagnostics only
fi
if [ "${FLOWS:-1}" = 1 ]; then  # image_to_text, text_variation, blend, image_variation with focus/fidelity
    "$PY" benchmarks/flows_run.py "$CKPT" --device "$DEVICE" --steps "$STEPS" --size "$SIZE" \
        --json "$OUT/flows.json" 2>&1 | tee "$OUT/flows.log"
fi
echo "variants and flows done after $((SECONDS - start)) s"

if [ "${FP16_CHECK:-1}" = 1 ]; then  # stage-by-stage fp16 closeness to the reference (text_to_image)
    "$PY" benchmarks/fp16_check.py "$CKPT" --device "$DEVICE" --steps "$STEPS" 2>&1 | tee "$OUT/fp16_check.log"
fi

# torch.compile on top of the CUDA graphs, text_to_image only, if the time allows (compiling takes minutes)
if [ "$((SECONDS - start))" -lt "${COMPILE_IF_BEFORE:-300}" ]; then
    "$PY" benchmarks/bench.py "$CKPT" --device "$DEVICE" --dtype "$DTYPE" --size "$SIZE" --steps "$STEPS" \
        --tasks text_to_image --ours eager compile --no-reference --no-isolate --step-repeats "$STEP_REPEATS" \
        --e2e-repeats "$E2E_REPEATS" --json "$OUT/bench-compile.json" --markdown "$OUT/bench-compile.md" 2>&1 \
        | tee "$OUT/bench-compile.log"
fi
echo "done after $((SECONDS - start)) s"
