#!/usr/bin/env bash
# Installs the official `openai` client into a venv (PyPI) and runs the server test that uses it:
#   tests/serve/run_openai_client.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${1:-target/openai-venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade "openai>=1.40"
KILN_TEST_PYTHON="$venv/bin/python" cargo test --test serve openai_python_client -- --nocapture
