#!/usr/bin/env bash
# The quick start: set up, prepare the embedded corpus, train a tiny LLaMA with ReLoRA on
# 2 CPU ranks (deepspeed launcher), evaluate the last checkpoint and export a merged HF model.
# Runs in the current directory (data/, runs/, exports/); extra arguments are passed to
# prepare-data and train, e.g. --set train.total_steps=100.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ "${DS_RELORA_SKIP_SETUP:-0}" != 1 ]; then
  bash "$repo/scripts/setup.sh"
  export PATH="$repo/.venv/bin:$PATH"
fi
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} TOKENIZERS_PARALLELISM=false
ds-relora prepare-data --config quickstart --overwrite "$@"  # deterministic: a rerun rewrites the same data
ds-relora train --config quickstart "$@"
last=$(find runs/quickstart/checkpoints -maxdepth 2 -name meta.json -printf '%h\n' | sort -V | tail -n 1)
ds-relora eval "$last"
ds-relora export "$last" --out exports/quickstart
echo "quick start done: metrics in runs/quickstart/metrics.jsonl, merged model in exports/quickstart"
