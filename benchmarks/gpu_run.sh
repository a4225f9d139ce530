#!/usr/bin/env bash
# The issue-19 GPU run in one command, for one device window (15 minutes of device time, at most 10 minutes a
# command): every stage runs under `timeout`, most wanted first, and a stage whose expected time no longer fits in
# BUDGET_S (from this script's start) is skipped with a line saying so. Stages (text_to_image, 512x512, 50 DDIM
# steps, fp16, CFG 7.5 unless set otherwise):
#   checkpoint        the full-size fp16 random-weight checkpoint, made on the GPU (always; reused if present)
#   kernels           benchmarks/fused_kernels.py: the fused kernels against torch's ops shape by shape, the UNet
#                     step and decode with and without them (KERNELS_ARGS: 20 repeats, GroupNorm with one group
#                     per program against the launcher's choice and 4 groups; the full sweep, KERNELS_ARGS="",
#                     takes 2-4 minutes)
#   speed             bench.py: UNet step, end to end, VAE decode (+ the VAE channels-last candidate), first-call
#                     cost and held memory, for ours eager / graphs / kernels / default / default+kv_per_step
#                     (each change of issue 19 on its own) against diffusers eager
#   throughput        bench.py --throughput-batches: images/s and peak memory at THROUGHPUT_BATCHES, ours default
#                     and eager against diffusers eager
#   compile_probe     compile_probe.py: inductor's code for one ResnetBlock and one SpatialTransformer, summarised
#   reference_compiled  bench.py with diffusers compiled (its documented recipe, reference_compiled.py) beside
#                     diffusers eager and ours default: step, end to end, decode, compile time, then throughput.
#                     REF_COMPILE_MODE (max-autotune) if REF_COMPILE_EXPECT_S fit in what is left, else
#                     REF_COMPILE_FALLBACK (reduce-overhead: inductor's default kernels + CUDA graphs)
#   breakdown         step_breakdown.py: where the step's kernel time goes by kind, graph-step variants, the VAE
#                     decode eager and graphed, a whole call split into steps, decode and the rest
#   other_tasks       bench.py for image_variation and dual_guided, ours eager / default against diffusers eager
#   memory            bench.py --skip-timing, text_to_image: load time, peak memory, host RSS, each in a fresh
#                     process (ours as loaded by default)
# Output in $OUT (few files, so that they all come back from a device run): results.md (every stage's tables,
# appended as it ends), results.jsonl (one line per stage: its status and JSON), run.log (everything printed),
# compile_probe_code.py (the generated code).
#
#   bash benchmarks/gpu_run.sh                                  # from the repository root; OUT=out/gpu
#   BUDGET_S=300 THROUGHPUT_BATCHES="1 8" bash benchmarks/gpu_run.sh
#   REF_COMPILE_EXPECT_S=0 PROBE=0 THROUGHPUT=0 bash benchmarks/gpu_run.sh    # max-autotune whatever it takes
#
# Switch a stage off with KERNELS=0, SPEED=0, THROUGHPUT=0, PROBE=0, REF_COMPILED=0, BREAKDOWN=0, OTHER_TASKS=0,
# MEMORY=0.
# CPU smoke run (seconds per stage): tests/benchmarks/test_gpu_run.py. diffusers comes from the wheels in .whl/ if
# there are any (installed with --no-deps into /tmp/site); without diffusers the stages measure ours alone.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
OUT=${OUT:-out/gpu}
CKPT=${CKPT:-/tmp/vd-bench-fp16}
CKPT_SIZE=${CKPT_SIZE:-full}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-fp16}
SIZE=${SIZE:-512}
STEPS=${STEPS:-50}
BUDGET_S=${BUDGET_S:-540}
STEP_REPEATS=${STEP_REPEATS:-10}
E2E_REPEATS=${E2E_REPEATS:-3}
DECODE_REPEATS=${DECODE_REPEATS:-10}
THROUGHPUT_BATCHES=${THROUGHPUT_BATCHES:-1 4 8 16}
THROUGHPUT_REPEATS=${THROUGHPUT_REPEATS:-2}
REF_COMPILE_MODE=${REF_COMPILE_MODE:-max-autotune}
REF_COMPILE_EXPECT_S=${REF_COMPILE_EXPECT_S:-300}
REF_COMPILE_FALLBACK=${REF_COMPILE_FALLBACK:-reduce-overhead}
REF_COMPILE_FALLBACK_EXPECT_S=${REF_COMPILE_FALLBACK_EXPECT_S:-120}
REF_COMPILE_BACKEND=${REF_COMPILE_BACKEND:-inductor}
REF_COMPILED_BATCHES=${REF_COMPILED_BATCHES:-$THROUGHPUT_BATCHES}
PROBE_ARGS=${PROBE_ARGS:-}          # compile_probe.py's shape arguments (tiny ones for a CPU smoke run)
KERNELS_ARGS=${KERNELS_ARGS---repeats 20 --candidates=2048:1:4:1,2048:1:4,2048:1:4:4}  # fused_kernels.py args
BENCH_ARGS=${BENCH_ARGS:-}          # more bench.py arguments for every bench stage (e.g. --threads 1 --warmup 0)
# expected seconds of each stage on an H100 (estimates; a stage is skipped when they no longer fit) and limits
EXPECT_KERNELS=${EXPECT_KERNELS:-75};         LIMIT_KERNELS=${LIMIT_KERNELS:-180}
EXPECT_SPEED=${EXPECT_SPEED:-120};            LIMIT_SPEED=${LIMIT_SPEED:-240}
EXPECT_THROUGHPUT=${EXPECT_THROUGHPUT:-110};  LIMIT_THROUGHPUT=${LIMIT_THROUGHPUT:-240}
EXPECT_PROBE=${EXPECT_PROBE:-45};             LIMIT_PROBE=${LIMIT_PROBE:-120}
EXPECT_BREAKDOWN=${EXPECT_BREAKDOWN:-60};     EXPECT_OTHER=${EXPECT_OTHER:-100};  EXPECT_MEMORY=${EXPECT_MEMORY:-45}

