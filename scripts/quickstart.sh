#!/usr/bin/env bash
# Set everything up, then run the quickstart comparison (seed vs vanilla vs SDFT).
# Usage: bash scripts/quickstart.sh [DATA_DIR] [extra sdft run flags]
# DATA_DIR defaults to $SDFT_DATA_DIR, then ../shared/data beside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

DATA_DIR="${1:-${SDFT_DATA_DIR:-../shared/data}}"
shift || true
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
.venv/bin/sdft run configs/quickstart.yaml --data-dir "$DATA_DIR" --output-dir runs/quickstart "$@"
