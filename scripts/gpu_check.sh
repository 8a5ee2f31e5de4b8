#!/usr/bin/env bash
# One-command GPU check on one NVIDIA GPU machine, no network needed:
#   bash scripts/gpu_check.sh [any `python -m ds_relora.gpu` option, e.g. --peak-tflops 989 --compile inductor]
# Installs ds_relora as a wheel (built from this checkout when setuptools can, else the one in
# .whl/ from scripts/prepare_gpu_wheels.sh) with --no-deps into a private folder, plus DeepSpeed,
# pydantic, ... from .whl/ when the machine lacks them (its own torch and transformers are kept),
# then runs `python -m ds_relora.gpu` from an empty folder, so the installed wheel is what
# is checked. Planned for 6 minutes on one H100/H200 (GPU_CHECK_LIMIT_S=360, install included):
# bf16 relora/remora/galore runs on ZeRO 0/2/3/3+offload (merge, reset, checkpoint, resume), then
# the full-vs-relora throughput pairs (tokens/s, MFU, peak memory, attention kernel that ran);
# a part that would not fit in the time left is skipped. gpu_check.json is rewritten after every
# part in $OUT (default: gpu_check_out/ in the checkout), so a timeout keeps what ran.
# Exit status: 0 all passed, 1 a run failed, 2 setup problem, 124 over the time limit.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WHEELS=$(cd "$HERE" && mkdir -p "${WHEELS:-.whl}" && cd "${WHEELS:-.whl}" && pwd)
SITE=${DS_RELORA_SITE:-/tmp/ds_relora_site}
LIMIT=${GPU_CHECK_LIMIT_S:-360}
export OUT=${OUT:-$HERE/gpu_check_out}
started=$(date +%s)

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "error: no CUDA GPU visible to $PY (torch.cuda.is_available() is False): run this on the GPU machine" >&2
  exit 2
fi
shopt -s nullglob
# The dependencies only when something is missing; --no-deps keeps the machine's torch and transformers.
if ! "$PY" -c 'import deepspeed, pydantic, hjson' >/dev/null 2>&1 \
   && ! PYTHONPATH="$SITE" "$PY" -c 'import deepspeed, pydantic, hjson' >/dev/null 2>&1; then
  deps=()
  for w in "$WHEELS"/*.whl; do [[ $(basename "$w") == ds_relora-* ]] || deps+=("$w"); done
  if [ ${#deps[@]} -eq 0 ]; then
    echo "error: DeepSpeed is not installed and $WHEELS/ holds no wheels: run scripts/prepare_gpu_wheels.sh on a networked machine first and bring .whl/ along" >&2
    exit 2
  fi
  echo "installing ${#deps[@]} dependency wheel(s) from $WHEELS/ into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --upgrade --target "$SITE" "${deps[@]}"
fi
# ds_relora itself: a fresh wheel of this checkout (the .whl/ one may predate local changes).
fresh=$(mktemp -d)
if [ -f "$HERE/pyproject.toml" ] \
   && "$PY" -m pip wheel -q --no-index --no-deps --no-build-isolation "$HERE" -w "$fresh" >/dev/null 2>&1; then
  own=("$fresh"/ds_relora-*.whl)
else
  own=("$WHEELS"/ds_relora-*.whl)
fi
if [ ${#own[@]} -eq 0 ]; then
  echo "error: no ds_relora wheel: this checkout did not build (needs setuptools>=77) and $WHEELS/ has none: run scripts/prepare_gpu_wheels.sh" >&2
  exit 2
fi
echo "installing ${own[-1]#"$fresh"/} into $SITE"
"$PY" -m pip install -q --no-index --no-deps --upgrade --target "$SITE" "${own[-1]}"
rm -rf "$fresh"

export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export DS_ACCELERATOR=cuda TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/ds_relora_torch_ext}
empty=$(mktemp -d)
cd "$empty"  # nothing of the checkout is importable from here
"$PY" - "$SITE" <<'EOF' || exit 2
import os, sys

import deepspeed, torch

import ds_relora

where = os.path.dirname(ds_relora.__file__)
if not where.startswith(os.path.realpath(sys.argv[1])) and not where.startswith(sys.argv[1]):
    sys.exit(f"error: ds_relora was imported from {where}, not the wheel in {sys.argv[1]}: unset PYTHONPATH entries that shadow it")
print(f"ds_relora {ds_relora.__version__} ({where}), deepspeed {deepspeed.__version__}, torch {torch.__version__}, "
      f"{torch.cuda.get_device_name(0)}")
EOF
left=$((LIMIT - ($(date +%s) - started)))
[ "$left" -ge 60 ] || left=60  # (timeout 0 would mean no limit at all)
rc=0
# The check plans its parts 20 s inside the hard limit; a later --budget-s of the caller wins.
timeout --signal=TERM --kill-after=10 "$left" "$PY" -m ds_relora.gpu --budget-s $((left - 20)) "$@" || rc=$?
if [ "$rc" -eq 124 ]; then
  echo "error: the GPU check ran past its ${LIMIT}s limit (GPU_CHECK_LIMIT_S); $OUT/gpu_check.json has the parts that finished" >&2
fi
echo "results: $OUT/gpu_check.json"
exit "$rc"
