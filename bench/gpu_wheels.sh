#!/usr/bin/env bash
# Fetch, here, the Python packages a GPU lease machine lacks (its image has torch, lightning, torchmetrics, einops,
# timm, numpy, pillow, huggingface_hub, safetensors, ...; not hydra, webdataset, open_clip or diffusers), as wheels
# for its Python 3.12 in .whl/ (git-ignored), for bench/gpu_lease.sh to install there. Versions: constraints.txt's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
wanted='hydra-core|omegaconf|antlr4-python3-runtime|webdataset|braceexpand|open_clip_torch|ftfy|wcwidth|diffusers'
mapfile -t pins < <(grep -E "^(${wanted}|importlib_metadata)==" constraints.txt)
rm -rf .whl && mkdir -p .whl
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do platforms+=(--platform "$tag"); done
for pin in "${pins[@]}"; do
  # antlr4-python3-runtime (hydra's parser) ships as an sdist only: build its pure-Python wheel here
  if ! .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$pin" 2>/dev/null; then
    .venv/bin/python -m pip wheel -q --no-deps -w .whl "$pin"
  fi
done
ls -l .whl
du -sh .whl
