#!/usr/bin/env bash
# Multi-node training with DeepSpeed's own launcher (pdsh over ssh, or --no_ssh per node).
#
# Usage:
#   launchers/multinode_deepspeed.sh CONFIG.yaml HOSTFILE [--set key=value ...]
#
# Environment:
#   MASTER_ADDR   address of rank 0 as the other nodes see it (default: first hostfile host)
#   MASTER_PORT   rendezvous port (default: launch.master_port of the config, 29500)
#   NO_SSH=1      no pdsh: run this script on EVERY node yourself with NODE_RANK=0..N-1
#   NODE_RANK     this node's index in the hostfile (NO_SSH=1 only)
#   DRY_RUN=1     print the resolved command(s) and exit without training
#   PYTHON        interpreter with ds_relora installed (default: python3)
#
# pdsh mode needs passwordless ssh from this node to every host (and to itself), the same
# repo path and Python path on every node, and pdsh installed here. pdsh forwards only
# NCCL_*, PYTHON*, UCX_* and the lines of ./.deepspeed_env to the other nodes; put other
# variables (HF_HOME, WANDB_API_KEY, ...) into ./.deepspeed_env as NAME=VALUE lines.
set -euo pipefail

usage="usage: $0 CONFIG.yaml HOSTFILE [--set key=value ...]"
config=${1:?$usage}
hostfile=${2:?$usage}
shift 2
PYTHON=${PYTHON:-python3}

if [[ ! -r $hostfile ]]; then
    echo "error: hostfile $hostfile is missing or unreadable: write it with launchers/make_hostfile.sh" >&2
    exit 2
fi
# Node count and slots come from the hostfile; ds_relora re-checks them against each other.
nodes=$(awk '!/^[[:space:]]*(#|$)/ {n++} END {print n + 0}' "$hostfile")
slots=$(awk '!/^[[:space:]]*(#|$)/ {for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) {sub(/^slots=/, "", $i); print $i; exit}}' "$hostfile")

sets=(--set launch.launcher=deepspeed --set "launch.hostfile=$hostfile"
      --set "launch.num_nodes=$nodes" --set "launch.num_gpus=${slots:-1}")
if [[ -n ${MASTER_ADDR:-} ]]; then sets+=(--set "launch.master_addr=$MASTER_ADDR"); fi
if [[ -n ${MASTER_PORT:-} ]]; then sets+=(--set "launch.master_port=$MASTER_PORT"); fi
if [[ ${NO_SSH:-0} == 1 ]]; then
    sets+=(--set launch.no_ssh=true --set "launch.node_rank=${NODE_RANK:?NO_SSH=1 needs NODE_RANK}")
fi

if [[ ${DRY_RUN:-0} == 1 ]]; then
    exec "$PYTHON" -m ds_relora.launch dry-run --config "$config" "${sets[@]}" "$@"
fi
exec "${DS_RELORA:-ds-relora}" train --config "$config" "${sets[@]}" "$@"
