"""Small builders shared by the pipeline tests."""

from __future__ import annotations

import json
import os
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


# W partitioned for real under ZeRO-3 (the tiny model is below the default persistence threshold).
Z3_SHARDED = {"overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}}


def method_run_config(data: Path, run_dir: Path, method: str, stage: int, **extra) -> dict:
    """The methods' invariance run: 24 steps, global batch 8, no warm start, merges (ReLoRA,
    ReMoRA) and projector updates (GaLore) every 8 steps; ZeRO-3 with W partitioned.

    The re-warm-up after each reset is 4 steps: with 2, ReMoRA's first full-LR steps on zeroed
    moments sit at the edge of stability (measured: a 1e-7 difference grows ~3x per step for
    three steps after each reset), and a world-size invariance test there measures that growth,
    not the code (benchmarks/invariance/run.py)."""
    sections = dict(train={"method": method, "total_steps": 24, "global_batch_size": 8},
                    relora={"warm_start_steps": 0, "restart_warmup_steps": 4}, galore={"update_proj_gap": 8})
    if stage == 3:
        sections["deepspeed"] = Z3_SHARDED
    return tiny_run_config(data, run_dir, stage, **deep_update(sections, extra))


def within_rel(a: float, b: float, bound: float, what: str) -> bool:
    """``|a - b| <= bound * |b|``, recorded (see :func:`within`)."""
    return within(abs(a - b) / abs(b), bound, what)


def within_abs(a: float, b: float, bound: float, what: str) -> bool:
    """``|a - b| <= bound``, recorded (see :func:`within`)."""
    return within(abs(a - b), bound, what)


def within(observed: float, bound: float, what: str) -> bool:
    """``observed <= bound`` for an invariance tolerance named ``what``. With
    ``DS_RELORA_TOLERANCE_LOG`` set, every comparison appends ``{what, bound, observed}`` to that
    file, so benchmarks/invariance/tolerances.py reports each tolerance's worst case per CPU
    kernel set."""
    log = os.environ.get("DS_RELORA_TOLERANCE_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps({"what": what, "bound": bound, "observed": float(observed)}) + "\n")
    return observed <= bound


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


def merging_method(name="relora", *, total_steps, reset_every, layers=()):
    """A merging method as the trainer sets it up for a phase that starts at step 0."""
    from ds_relora.config import RunConfig
    from ds_relora.methods import get_method

    cfg = RunConfig()
    cfg.train.total_steps, cfg.relora.reset_every, cfg.relora.prune_ratio = total_steps, reset_every, 0.9
    method = get_method(name)
    method.layers = list(layers)
    method.start_phase(cfg, 0, 0)
    return method
