#!/usr/bin/env bash
# Run on a machine WITH network, before taking the checkout to a GPU machine without one:
#   bash scripts/prepare_gpu_wheels.sh            # -> .whl/ (then: bash scripts/gpu_check.sh there)
# Fetches wheels for the GPU machine's Python (TARGET_PY, default 3.12, manylinux x86_64) of what
# such a machine usually lacks: DeepSpeed 0.19.8 (built here, ops not prebuilt: DS_BUILD_OPS=0,
# a pure-Python wheel), its small dependencies, pydantic (+pydantic-core, exact pair), datasets,
# and ds_relora's own wheel. torch, transformers, tokenizers, numpy, safetensors, pyyaml, tqdm and
# mpi4py are expected there already (they are never downloaded: no CUDA torch is fetched).
# DATASETS_FULL=1 also fetches pyarrow and pandas (~60 MB) for hf: data sources.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${WHEELS:-.whl}
TARGET_PY=${TARGET_PY:-3.12}
ABI="cp${TARGET_PY/./}"
mkdir -p "$DEST"
platform=(--only-binary=:all: --python-version "$TARGET_PY" --implementation cp --abi "$ABI" --abi abi3 --abi none
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64
          )

echo "[1/4] DeepSpeed 0.19.8 wheel (no prebuilt ops)"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps "deepspeed==0.19.8" -w "$DEST"
echo "[2/4] DeepSpeed's and pydantic's dependencies for Python $TARGET_PY"
# With dependencies: pydantic pins its exact pydantic-core, which must come along.
"$PY" -m pip download -q "${platform[@]}" -d "$DEST" \
  "pydantic>=2" hjson ninja msgpack psutil py-cpuinfo einops
echo "[3/4] datasets"
"$PY" -m pip download -q "${platform[@]}" --no-deps -d "$DEST" "datasets>=3.0" dill multiprocess xxhash fsspec
if [ "${DATASETS_FULL:-0}" = 1 ]; then
  "$PY" -m pip download -q "${platform[@]}" -d "$DEST" pyarrow pandas
fi
echo "[4/4] ds_relora's own wheel"
"$PY" -m pip wheel -q --no-deps . -w "$DEST"
# typing_extensions & co. come with pydantic; nothing here may shadow the GPU machine's torch.
rm -f "$DEST"/torch-*.whl "$DEST"/nvidia_*.whl "$DEST"/triton-*.whl "$DEST"/numpy-*.whl
ls -1 "$DEST"
du -sh "$DEST"
