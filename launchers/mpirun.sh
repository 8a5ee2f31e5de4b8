#!/usr/bin/env bash
# Training under mpirun (Open MPI or MPICH/Hydra); ranks come from mpi4py discovery.
#
# Usage:
#   launchers/mpirun.sh CONFIG.yaml [--set key=value ...]
#
# Environment:
#   HOSTFILE        "host slots=N" file; required for more than one node
#   GPUS_PER_NODE   ranks per node (default: slots of the hostfile, else 1)
#   MPI_FLAVOR      auto (default; from `mpirun --version`), openmpi or mpich
#   MASTER_PORT     rendezvous port passed to every rank (-x / -genv)
#   DRY_RUN=1       print the resolved mpirun command and exit without training
#   PYTHON          interpreter with ds_relora installed (default: python3)
#
# Open MPI does not forward the environment by itself: ds_relora adds `-x NAME` for the
# NCCL_*, UCX_*, FI_*, HF_*, WANDB_*, TORCH_*, PYTHONPATH and OMP_NUM_THREADS variables that
# are set here. MPICH's Hydra forwards the whole environment. mpi4py must be built against
# the same MPI as this mpirun (pip's mpi4py + the `mpich` wheel, or a system MPI + mpi4py
# built from source).
set -euo pipefail

usage="usage: $0 CONFIG.yaml [--set key=value ...]"
config=${1:?$usage}
shift
PYTHON=${PYTHON:-python3}

nodes=1
slots=${GPUS_PER_NODE:-}
sets=(--set launch.launcher=mpi --set "launch.mpi_flavor=${MPI_FLAVOR:-auto}")
if [[ -n ${HOSTFILE:-} ]]; then
    if [[ ! -r $HOSTFILE ]]; then
        echo "error: HOSTFILE=$HOSTFILE is missing or unreadable: write it with launchers/make_hostfile.sh" >&2
        exit 2
    fi
    nodes=$(awk '!/^[[:space:]]*(#|$)/ {n++} END {print n + 0}' "$HOSTFILE")
    if [[ -z $slots ]]; then
        slots=$(awk '!/^[[:space:]]*(#|$)/ {for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) {sub(/^slots=/, "", $i); print $i; exit}}' "$HOSTFILE")
    fi
    sets+=(--set "launch.hostfile=$HOSTFILE")
fi
sets+=(--set "launch.num_nodes=$nodes" --set "launch.num_gpus=${slots:-1}")
if [[ -n ${MASTER_PORT:-} ]]; then sets+=(--set "launch.master_port=$MASTER_PORT"); fi

if [[ ${DRY_RUN:-0} == 1 ]]; then
    exec "$PYTHON" -m ds_relora.launch dry-run --config "$config" "${sets[@]}" "$@"
fi
exec "${DS_RELORA:-ds-relora}" train --config "$config" "${sets[@]}" "$@"
