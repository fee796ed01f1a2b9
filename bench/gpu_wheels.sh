#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels bench/gpu.py needs beyond torch and triton:
# the lent GPU machines come with a CUDA torch and no diffusers, and reach no package
# index.  diffusers and the two small packages mixdq imports, at this checkout's venv's
# versions, with their dependencies as pip resolves them for the GPU machine's Python
# (3.12 on the last one; PYTHON_VERSIONS="3.11 3.12" for both), about 35 MB per version:
# the device tool carries at most 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
pip=${PIP:-.venv/bin/pip}
pins=$("$pip" freeze | grep -iE '^(diffusers|pyyaml|tqdm|safetensors)==' || true)
[ "$(echo "$pins" | grep -c .)" = 4 ] || { echo "pins not found in $pip freeze: make the venv first" >&2; exit 1; }
mkdir -p "${WHEELS:-.whl}"
for pyv in ${PYTHON_VERSIONS:-3.12}; do
  # shellcheck disable=SC2086
  "$pip" download -q -d "${WHEELS:-.whl}" --only-binary=:all: --python-version "$pyv" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 $pins
done
du -sh "${WHEELS:-.whl}"
