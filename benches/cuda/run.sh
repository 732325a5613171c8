#!/usr/bin/env bash
# kiln-cuda on a GPU in one run: every GPU test (each kernel against the CPU kernels of
# kiln-cpu on odd sizes, the composite forward/backward/optimizer checks), then the
# benchmarks, then one JSON of figures with the targets. Made for short device time: every
# step has a time limit, a failing step does not stop the others, progress is printed.
#
#   benches/cuda/run.sh            # writes $OUT/figures.json (OUT defaults to target/cuda-run)
#
# Fast path: run benches/cuda/prepare.sh first on any machine (no GPU needed) and carry
# target/cuda-carry/ along: prebuilt binaries and a warm kernel cache, so this script needs
# neither a Rust toolchain nor NVRTC. Without it, the script builds with cargo and compiles
# the kernels with NVRTC (KILN_NVRTC_LIB_DIR, .venv, or the CUDA toolkit's lib64).
# QUICK=1 skips the larger benchmark shapes.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${OUT:-$ROOT/target/cuda-run}
CARRY=$ROOT/target/cuda-carry
mkdir -p "$OUT"
START=$SECONDS
STEPS=()

log() { printf '[%4ds] %s\n' $((SECONDS - START)) "$*"; }

# step NAME SECONDS CMD...: runs CMD with a time limit, output to $OUT/NAME.log.
step() {
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    log "start $name"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    local took=$((SECONDS - t0)) status=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=timeout; elif [ $rc -ne 0 ]; then status=failed; fi
    STEPS+=("$name $status $took")
    log "$status $name (${took}s)"
    if [ "$status" != ok ]; then tail -n 15 "$OUT/$name.log" | sed 's/^/      /'; fi
    return 0
}

log "kiln-cuda GPU run, commit $(git rev-parse --short HEAD 2>/dev/null || cat "$CARRY/commit" 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null \
    | sed 's/^/       gpu: /' || log "nvidia-smi not found"

# ---- kernels: the cache, and NVRTC for whatever the cache lacks ----------------------------------
if [ -d "$CARRY/kernel-cache" ]; then
    export KILN_CUDA_CACHE=${KILN_CUDA_CACHE:-$CARRY/kernel-cache}
else
    export KILN_CUDA_CACHE=${KILN_CUDA_CACHE:-$OUT/kernel-cache}
fi
if [ -z "${KILN_NVRTC_LIB_DIR:-}" ] && [ -f "$CARRY/nvrtc.tar.xz" ]; then
    mkdir -p "$OUT/nvrtc" && tar -C "$OUT/nvrtc" -xJf "$CARRY/nvrtc.tar.xz" && export KILN_NVRTC_LIB_DIR=$OUT/nvrtc
fi
log "kernel cache $KILN_CUDA_CACHE ($(ls "$KILN_CUDA_CACHE" 2>/dev/null | grep -c cubin) cubins); NVRTC ${KILN_NVRTC_LIB_DIR:-searched}"
export KILN_SKIP_EMU=1 # the CPU emulator's tests ran where the code was built

# ---- binaries ------------------------------------------------------------------------------------
TESTS=(device ops_basic gemm attention conv composite)
if [ -x "$CARRY/bin/kiln" ]; then
    KILN=$CARRY/bin/kiln
    BIN=$CARRY/bin
    log "prebuilt binaries from $CARRY/bin"
