#!/usr/bin/env bash
# Installs NVRTC 13.0 from PyPI into .venv (about 90 MB, a few seconds), where kiln-cuda's
# compile-check test (crates/kiln-cuda/tests/nvrtc_compile.rs) finds it. 13.0 matches the
# CUDA 13.0 driver of the GPU machines (NVRTC 13.5 would emit PTX that driver cannot load).
# Run before `cargo test --workspace` with CI set: a missing NVRTC then fails the test.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check 'cuda-toolkit[nvrtc]==13.0.2'
lib=$(ls -d .venv/lib/python3*/site-packages/nvidia/cu13/lib | head -n 1)
test -f "$lib/libnvrtc.so.13"
echo "NVRTC installed in $lib"
