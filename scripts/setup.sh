#!/usr/bin/env bash
# Create .venv (if missing) and install ds_relora with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: a CPU build where one is on local disk, else PyPI's default build.
python -m pip install -q "torch==2.13.0"
# setuptools' build backend warns "Editable installation. Please be careful with folders ... with
# the same name as your package" on every editable build, and pip >= 25 prints backend warnings
# even under -q. The filter matches only that message; build errors are not warnings and still show.
PYTHONWARNINGS="ignore:Editable installation" python -m pip install -q -e ".[test,eval]"
# Test-only oracle for GaLore (the paper authors' package). --no-deps: it declares bitsandbytes,
# which only its 8-bit optimizer needs; the tests load its AdamW without the package __init__.
python -m pip install -q --no-deps "galore-torch==1.0"
# Test-only oracles for APOLLO / APOLLO-Mini (apollo-torch) and Fira (fira), same reasons: the
# tests load their optimizers without the packages' __init__ (apollo-torch's imports bitsandbytes).
python -m pip install -q --no-deps "apollo-torch==1.0.3" "fira==1.0.2"
