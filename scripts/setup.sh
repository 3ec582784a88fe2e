#!/usr/bin/env bash
# Idempotent set-up: .venv with ldm (editable), its pinned dependencies and the test tools.
# Versions: constraints.txt, the ones the tests last passed with. Re-runs are fast: pip runs again only when
# pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "ldm needs Python >= 3.11; found $("$PY" --version 2>&1). Set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.ldm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  echo "setting up .venv (torch, lightning, open_clip, webdataset, wandb …; about a minute)"
  log=.venv/pip-install.log  # pip's output goes here; shown only if the install fails
  # --no-compile: bytecode only for the modules something imports (below, and on first import) instead of pip
  # compiling all of torch's tree up front (~15 s of CPU on 2 cores)
  if ! .venv/bin/python -m pip install --disable-pip-version-check --no-compile -c constraints.txt -e ".[dev]" \
    >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "set-up failed; the whole pip log is in $log" >&2
    exit 1
  fi
  # Compile now what every entry point imports (torch, lightning, open_clip, hydra, ...). Otherwise, under
  # PYTHONDONTWRITEBYTECODE=1 (common in container images), every process recompiles it: a train.py start took 15 s
  # instead of 7.6 s on a 2-core machine. Reading cached bytecode is allowed under that setting.
  entry_points="ldm.training.run, ldm.inference, ldm.sampling, eval.runner, wandb, torch.distributed.fsdp"
  env -u PYTHONDONTWRITEBYTECODE .venv/bin/python -c "import $entry_points" >>"$log" 2>&1 || true
  touch "$stamp"
fi
