#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export PATH="$PWD/.venv/bin:$PATH"  # deepspeed, mpirun and ds-relora from the venv
exec .venv/bin/python -m pytest -q "$@"
