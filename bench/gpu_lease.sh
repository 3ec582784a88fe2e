#!/usr/bin/env bash
# A GPU lease's whole job in one command that ends inside BUDGET seconds (default 480): these sessions get
# 15 device-minutes, machine start included. docs/benchmarks.md ("Running on a GPU") says how to call it:
#   here, once:  bash bench/gpu_wheels.sh                  # packages the GPU image lacks, as wheels in .whl/
#   there:       bash bench/gpu_lease.sh                   # device tool: carry [".whl"], timeout_s 560
# 1. the CUDA tests (the real Lightning trainer on the GPU: bf16-mixed, fused AdamW with clipping, the memory and
#    MFU panels; strategy=fsdp over NCCL with bf16 weights and per-block compile);
# 2. `bench/run.py lease` with the time left: SD2-size UNet at 256 px, bf16: training step, the largest batch that
#    fits, each fast path flipped, compile at the largest batch, sampling, the EMA / post-hoc EMA update cost.
# Results (JSON, the markdown tables, logs) go to $OUT (default /tmp/ldm-lease).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/ldm-lease}
BUDGET=${BUDGET:-480}
mkdir -p "$OUT"
start=$SECONDS
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
    exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
{
  nvidia-smi
  python3 -c "import torch, lightning; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'lightning', lightning.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
} >"$OUT/machine.txt" 2>&1
tail -n 1 "$OUT/machine.txt"

timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fast_paths.py 2>&1 | tee "$OUT/pytest.log"

left=$((BUDGET - (SECONDS - start)))
echo "benchmarks: ${left} s left"
python3 bench/run.py lease --budget "$left" --json-dir "$OUT" --markdown "$OUT/benchmarks.md" 2>&1 |
  tee "$OUT/bench.log"
echo "done in $((SECONDS - start)) s"
