#!/usr/bin/env bash
# The CPU quickstart: set up, write synthetic captioned shards, train the tiny VAE, train the tiny LDM, sample a grid.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# cache the bytecode of whatever the run imports beyond set-up's list (see setup.sh)
unset PYTHONDONTWRITEBYTECODE
exec .venv/bin/python scripts/quickstart.py "$@"
