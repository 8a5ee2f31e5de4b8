#!/usr/bin/env bash
# Write an MPI-style hostfile ("host slots=N" per line) for DeepSpeed / Open MPI.
#
# Usage:
#   launchers/make_hostfile.sh OUTPUT SLOTS [HOSTS]
#     HOSTS: "a,b,c" or a SLURM nodelist such as "gpu[01-04]"; default: $SLURM_JOB_NODELIST
#   DRY_RUN=1 prints the hostfile instead of writing it.
# The expansion is done by `python -m ds_relora.launch hostfile` (no scontrol needed), so the
# same parser serves the sbatch script and `launch.launcher=slurm`.
set -euo pipefail

usage="usage: $0 OUTPUT SLOTS [HOSTS|NODELIST]"
out=${1:?$usage}
slots=${2:?$usage}
hosts=${3:-${SLURM_JOB_NODELIST:-}}
PYTHON=${PYTHON:-python3}

if [[ -z $hosts ]]; then
    echo "error: no hosts given and SLURM_JOB_NODELIST is unset: pass HOSTS as a,b or gpu[01-04]" >&2
    exit 2
fi
if [[ ${DRY_RUN:-0} == 1 ]]; then
    echo "# would write $out:"
    exec "$PYTHON" -m ds_relora.launch hostfile "$hosts" --slots "$slots"
fi
exec "$PYTHON" -m ds_relora.launch hostfile "$hosts" --slots "$slots" -o "$out"
