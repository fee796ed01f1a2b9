#!/usr/bin/env bash
# One lent GPU's measurements for the Triton kernels (#17 point 5), prepared so that the
# device minutes go to timing.  Here first: `bash bench/gpu_wheels.sh`; then, with the
# device tool, one call:
#   run(command="bash bench/gpu_session.sh time", carry=[".whl"], timeout_s=590)
# `time` runs the compiled stage (both sides compiled, CUDA graphs; 512 px b1, 1024 px b1,
# 512 px b4) within BUDGET_S (420 s), each row saved as it is measured, so a stop loses
# only what was not reached.  A lent machine has about 15 minutes, its start included:
# that is one such call.  `dry` (every stage once at 512 px b1, one regional compile
# included: a few minutes on the GPU) is for a machine lent longer, and for rehearsals.
# Results land in $OUT (the device tool brings them back).  BENCH_ARGS adds options
# (a rehearsal on CPU: BENCH_ARGS="--model tiny-sdxl --device cpu").
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-time}
out=${OUT:-out}
budget=${BUDGET_S:-420}
mkdir -p "$out"
py=python3
# the GPU machines have a CUDA torch but no diffusers: install the carried wheels (never torch)
wheels=${WHEELS:-.whl}
if ! $py -c "import diffusers, yaml, tqdm, safetensors" 2>/dev/null; then
  [ -d "$wheels" ] || { echo "no $wheels/ here: run bench/gpu_wheels.sh before the session and carry it" >&2; exit 3; }
  $py -m pip install -q --no-index --find-links "$wheels" diffusers pyyaml tqdm safetensors \
    || { echo "installing the carried wheels failed (made for another Python? see bench/gpu_wheels.sh)" >&2; exit 3; }
fi
$py - <<'PY' | tee "$out/machine-$stage.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE",
      torch.cuda.get_device_capability(0) if torch.cuda.is_available() else "")
for name in ("triton", "diffusers", "numpy"):
    try:
        print(name, __import__(name).__version__)
    except ImportError as e:
        print(name, "MISSING", e)
PY
case "$stage" in
  # shellcheck disable=SC2086
  dry)  timeout 280 $py -m bench.gpu --out "$out" --configs 512,1 --dry-run ${BENCH_ARGS:-} ;;
  # shellcheck disable=SC2086
  time) timeout $((${budget%.*} + 150)) $py -m bench.gpu --out "$out" --stages compiled --budget-s "$budget" \
          ${BENCH_ARGS:-} ;;
  *)    echo "stage is dry or time, not $stage" >&2; exit 2 ;;
esac
