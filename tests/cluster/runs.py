"""The run every cluster test trains: tiny ReLoRA, ZeRO-2, 2 ranks, 12 steps (warm start 4,
merge at 8), and what reading its progress needs."""

from __future__ import annotations

import json
from pathlib import Path

from ds_relora.launch.hosts import free_port
from harness.configs import tiny_run_config, write_config

STEPS = 12
# What every rank needs on every node; pdsh forwards only PYTHON*/NCCL*/UCX* and .deepspeed_env lines.
NODE_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1"}
BOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def run_config(data: Path, root: Path, name: str, launch: dict, **train) -> tuple[Path, Path]:
    run_dir = root / name
    if launch.get("launcher") == "local" and "master_port" not in launch:
        # Not the default 29500 on the host: its TIME_WAIT sockets would make tests/test_launch.py's
        # busy-port check, which runs later in the same session, see it free.
        launch = {**launch, "master_port": free_port()}
    cfg = tiny_run_config(data, run_dir, 2, launch=launch)
    cfg["train"].update(total_steps=STEPS, **train)
    cfg["relora"].update(warm_start_steps=4, reset_every=4)
    return write_config(root / f"{name}.yaml", cfg), run_dir


def last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    return max((json.loads(ln)["step"] for ln in lines if ln.strip() and json.loads(ln)["type"] == "step"), default=0)