else
    BIN=$OUT/bin
    mkdir -p "$BIN"
    step build 900 bash -c '
        set -e
        cargo build --release -q --bin kiln
        cp target/release/kiln "'"$BIN"'/kiln"
        for t in '"${TESTS[*]}"'; do
            exe=$(cargo test -q -p kiln-cuda --test "$t" --no-run --message-format=json \
                | grep -o "\"executable\":\"[^\"]*\"" | tail -n 1 | cut -d\" -f4)
            cp "$exe" "'"$BIN"'/test-$t"
        done'
    KILN=$BIN/kiln
fi

step device-info 120 "$KILN" cuda info --json
cat "$OUT/device-info.log"

# ---- GPU tests -----------------------------------------------------------------------------------
for t in "${TESTS[@]}"; do
    if [ -x "$BIN/test-$t" ]; then
        # KILN_CUDA_SYNC: a kernel fault is reported with the kernel's name.
        step "test-$t" 300 env KILN_CUDA_SYNC=1 "$BIN/test-$t" --test-threads=1 --nocapture
        # A GPU test that found no device prints SKIP: on this machine that is a failure.
        if grep -q "SKIP .*no CUDA device" "$OUT/test-$t.log"; then
            STEPS+=("test-$t-found-no-gpu failed 0")
            log "failed: test-$t found no GPU"
        fi
    else
        STEPS+=("test-$t missing 0")
    fi
done

# ---- benchmarks (one JSON record per line) -------------------------------------------------------
BENCH=$OUT/bench.jsonl
: >"$BENCH"
bench() {
    local name=$1
    shift
    step "bench-$name" 180 "$KILN" bench "$@" --device cuda --json
    grep '^{' "$OUT/bench-$name.log" | sed "s/^{/{\"bench\":\"$name\",/" >>"$BENCH"
}
bench peak peak
bench matmul-f32-4096 matmul --m 4096 --n 4096 --k 4096 --reps 10
bench matmul-bf16-4096 matmul --m 4096 --n 4096 --k 4096 --dtype bf16 --matmul-precision bf16 --reps 10
bench matmul-gpt2-qkv-decode matmul --m 1 --n 2304 --k 768 --dtype bf16 --reps 50
bench matmul-gpt2-logits-decode matmul --m 1 --n 50257 --k 768 --dtype bf16 --layout col --reps 50
bench matmul-gpt2-fc-prefill matmul --m 1024 --n 3072 --k 768 --reps 20
bench attention-bf16-4096 attention --seq 4096 --heads 12 --head-dim 64 --causal --kv-dtype bf16 --min-ms 500
bench attention-f32-1024 attention --seq 1024 --heads 12 --head-dim 64 --causal --min-ms 300
bench attention-decode-1024 attention --seq 1024 --heads 12 --head-dim 64 --decode --kv-dtype bf16 --min-ms 300
bench conv-dcgan conv2d --dcgan --batch 64 --min-time 0.1
if [ "${QUICK:-0}" != 1 ]; then
    bench matmul-bf16-8192 matmul --m 8192 --n 8192 --k 8192 --dtype bf16 --matmul-precision bf16 --reps 5
    bench attention-bf16-8192-d128 attention --seq 8192 --heads 16 --head-dim 128 --causal --kv-dtype bf16 --min-ms 500
fi
# GPT-2 decode and the DCGAN training step, once the models run on this device.
if "$KILN" gpt2 generate --help 2>/dev/null | grep -q -- '--device'; then
    step gpt2-decode 300 "$KILN" gpt2 generate --model "$OUT/gpt2-124M" --init-if-missing 124M \
        --prompt "The" --max-new-tokens 256 --greedy --dtype bf16 --device cuda
else
    STEPS+=("gpt2-decode not-available 0")
fi

# ---- figures.json ------------------------------------------------------------------------------------
{
    printf '{\n  "commit": "%s",\n' "$(git rev-parse HEAD 2>/dev/null || cat "$CARRY/commit" 2>/dev/null)"
    printf '  "device": %s,\n' "$(grep '^{' "$OUT/device-info.log" | head -n 1 || echo null)"
    printf '  "seconds": %d,\n  "steps": [\n' $((SECONDS - START))
    n=${#STEPS[@]}
    for i in "${!STEPS[@]}"; do
        read -r name status took <<<"${STEPS[$i]}"
        printf '    {"name": "%s", "status": "%s", "seconds": %s}%s\n' "$name" "$status" "$took" "$([ $((i + 1)) -lt $n ] && echo ,)"
    done
    printf '  ],\n  "benchmarks": [\n'
    sed '$!s/$/,/' "$BENCH" | sed 's/^/    /'
    printf '  ]\n}\n'
} >"$OUT/figures.json"

# The targets, where python3 is present to read the records.
if command -v python3 >/dev/null; then
    python3 - "$OUT/figures.json" <<'PY'
import json, sys
path = sys.argv[1]
f = json.load(open(path))
recs = {r["bench"]: r for r in f["benchmarks"]}
def get(name, key):
    r = recs.get(name)
    return None if r is None else r.get(key)
targets = [
    ("bf16 GEMM 4096^3 >= 50% of dense bf16 peak", get("matmul-bf16-4096", "peak_fraction"), 0.50),
    ("f32 GEMM 4096^3 >= 60% of f32 peak", get("matmul-f32-4096", "peak_fraction"), 0.60),
    ("flash attention T=4096 h=12 d=64 causal bf16 >= 250 TFLOP/s",
     (get("attention-bf16-4096", "gflops") or 0) / 1e3 or None, 250.0),
]
f["targets"] = [{"target": t, "value": v, "threshold": th, "met": v is not None and v >= th} for t, v, th in targets]
json.dump(f, open(path, "w"), indent=2)
for t in f["targets"]:
    print(f"  {'MET ' if t['met'] else 'MISS'} {t['target']}: {t['value']}")
PY
fi
failed=$(printf '%s\n' "${STEPS[@]}" | awk '$2 != "ok" && $2 != "not-available"' | wc -l)
log "done: $failed step(s) not ok; figures in $OUT/figures.json"
printf '%s\n' "${STEPS[@]}" | awk '{printf "       %-34s %-14s %ss\n", $1, $2, $3}'
[ "$failed" -eq 0 ]
