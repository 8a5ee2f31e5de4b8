"""Writes one of the checkpoints in tests/data/ with the ds_relora of another commit, for
tests/test_legacy_checkpoints.py (checkpoints written before a refactor must still resume,
evaluate and export).

Run it with that commit's code first on the path (a temporary ``git worktree``), e.g. for the
format 4 checkpoint (f53d0d1, the main before issue 19's checkpoint refactor)::

    git worktree add --detach /tmp/old4 f53d0d1
    PYTHONPATH=/tmp/old4 DS_ACCELERATOR=cpu python tests/data/make_legacy_checkpoints.py /tmp/old4 tests/data/format4

and for format 3 the last commit whose ds_relora/checkpoint_format.py had FORMAT_VERSION = 3
(``git log -S'FORMAT_VERSION = 3'``: d8603f4^). The run is a tiny ReLoRA run (vocabulary 300,
seq_len 32, the one-layer model below, warm start 2 steps, merges every 2) on one rank under ZeRO-2, stopped at step 4 by
train.stop_after_steps: its checkpoint is in the adapter phase, after a merge, with Adam
moments. The folder keeps the model config (model/) and the prepared data it trained on (the checkpoint's fingerprint must
match it on resume), the run config, step-4 only, and the losses of steps 5-8 when the same code resumes it
(``resumed_losses.json``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

# Smaller than the tiny preset (the folder stays a few hundred KB): one layer of width 32.
MODEL = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 32,
         "eos_token_id": 0, "tie_word_embeddings": False}


def main(old_tree: str, out: str) -> int:
    old, out = Path(old_tree).resolve(), Path(out).resolve()
    work = out.with_name(out.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    data, run, model = work / "data", work / "run", work / "model"
    cfg = {
        "model": {"preset": None, "name_or_path": str(model)},
        "data": {"path": str(data), "seq_len": 32},
        "prepare": {"source": "stdlib", "max_documents": 8, "max_tokens": 6000, "vocab_size": 300,
                    "val_fraction": 0.2},
        "relora": {"rank": 4, "alpha": 8, "dropout": 0.0, "warm_start_steps": 2, "reset_every": 2,
                   "restart_warmup_steps": 1, "lr": 0.01},
        "optim": {"lr": 0.005, "warmup_steps": 1},
        "train": {"method": "relora", "total_steps": 8, "micro_batch_size": 4, "eval_every": 0, "eval_batches": 1,
                  "save_every": 0, "stop_after_steps": 4, "run_dir": str(run)},
        "deepspeed": {"config": str(old / "ds_configs" / "zero2.json")},
        "launch": {"launcher": "none", "num_gpus": 1},
    }
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(MODEL, indent=2))
    config = work / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cli = [sys.executable, "-m", "ds_relora.cli"]
    subprocess.run([*cli, "prepare-data", "--config", str(config)], check=True, cwd=old)
    code = subprocess.run([*cli, "train", "--config", str(config)], cwd=old).returncode
    if code != 75:  # stopped by stop_after_steps, checkpoint written
        raise SystemExit(f"the run ended with exit code {code}, not 75 (stopped at step 4)")
    shutil.rmtree(out, ignore_errors=True)
    (out / "run" / "checkpoints").mkdir(parents=True)
    shutil.copytree(data, out / "data")
    shutil.copytree(model, out / "model")
    shutil.copytree(run / "checkpoints" / "step-4", out / "run" / "checkpoints" / "step-4")
    shutil.copy(run / "config.yaml", out / "run" / "config.yaml")
    # The same code resumed to the end: the losses a resume by any later version must reproduce.
    subprocess.run([*cli, "train", "--config", str(config), "--resume", "auto", "--set", "train.stop_after_steps=null"],
                   check=True, cwd=old)
    losses = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("type") == "step" and rec["step"] > 4:
            losses[rec["step"]] = rec["loss"]
    (out / "resumed_losses.json").write_text(json.dumps(losses, indent=2) + "\n")
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
