"""The shipped DeepSpeed JSONs: valid JSON, no keys ds_relora injects, accepted by DeepSpeed.

``DeepSpeedConfig`` asks ``dist.get_rank()`` and falls back to rank 0 / world size 1 when no
process group exists, so it can be built on CPU without a distributed group.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))
INJECTED = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"}
CLIENT_OWNED = {"optimizer", "scheduler"}
EXPECTED = {"zero0.json", "zero1.json", "zero2.json", "zero3.json", "zero3_offload.json", "zero2_comms_logging.json"}


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _deepspeed_top_level_keys() -> set[str]:
    """Every string constant DeepSpeed's config modules define: the names it can read."""
    import deepspeed

    base = Path(deepspeed.__file__).parent
    keys: set[str] = set()
    for rel in ("runtime/constants.py", "comm/constants.py", "runtime/zero/config.py", "runtime/precision_config.py"):
        keys |= set(re.findall(r"^[A-Z0-9_]+\s*=\s*['\"]([a-z0-9_]+)['\"]", (base / rel).read_text(), re.M))
    return keys


def test_expected_files_exist():
    assert EXPECTED <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_shape(path):
    cfg = _load(path)
    assert not (INJECTED | CLIENT_OWNED) & set(cfg), f"{path.name} sets keys ds_relora injects or owns"
    assert cfg["bf16"] == {"enabled": "auto"}
    assert "fp16" not in cfg
    assert cfg["steps_per_print"] >= 1000 and cfg["wall_clock_breakdown"] is False
    stage = cfg["zero_optimization"]["stage"]
    assert str(stage) in path.stem or (stage == 2 and "comms" in path.stem)


def test_every_zero3_config_has_the_sub_group_size_the_planner_reads():
    from ds_relora.estimate.transients import SUB_GROUP_SIZE

    zero3 = [p for p in CONFIGS if _load(p)["zero_optimization"]["stage"] == 3]
    assert len(zero3) >= 2
    assert {p.name: _load(p)["zero_optimization"]["sub_group_size"] for p in zero3} == {p.name: SUB_GROUP_SIZE for p in zero3}


def test_top_level_keys_are_deepspeed_keys():
    known = _deepspeed_top_level_keys()
    for path in CONFIGS:
        unknown = set(_load(path)) - known
        assert not unknown, f"{path.name}: DeepSpeed silently ignores unknown keys {unknown}"


def test_offload_and_comms_specifics():
    off = _load(ROOT / "ds_configs/zero3_offload.json")
    z = off["zero_optimization"]
    assert z["stage"] == 3
    assert z["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert z["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert off["zero_force_ds_cpu_optimizer"] is False
    comms = _load(ROOT / "ds_configs/zero2_comms_logging.json")["comms_logger"]
    assert comms["enabled"] is True and comms["debug"] is True


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accepted_by_deepspeed(path, bf16):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = _load(path)
    cfg["bf16"] = {"enabled": bf16}  # what ds_relora resolves "auto" to
    cfg.update(train_batch_size=16, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=4, gradient_clipping=1.0)
    ds = DeepSpeedConfig(cfg)
    assert ds.zero_optimization_stage == cfg["zero_optimization"]["stage"]
    assert ds.bfloat16_config.enabled is bf16
    assert ds.world_size == 1 and ds.gradient_accumulation_steps == 4
    if "offload" in path.name:
        assert ds.zero_config.offload_optimizer.device == "cpu" and ds.zero_config.offload_param.pin_memory
    if "comms" in path.name:
        assert ds.comms_config.comms_logger.debug and ds.comms_config.comms_logger.prof_all


def test_auto_is_dropped_by_deepspeed_itself():
    """Documents why ds_relora must resolve "auto": DeepSpeed alone would turn bf16 off."""
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = DeepSpeedConfig({**_load(ROOT / "ds_configs/zero2.json"), "train_batch_size": 4})
    assert ds.bfloat16_config.enabled is False
