"""Small builders shared by the pipeline tests."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def deep_update(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_update(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def tiny_run_config(data: Path, run_dir: Path, stage: int = 2, **sections) -> dict:
    """A tiny ReLoRA run: warm start 8, merges every 8, 32 steps."""
    base = {
        "model": {"preset": "tiny"},
        "data": {"path": str(data), "seq_len": 32},
        "relora": {"rank": 8, "alpha": 16, "dropout": 0.0, "warm_start_steps": 8, "reset_every": 8,
                   "restart_warmup_steps": 2, "lr": 0.01},
        "optim": {"lr": 0.005, "warmup_steps": 4},
        "train": {"method": "relora", "total_steps": 32, "micro_batch_size": 4, "eval_every": 0, "eval_batches": 2,
                  "save_every": 0, "run_dir": str(run_dir)},
        "deepspeed": {"config": str(REPO / "ds_configs" / f"zero{stage}.json")},
        "launch": {"launcher": "none", "num_gpus": 1},
    }
    return deep_update(base, sections)


def write_config(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_metrics(run_dir: Path) -> tuple[dict[int, float], list[dict]]:
    """(step -> loss, events) from a run's metrics.jsonl."""
    losses, events = {}, []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["type"] == "step":
            losses[rec["step"]] = rec["loss"]
        else:
            events.append(rec)
    return losses, events


def one_line_error(exc_info, *words):
    msg = str(exc_info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg
