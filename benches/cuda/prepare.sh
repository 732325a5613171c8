#!/usr/bin/env bash
# Prepares a GPU run on a machine WITHOUT a GPU: builds the GPU test binaries and the kiln
# binary (no debug info, stripped), fills the kernel cache for sm_90 (H100/H200) with NVRTC,
# and puts everything under target/cuda-carry/ — the one folder to carry to the GPU machine,
# where benches/cuda/run.sh uses it (no Rust toolchain or NVRTC needed there).
#
#   benches/cuda/prepare.sh [--arch 90] [--with-nvrtc]
#
# --with-nvrtc also packs libnvrtc (xz, about 35 MB) for kernels missing from the cache.
set -euo pipefail
cd "$(dirname "$0")/../.."
ARCH=90
WITH_NVRTC=0
while [ $# -gt 0 ]; do
    case "$1" in
        --arch) ARCH=$2; shift 2 ;;
        --with-nvrtc) WITH_NVRTC=1; shift ;;
        *) echo "usage: $0 [--arch XY] [--with-nvrtc]" >&2; exit 2 ;;
    esac
done
CARRY=target/cuda-carry
rm -rf "$CARRY/bin" "$CARRY/kernel-cache"
mkdir -p "$CARRY/bin" "$CARRY/kernel-cache"
export CARGO_PROFILE_TEST_DEBUG=0 CARGO_PROFILE_RELEASE_DEBUG=0

echo "== building the kiln binary (release)"
cargo build --release -q --bin kiln
cp target/release/kiln "$CARRY/bin/kiln"

echo "== building the kiln-cuda test binaries"
tests=(backend device ops_basic gemm attention conv composite)
for t in "${tests[@]}"; do
    exe=$(cargo test -q -p kiln-cuda --test "$t" --no-run --message-format=json 2>/dev/null \
        | grep -o '"executable":"[^"]*"' | tail -n 1 | cut -d'"' -f4)
    test -x "$exe" || { echo "no test binary for $t" >&2; exit 1; }
    cp "$exe" "$CARRY/bin/test-$t"
done
strip "$CARRY"/bin/* 2>/dev/null || true

echo "== filling the kernel cache for sm_$ARCH"
"$CARRY/bin/kiln" cuda compile --arch "$ARCH" --cache "$CARRY/kernel-cache"

if [ "$WITH_NVRTC" = 1 ]; then
    lib=$(ls -d .venv/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -n 1)
    test -n "$lib" || { echo "no NVRTC in .venv (run .ci/install-nvrtc.sh)" >&2; exit 1; }
    echo "== packing NVRTC from $lib"
    tar -C "$lib" -cJf "$CARRY/nvrtc.tar.xz" libnvrtc.so.13 $(cd "$lib" && ls libnvrtc-builtins.so.13.*)
fi
git rev-parse HEAD > "$CARRY/commit"
du -sh "$CARRY"/* | sed 's/^/   /'
echo "carry target/cuda-carry to the GPU machine and run benches/cuda/run.sh there"