mkdir -p "$OUT"
LOG=$OUT/run.log MD=$OUT/results.md JSONL=$OUT/results.jsonl
TMP=$(mktemp -d)
: > "$LOG"; : > "$MD"; : > "$JSONL"
start=$SECONDS

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tee -a "$LOG"
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

{
    echo "# GPU run (benchmarks/gpu_run.sh), $(date -Is)"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null \
        || echo "no nvidia-smi"
    "$PY" - <<'EOF'
import importlib, os, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version(), "| cpus", os.cpu_count())
for name in ("triton", "diffusers", "transformers", "accelerate", "safetensors", "numpy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError as e:
        print(name, "not importable:", e)
EOF
    echo "settings: SIZE=$SIZE STEPS=$STEPS DTYPE=$DTYPE BUDGET_S=$BUDGET_S STEP_REPEATS=$STEP_REPEATS" \
         "E2E_REPEATS=$E2E_REPEATS DECODE_REPEATS=$DECODE_REPEATS THROUGHPUT_BATCHES='$THROUGHPUT_BATCHES'" \
         "THROUGHPUT_REPEATS=$THROUGHPUT_REPEATS REF_COMPILE_MODE=$REF_COMPILE_MODE"
    echo '```'
} 2>&1 | tee -a "$LOG" >> "$MD"

left() { echo $((BUDGET_S - (SECONDS - start))); }

# stage NAME EXPECTED_S LIMIT_S COMMAND...: run COMMAND under timeout (LIMIT_S or what is left of the budget) if
# EXPECTED_S fit; COMMAND writes $TMP/NAME.md and $TMP/NAME.json, appended to results.md and results.jsonl.
stage() {
    local name=$1 expect=$2 limit=$3 remaining status rc t0
    shift 3
    remaining=$(left)
    if [ "$remaining" -lt "$expect" ]; then
        echo "skipped $name: expects about $expect s, $remaining s of BUDGET_S=$BUDGET_S left" | tee -a "$LOG"
        printf '\n## %s: skipped (expects about %s s, %s s left)\n' "$name" "$expect" "$remaining" >> "$MD"
        return 0
    fi
    [ "$limit" -gt "$remaining" ] && limit=$remaining
    echo "== $name: limit $limit s, after $((SECONDS - start)) s" | tee -a "$LOG"
    t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status="done" ;;
        124 | 137) status="stopped at its limit of $limit s (what it had measured is below)" ;;
        *) status="failed with exit code $rc (see run.log; what it had measured is below)" ;;
    esac
    echo "== $name: $status, $((SECONDS - t0)) s" | tee -a "$LOG"
    printf '\n## %s: %s, %s s\n\n' "$name" "$status" "$((SECONDS - t0))" >> "$MD"
    [ -f "$TMP/$name.md" ] && cat "$TMP/$name.md" >> "$MD"
    "$PY" - "$name" "$status" "$((SECONDS - t0))" "$TMP/$name.json" >> "$JSONL" <<'EOF'
import json, sys
name, status, seconds, path = sys.argv[1:]
line = {"stage": name, "status": status, "seconds": int(seconds)}
try:
    line["result"] = json.load(open(path))
except (OSError, ValueError) as e:
    line["result"], line["error"] = None, f"{type(e).__name__}: {e}"
print(json.dumps(line))
EOF
}

# bench.py on the checkpoint with this run's settings; a stage adds its arguments and --json/--markdown
# shellcheck disable=SC2206
BENCH=("$PY" benchmarks/bench.py "$CKPT" --device "$DEVICE" --dtype "$DTYPE" --size "$SIZE" --steps "$STEPS"
       --step-repeats "$STEP_REPEATS" --e2e-repeats "$E2E_REPEATS" --decode-repeats "$DECODE_REPEATS"
       --throughput-repeats "$THROUGHPUT_REPEATS" $BENCH_ARGS)
