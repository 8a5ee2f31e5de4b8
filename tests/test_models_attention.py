"""The attention kernel ``auto`` picks (ds_relora/models.py ``resolve_attn_implementation``), a
choice that only matters on a GPU, checked on the CPU with a faked CUDA and flash-attn."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

from ds_relora import models


@pytest.fixture
def gpu_with_flash_attn(monkeypatch):
    """A CUDA machine (as torch reports it) where flash_attn is installed and imports."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))


def test_auto_attention_uses_flash_attn_only_for_half_precision_on_cuda(gpu_with_flash_attn, monkeypatch):
    assert models.resolve_attn_implementation("auto", torch.bfloat16) == "flash_attention_2"
    assert models.resolve_attn_implementation("auto", torch.float16) == "flash_attention_2"
    # flash-attn's kernels take fp16/bf16 only: an fp32 run would fail inside it.
    assert models.resolve_attn_implementation("auto", torch.float32) == "sdpa"
    assert models.resolve_attn_implementation("sdpa", torch.bfloat16) == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.resolve_attn_implementation("auto", torch.bfloat16) == "sdpa"


def test_auto_attention_skips_a_flash_attn_that_does_not_import(gpu_with_flash_attn, monkeypatch):
    # A wheel built for another torch: find_spec finds it, the import fails on its extension.
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # `import flash_attn` raises ImportError
    assert models.resolve_attn_implementation("auto", torch.bfloat16) == "sdpa"


def test_the_run_precision_reaches_the_attention_choice(gpu_with_flash_attn, prepared_data, tmp_path, monkeypatch):
    from harness.configs import tiny_run_config

    from ds_relora.config import RunConfig
    from ds_relora.config_base import from_dict
    from ds_relora.zero import ds_config as ds_mod
    from ds_relora.train.plan import plan_run

    monkeypatch.setattr(ds_mod, "bf16_available", lambda: True)
    # Method full: the plan builds no meta model (which would need a real flash-attn).
    base = tiny_run_config(prepared_data, tmp_path, model={"attn_implementation": "auto"}, train={"method": "full"})
    bf16 = plan_run(from_dict(RunConfig, base), 1)
    assert bf16.ds_config["bf16"]["enabled"] is True and bf16.hf_config._attn_implementation == "flash_attention_2"
    fp32 = copy.deepcopy(base)
    fp32.setdefault("deepspeed", {}).setdefault("overrides", {})["bf16"] = {"enabled": False}
    plan = plan_run(from_dict(RunConfig, fp32), 1)
    assert plan.ds_config["bf16"]["enabled"] is False and plan.hf_config._attn_implementation == "sdpa"
    # keep_base_fp32: fp32 params under bf16 autocast, a half-precision forward.
    assert ds_mod.compute_dtype({"bf16": {"enabled": False}, "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}) \
        == torch.bfloat16
