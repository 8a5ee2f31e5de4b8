"""The DeepSpeed runtime layer: the JSON from ds_configs/ plus what the run config owns.

Batch sizes and gradient clipping have one source of truth, the run config (``train.*``,
``optim.grad_clip``); a JSON that sets them to something else is rejected.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ..config import RunConfig
from ..errors import ConfigError

OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_json_path(path: str) -> Path:
    """A DeepSpeed JSON by path, or by bare name from the shipped ``ds_configs/`` folder."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = Path(__file__).resolve().parents[2] / "ds_configs" / p.name
    if not p.is_absolute() and shipped.is_file():
        return shipped
    raise ConfigError(f"DeepSpeed config {path} does not exist: set deepspeed.config to a JSON file (e.g. ds_configs/zero2.json)")


def load_ds_json(path: str) -> dict:
    p = resolve_json_path(path)
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {p} is not valid JSON ({exc.msg} at line {exc.lineno}): fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {p} must be a JSON object")
    return data


def batch_layout(cfg: RunConfig, world_size: int) -> tuple[int, int, int]:
    """(micro, gradient accumulation, global) batch sizes, validated against the world size."""
    micro = cfg.train.micro_batch_size
    if micro < 1:
        raise ConfigError(f"train.micro_batch_size={micro} must be at least 1")
    global_batch = cfg.train.global_batch_size or micro * world_size
    if global_batch % (micro * world_size):
        raise ConfigError(
            f"train.global_batch_size={global_batch} is not divisible by micro_batch_size x ranks = "
            f"{micro} x {world_size}: pick a global batch that is a multiple of {micro * world_size}"
        )
    return micro, global_batch // (micro * world_size), global_batch


def bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def build_ds_config(cfg: RunConfig, world_size: int) -> dict:
    ds = _deep_merge(load_ds_json(cfg.deepspeed.config), cfg.deepspeed.overrides)
    micro, accum, global_batch = batch_layout(cfg, world_size)
    owned = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": global_batch,
        "gradient_clipping": float(cfg.optim.grad_clip),
    }
    for key, value in owned.items():
        if key in ds and ds[key] != value:
            source = "optim.grad_clip" if key == "gradient_clipping" else "train.micro_batch_size/global_batch_size"
            raise ConfigError(
                f"DeepSpeed config sets {key}={ds[key]} but the run config gives {value}: remove {key} "
                f"from {cfg.deepspeed.config} ({source} is the one source of truth)"
            )
        ds[key] = value
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(
            f"DeepSpeed config {cfg.deepspeed.config} has an optimizer/scheduler block: remove it "
            "(ds_relora passes AdamW and the jagged LR schedule itself; set them under optim:)"
        )
    bf16 = ds.get("bf16", {})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = bf16_available()
    if cfg.relora.keep_base_fp32 and bf16.get("enabled"):
        # fp32 params (frozen W included) with bf16 compute: merges add into fp32, no rounding.
        bf16["enabled"] = False
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    ds["bf16"] = bf16
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("zero_allow_untested_optimizer", True)
    zero = ds.get("zero_optimization", {})
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
