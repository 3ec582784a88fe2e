#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU, no network). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# cache the bytecode of whatever the run imports beyond set-up's list (see setup.sh)
unset PYTHONDONTWRITEBYTECODE
export HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true
exec .venv/bin/python -m pytest "$@"
