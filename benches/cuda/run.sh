#!/usr/bin/env bash
# kiln-cuda on a GPU in one run: the models on the GPU first (CudaBackend against the CPU
# backend, GPT-2 124M bf16 decode, a DCGAN training step at batch 64, and the same runs'
# results compared with the CPU path), then every GPU kernel test (each kernel against the
# CPU kernels of kiln-cpu on odd sizes, the composite forward/backward/optimizer checks), then
# the kernel benchmarks; one JSON of figures with the targets. Made for short device time:
# every step has a time limit, a failing step does not stop the others, progress is printed,
# and the figures JSON is rewritten after every step (a run cut short keeps what it measured).
#
#   benches/cuda/run.sh            # writes $OUT/figures.json (OUT defaults to target/cuda-run)
#
# Fast path: run benches/cuda/prepare.sh first on any machine (no GPU needed) and carry
# target/cuda-carry/ along: prebuilt binaries and a warm kernel cache, so this script needs
# neither a Rust toolchain nor NVRTC. Without it, the script builds with cargo and compiles
# the kernels with NVRTC (KILN_NVRTC_LIB_DIR, .venv, or the CUDA toolkit's lib64).
# QUICK=1 skips the larger benchmark shapes. PYTHON (default python3; standard library only)
# compares the GPU runs with the CPU runs and checks the targets; without it those are skipped.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${OUT:-$ROOT/target/cuda-run}
CARRY=$ROOT/target/cuda-carry
mkdir -p "$OUT"
START=$SECONDS
STEPS=()
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=
BENCH=$OUT/bench.jsonl
: >"$BENCH"

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
    write_figures
    return 0
}

# record NAME FILE: every JSON object line of FILE, tagged {"bench": NAME, ...}, into $BENCH.
record() {
    grep '^{' "$2" 2>/dev/null | sed "s/^{/{\"bench\":\"$1\",/" >>"$BENCH"
    return 0
}

# figures.json from what has run so far (called after every step), with the targets.
write_figures() {
    {
        printf '{\n  "commit": "%s",\n' "$(git rev-parse HEAD 2>/dev/null || cat "$CARRY/commit" 2>/dev/null)"
        printf '  "device": %s,\n' "$(grep '^{' "$OUT/device-info.log" 2>/dev/null | head -n 1 || true)"
        printf '  "seconds": %d,\n  "steps": [\n' $((SECONDS - START))
        local n=${#STEPS[@]} i name status took
        for i in "${!STEPS[@]}"; do
            read -r name status took <<<"${STEPS[$i]}"
            printf '    {"name": "%s", "status": "%s", "seconds": %s}%s\n' "$name" "$status" "$took" "$([ $((i + 1)) -lt "$n" ] && echo ,)"
        done
        printf '  ],\n  "benchmarks": [\n'
        sed '$!s/$/,/' "$BENCH" | sed 's/^/    /'
        printf '  ]\n}\n'
    } >"$OUT/figures.json.tmp"
    # An empty device line (before device-info ran) would not be JSON.
    sed -i 's/^  "device": ,$/  "device": null,/' "$OUT/figures.json.tmp"
    mv "$OUT/figures.json.tmp" "$OUT/figures.json"
    [ -n "$PY" ] && "$PY" - "$OUT/figures.json" >"$OUT/targets.txt" 2>&1 <<'PY' || true
import json, sys
path = sys.argv[1]
f = json.load(open(path))
recs = {}
for r in f["benchmarks"]:
    recs.setdefault(r["bench"], r)
def get(name, key):
    r = recs.get(name)
    return None if r is None else r.get(key)
gflops = get("attention-bf16-4096", "gflops")
targets = [
    # (what, value, threshold, higher is better)
    ("bf16 GEMM 4096^3 >= 50% of dense bf16 peak", get("matmul-bf16-4096", "peak_fraction"), 0.50, True),
    ("f32 GEMM 4096^3 >= 60% of f32 peak", get("matmul-f32-4096", "peak_fraction"), 0.60, True),
    ("flash attention T=4096 h=12 d=64 causal bf16 >= 250 TFLOP/s",
     None if gflops is None else gflops / 1e3, 250.0, True),
    ("GPT-2 124M bf16 decode at batch 1 >= 1000 tokens/s",
     get("gpt2-decode-bf16", "decode_tokens_per_s"), 1000.0, True),
    ("DCGAN training step at batch 64 < 10 ms", get("dcgan-train-step", "median_ms"), 10.0, False),
]
f["targets"] = [
    {"target": t, "value": v, "threshold": th, "higher_is_better": up,
     "met": v is not None and (v >= th if up else v < th)}
    for t, v, th, up in targets
]
json.dump(f, open(path, "w"), indent=2)
for t in f["targets"]:
    print(f"  {'MET ' if t['met'] else 'MISS'} {t['target']}: {t['value']}")
PY
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
TESTS=(backend device ops_basic gemm attention conv composite)
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

# ---- the models on the GPU (CudaBackend), first: the figures the targets need --------------------
# CudaBackend against the CPU backend (every op; GPT-2 decode logits and transfers; a DCGAN and
# a GPT-2 training step). Its `FIGURE {...}` lines are the comparisons' figures.
if [ -x "$BIN/test-backend" ]; then
    step test-backend 300 env KILN_CUDA_SYNC=1 "$BIN/test-backend" --test-threads=1 --nocapture
    grep '^FIGURE ' "$OUT/test-backend.log" | sed 's/^FIGURE {/{"bench":"compare",/' >>"$BENCH"
    if grep -q "SKIP .*(gpu)" "$OUT/test-backend.log"; then
        STEPS+=("test-backend-found-no-gpu failed 0")
        log "failed: test-backend found no GPU"
    fi
else
    STEPS+=("test-backend missing 0")
fi
# GPT-2 124M (random weights, bf16): decode tokens/s at batch 1 and at batch 8.
GPT2=$OUT/gpt2-124M
if [ ! -f "$GPT2/config.json" ]; then
    step gpt2-init 240 "$KILN" gpt2 init --out "$GPT2" --size 124M --dtype bf16
fi
step gpt2-decode-bf16 240 "$KILN" gpt2 generate --model "$GPT2" --prompt "The" \
    --max-new-tokens 256 --greedy --dtype bf16 --device cuda --json
record gpt2-decode-bf16 "$OUT/gpt2-decode-bf16.log"
printf '%s\n' "The" "Once upon a time" "In 1990" "Hello" "A" "The capital of France is" "Rust is" "1, 2, 3," \
    >"$OUT/prompts8.txt"
step gpt2-decode-bf16-batch8 240 "$KILN" gpt2 generate --model "$GPT2" --batch-prompts "$OUT/prompts8.txt" \
    --max-new-tokens 128 --greedy --dtype bf16 --device cuda --json
record gpt2-decode-bf16-batch8 <(head -n 1 "$OUT/gpt2-decode-bf16-batch8.log")
# The logits of a 32-token sequence, GPU against CPU (same bf16 weights).
IDS=464,3139,286,4881,318,6342,13,383,3139,286,4486,318,11307,13,1318,389,867,1180,1661,287,262,995,11,290,257,1256,286,606,389,6342,13,198
step gpt2-logits-cuda 240 "$KILN" gpt2 logits --model "$GPT2" --ids "$IDS" --dtype bf16 --device cuda --out "$OUT/logits-cuda.safetensors"
step gpt2-logits-cpu 240 "$KILN" gpt2 logits --model "$GPT2" --ids "$IDS" --dtype bf16 --out "$OUT/logits-cpu.safetensors"
if [ -n "$PY" ] && [ -f "$OUT/logits-cuda.safetensors" ] && [ -f "$OUT/logits-cpu.safetensors" ]; then
    "$PY" benches/cuda/compare.py logits "$OUT/logits-cuda.safetensors" "$OUT/logits-cpu.safetensors" \
        >"$OUT/gpt2-logits-compare.log" 2>&1
    record gpt2-124M-logits-vs-cpu "$OUT/gpt2-logits-compare.log"
fi
# DCGAN (the PyTorch example's widths): one training step at batch 64, the generator's forward.
step dcgan-train-step 180 "$KILN" bench dcgan --train --batch 64 --device cuda --min-time 2 --json
record dcgan-train-step "$OUT/dcgan-train-step.log"
step dcgan-generate 180 "$KILN" bench dcgan --batch 64 --device cuda --min-time 1 --json
record dcgan-generate "$OUT/dcgan-generate.log"
# Two training steps from the same seed on the GPU and on the CPU: losses, D(x), D(G(z)).
for dev in cuda cpu; do
    rm -rf "$OUT/dcgan-run-$dev"
    step "dcgan-run-$dev" 240 "$KILN" dcgan train --data synthetic --out "$OUT/dcgan-run-$dev" \
        --steps 2 --batch 64 --seed 1 --quality-every 0 --quiet --device "$dev"
done
if [ -n "$PY" ] && [ -f "$OUT/dcgan-run-cuda/metrics.csv" ] && [ -f "$OUT/dcgan-run-cpu/metrics.csv" ]; then
    "$PY" benches/cuda/compare.py dcgan "$OUT/dcgan-run-cuda/metrics.csv" "$OUT/dcgan-run-cpu/metrics.csv" \
        >"$OUT/dcgan-compare.log" 2>&1
    record dcgan-step-vs-cpu "$OUT/dcgan-compare.log"
fi

# ---- GPU tests -----------------------------------------------------------------------------------
for t in "${TESTS[@]}"; do
    [ "$t" = backend ] && continue # ran first, above
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
bench() {
    local name=$1
    shift
    step "bench-$name" 180 "$KILN" bench "$@" --device cuda --json
    record "$name" "$OUT/bench-$name.log"
    write_figures
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
# ---- figures.json --------------------------------------------------------------------------------
write_figures
cat "$OUT/targets.txt" 2>/dev/null
failed=$(printf '%s\n' "${STEPS[@]}" | awk '$2 != "ok" && $2 != "not-available"' | wc -l)
log "done: $failed step(s) not ok; figures in $OUT/figures.json"
printf '%s\n' "${STEPS[@]}" | awk '{printf "       %-34s %-14s %ss\n", $1, $2, $3}'
[ "$failed" -eq 0 ]
