#!/usr/bin/env bash
# One-command GPU check on one NVIDIA GPU machine, no network needed:
#   bash scripts/gpu_check.sh [--peak-tflops 989] [any ds_relora.gpu_check option]
# Installs the wheels that scripts/prepare_gpu_wheels.sh put into .whl/ (DeepSpeed, pydantic,
# ...) into a private folder, keeping the machine's own torch/transformers, then runs
# `python -m ds_relora.gpu_check` under an 8-minute limit: bf16 ReLoRA runs on ZeRO 0/2/3/3+offload
# (merge, reset, checkpoint, resume), the attention kernel, and the full-vs-relora throughput pair
# (tokens/s, MFU, peak memory). Prints a results block; writes $OUT/gpu_check.json when OUT is set.
# Exit status: 0 all passed, 1 a run failed, 2 setup problem, 124 over the time limit.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
SITE=${DS_RELORA_SITE:-/tmp/ds_relora_site}
LIMIT=${GPU_CHECK_LIMIT_S:-470}
started=$(date +%s)

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "error: no CUDA GPU visible to $PY (torch.cuda.is_available() is False): run this on the GPU machine" >&2
  exit 2
fi
# Install only when something is missing; --no-deps keeps the machine's torch and transformers.
if ! "$PY" -c 'import deepspeed, pydantic, hjson' >/dev/null 2>&1 \
   && ! PYTHONPATH="$SITE" "$PY" -c 'import deepspeed, pydantic, hjson' >/dev/null 2>&1; then
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "error: DeepSpeed is not installed and $WHEELS/ holds no wheels: run scripts/prepare_gpu_wheels.sh on a networked machine first and bring $WHEELS/ along" >&2
    exit 2
  fi
  echo "installing ${#wheels[@]} wheel(s) from $WHEELS/ into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "${wheels[@]}"
fi
# The checkout first (its ds_relora, benchmarks/ and ds_configs/), then the installed wheels.
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export DS_ACCELERATOR=cuda TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/ds_relora_torch_ext}
"$PY" -c 'import deepspeed, torch; print(f"deepspeed {deepspeed.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name(0)}")'
left=$((LIMIT - ($(date +%s) - started)))
[ "$left" -ge 60 ] || left=60  # (timeout 0 would mean no limit at all)
rc=0
timeout --signal=TERM --kill-after=10 "$left" "$PY" -m ds_relora.gpu_check "$@" || rc=$?
if [ "$rc" -eq 124 ]; then
  echo "error: the GPU check ran past its ${LIMIT}s limit (GPU_CHECK_LIMIT_S)" >&2
fi
exit "$rc"
