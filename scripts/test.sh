#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU, no network). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# cache the bytecode of whatever the run imports beyond set-up's list (see setup.sh)
unset PYTHONDONTWRITEBYTECODE
export HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true
# test files in parallel, two processes (LDM_TEST_WORKERS; 0 runs them in this one), each file whole in one of them
# (its fixtures built once), the files with slow tests first (tests/conftest.py). Later arguments override these.
exec .venv/bin/python -m pytest -n "${LDM_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
