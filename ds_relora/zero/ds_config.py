"""The DeepSpeed runtime layer: the JSON from ds_configs/ (package data) plus what the run config owns.

Batch sizes and gradient clipping have one source of truth, the run config (``train.*``,
``optim.grad_clip``); a JSON that sets them to something else is rejected.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ds_relora.config import RunConfig
from ds_relora.errors import ConfigError

OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# The shipped JSONs are package data; the repository's top-level ds_configs/ links here.
SHIPPED = Path(__file__).resolve().parents[1] / "ds_configs"


def shipped_configs() -> list[str]:
    return sorted(p.name for p in SHIPPED.glob("*.json"))


def resolve_json_path(path: str) -> Path:
    """A DeepSpeed JSON by path, or a shipped one by name (``zero2``, ``zero2.json`` or
    ``ds_configs/zero2.json``) from any folder, installed package included."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    name = p.name if p.suffix == ".json" else p.name + ".json"
    shipped = SHIPPED / name
    if not p.is_absolute() and p.parent.name in ("", "ds_configs") and shipped.is_file():
        return shipped
    raise ConfigError(
        f"DeepSpeed config {path} does not exist: set deepspeed.config to a JSON file or a shipped name "
        f"({', '.join(n[:-5] for n in shipped_configs())})"
    )


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


def build_ds_config(cfg: RunConfig, world_size: int, *, writes_base: bool = True) -> dict:
    """The resolved DeepSpeed config. ``writes_base``: the method adds into the frozen W during
    training (its ``Method.writes_base``); assumed unless the caller knows otherwise."""
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
    if writes_base:
        check_single_copy_of_w(cfg, zero)
    check_zero3_frozen_base(cfg, zero)
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


# ZeRO++ settings under which a frozen W has a second copy (hpZ's secondary partition, or a
# quantized copy) that a merge, which edits W's own shard in place, would leave stale.
SECOND_COPY_KEYS = {
    "zero_hpz_partition_size": lambda v: int(v or 1) > 1,
    "zero_quantized_weights": bool,
    "zero_quantized_nontrainable_weights": bool,
}


def check_single_copy_of_w(cfg: RunConfig, zero: dict) -> None:
    for key, active in SECOND_COPY_KEYS.items():
        if key in zero and active(zero[key]):
            raise ConfigError(
                f"DeepSpeed config sets zero_optimization.{key}={zero[key]}, which keeps a second copy of every frozen W "
                f"that ReLoRA's merges would leave stale: remove {key} from {cfg.deepspeed.config} / deepspeed.overrides "
                f"(ZeRO++ hpZ and quantized weights are not supported with train.method={cfg.train.method})"
            )


def check_zero3_frozen_base(cfg: RunConfig, zero: dict) -> None:
    if cfg.relora.zero3_frozen_base != "replicate":
        return
    if int(zero.get("stage", 0)) != 3:
        raise ConfigError(f"relora.zero3_frozen_base=replicate needs ZeRO-3 ({cfg.deepspeed.config} is stage "
                          f"{zero.get('stage', 0)}): remove it, stages 0-2 keep W replicated anyway")
    if zero.get("offload_param", {}).get("device", "none") not in (None, "none"):
        raise ConfigError("relora.zero3_frozen_base=replicate with offload_param is not supported (the shard would "
                          "stay in host memory while the gathered copy lives on the GPU): use partition or no offload")


def compute_dtype(ds: dict) -> torch.dtype:
    """The dtype a resolved DeepSpeed config runs the forward in (bf16/fp16 params, or torch
    autocast over fp32 params, as ``relora.keep_base_fp32`` sets up); fp32 otherwise."""
    if ds.get("bf16", {}).get("enabled") is True:
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled") is True:
        return torch.float16
    autocast = ds.get("torch_autocast", {})
    if autocast.get("enabled") is True:
        # torch's own default for CUDA autocast when the config names no dtype.
        return getattr(torch, str(autocast.get("dtype", "float16")).replace("torch.", ""))
    return torch.float32


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