out() { echo --json "$TMP/$1.json" --markdown "$TMP/$1.md"; }

if [ ! -f "$CKPT/model_index.json" ]; then
    echo "== checkpoint" | tee -a "$LOG"
    if ! timeout -k 10 300 "$PY" benchmarks/make_checkpoint.py "$CKPT" --size "$CKPT_SIZE" --dtype "$DTYPE" \
            --device "$DEVICE" 2>&1 | tee -a "$LOG"; then
        echo "no checkpoint: nothing to measure" | tee -a "$LOG" "$MD"
        exit 1
    fi
fi
echo "checkpoint ready after $((SECONDS - start)) s" | tee -a "$LOG"

if [ "${KERNELS:-1}" = 1 ]; then
    # shellcheck disable=SC2086
    stage kernels "$EXPECT_KERNELS" "$LIMIT_KERNELS" "$PY" benchmarks/fused_kernels.py --device "$DEVICE" \
        $KERNELS_ARGS --json "$TMP/kernels.json" --markdown "$TMP/kernels.md"
fi
if [ "${SPEED:-1}" = 1 ]; then
    # shellcheck disable=SC2046
    stage speed "$EXPECT_SPEED" "$LIMIT_SPEED" "${BENCH[@]}" --tasks text_to_image --ours eager graphs kernels default default+kv_per_step \
        --reference eager --no-isolate $(out speed)
fi
if [ "${THROUGHPUT:-1}" = 1 ]; then  # a fresh process: every batch's CUDA graphs are captured inside its window
    # shellcheck disable=SC2046,SC2086
    stage throughput "$EXPECT_THROUGHPUT" "$LIMIT_THROUGHPUT" "${BENCH[@]}" --tasks text_to_image \
        --ours default eager --reference eager --no-isolate --step-repeats 0 --e2e-repeats 0 --decode-repeats 0 \
        --throughput-batches $THROUGHPUT_BATCHES $(out throughput)
fi
if [ "${PROBE:-1}" = 1 ]; then
    # shellcheck disable=SC2086
    stage compile_probe "$EXPECT_PROBE" "$LIMIT_PROBE" "$PY" benchmarks/compile_probe.py --device "$DEVICE" \
        $PROBE_ARGS --code "$OUT/compile_probe_code.py" --json "$TMP/compile_probe.json" \
        --markdown "$TMP/compile_probe.md"
fi
if [ "${REF_COMPILED:-1}" = 1 ]; then
    mode=$REF_COMPILE_MODE expect=$REF_COMPILE_EXPECT_S
    if [ "$(left)" -lt "$expect" ]; then
        echo "reference_compiled: $(left) s left, under the $expect s that mode $mode expects: mode" \
             "$REF_COMPILE_FALLBACK instead" | tee -a "$LOG" "$MD"
        mode=$REF_COMPILE_FALLBACK expect=$REF_COMPILE_FALLBACK_EXPECT_S
    fi
    # shellcheck disable=SC2046,SC2086
    stage reference_compiled "$expect" "$BUDGET_S" "${BENCH[@]}" --tasks text_to_image --ours default \
        --reference eager compiled --ref-compile-mode "$mode" --ref-compile-backend "$REF_COMPILE_BACKEND" \
        --no-isolate ${REF_COMPILED_BATCHES:+--throughput-batches $REF_COMPILED_BATCHES} $(out reference_compiled)
fi
if [ "${BREAKDOWN:-1}" = 1 ]; then
    stage breakdown "$EXPECT_BREAKDOWN" "$BUDGET_S" "$PY" benchmarks/step_breakdown.py "$CKPT" --device "$DEVICE" \
        --size "$SIZE" --steps "$STEPS" --json "$TMP/breakdown.json" --markdown "$TMP/breakdown.md"
fi
if [ "${OTHER_TASKS:-1}" = 1 ]; then
    # shellcheck disable=SC2046
    stage other_tasks "$EXPECT_OTHER" "$BUDGET_S" "${BENCH[@]}" --tasks image_variation dual_guided \
        --ours eager default --reference eager --no-isolate $(out other_tasks)
fi
if [ "${MEMORY:-1}" = 1 ]; then  # ours as loaded by default against the reference's loads, fresh processes
    # shellcheck disable=SC2046
    stage memory "$EXPECT_MEMORY" "$BUDGET_S" "${BENCH[@]}" --tasks text_to_image --skip-timing \
        --child-timeout 120 $(out memory)
fi
echo "done after $((SECONDS - start)) s" | tee -a "$LOG"
printf '\nAll stages ended after %s s.\n' "$((SECONDS - start))" >> "$MD"
rm -rf "$TMP"
