#!/usr/bin/env bash
# Set everything up, then run the test suite (about 10 minutes on 2 CPU cores).
# Usage: bash scripts/test.sh [pytest arguments]
# Tests read real datasets from $SDFT_DATA_DIR, else ../shared/data beside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

export SDFT_DATA_DIR="${SDFT_DATA_DIR:-$(cd .. && pwd)/shared/data}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/python -m pytest -q "$@"
