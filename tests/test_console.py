"""What a user reads on the console of a real run: the phase, rank counts, the resume line, and a
checkpoints/ folder without DeepSpeed's recovery scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ds_relora.launch.hosts import free_port
from harness import REPO

DOCS = [f"def f{i}(x):\n    return x * {i} + {i * i}  # doc {i}\n" for i in range(40)]


def _train(sets, *extra):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ds_relora.cli", "train", "--config", "quickstart", "--set", *sets, *extra],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def two_jobs(tmp_path_factory):
    """A 1-rank ReLoRA run (warm start 2, 4 steps) stopped after 2 steps, then resumed to the end."""
    from ds_relora.config import PrepareConfig
    from ds_relora.data import prepare_data

    root = tmp_path_factory.mktemp("console")
    src = root / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    data = prepare_data(PrepareConfig(source=str(src), vocab_size=300, val_fraction=0.2), root / "data", log=lambda _m: None)
    run = root / "run"
    sets = [f"data.path={data}", "data.seq_len=32", f"train.run_dir={run}", "train.total_steps=4", "train.micro_batch_size=2",
            "relora.rank=4", "relora.warm_start_steps=2", "relora.reset_every=2", "relora.restart_warmup_steps=1",
            "optim.warmup_steps=1", "train.eval_every=0", "train.eval_batches=1", "train.save_every=0",
            "launch.launcher=none", "launch.num_gpus=1", f"launch.master_port={free_port()}"]
    first = _train(sets, "train.max_steps_per_job=2")
    assert first.returncode == 75, first.stderr[-3000:]
    second = _train(sets, "--resume", "auto")
    assert second.returncode == 0, second.stderr[-3000:]
    return {"run": run, "first": first.stdout + first.stderr, "second": second.stdout + second.stderr}


def test_first_line_names_the_warm_start_phase_and_counts_ranks_in_words(two_jobs):
    line = next(ln for ln in two_jobs["first"].splitlines() if " params, " in ln)
    assert line.startswith("full-rank warm start: ") and ", 1 rank, " in line, line


def test_same_shape_resume_says_where_it_resumed_from(two_jobs):
    assert "resumed from step-2" in two_jobs["second"], two_jobs["second"][-2000:]


def test_checkpoints_folder_holds_no_deepspeed_recovery_scripts(two_jobs):
    names = sorted(p.name for p in (two_jobs["run"] / "checkpoints").iterdir())
    assert names and not [n for n in names if n.startswith("zero_to_")], names
