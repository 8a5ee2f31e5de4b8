"""The tiny run config every training test starts from, the methods' invariance variant, and
writing one as YAML (the real-launch variant is ``harness.launches.train_config``)."""

from __future__ import annotations

from pathlib import Path

import yaml

from harness import REPO

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


def write_config(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


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
