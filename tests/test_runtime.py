"""Runtime choices that only matter on a GPU, checked on the CPU: the attention kernel `auto`
picks, the device and precision of `ds-relora eval`, and the optimizer an offload run steps."""

from __future__ import annotations

import copy
import json
import sys
import types

import pytest
import torch

from ds_relora import models
from ds_relora.train import engine as engine_mod

OFFLOAD = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True}}}


# ----------------------------------------------------------------------------- fused CPU AdamW
def test_offload_optimizer_is_fused_on_the_cpu():
    params = [torch.nn.Parameter(torch.randn(4, 3))]
    opt = engine_mod.make_optimizer([{"params": params}], OFFLOAD, lr=1e-3)
    assert opt.defaults["fused"] is True, "optimizer offload steps in CPU memory: the fused CPU kernel"
    plain = engine_mod.make_optimizer([{"params": [torch.nn.Parameter(torch.randn(2))]}],
                                      {"zero_optimization": {"stage": 2}}, lr=1e-3)
    assert plain.defaults["fused"] is (True if torch.cuda.is_available() else None)


def test_fused_cpu_adamw_matches_the_single_tensor_loop():
    torch.manual_seed(0)
    shapes = [(64, 48), (48,), (7, 3)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(25)]

    def run(fused):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        groups = [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, fused=fused, foreach=False if not fused else None)
        for step, gs in enumerate(grads):
            for group in opt.param_groups:  # GaLore changes eps every step
                group["eps"] = 1e-8 * (1 + step)
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        return params, opt

    fused, opt_f = run(True)
    plain, opt_p = run(None)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(fused, plain):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_f.state[a][key], opt_p.state[b][key], rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- attention kernel
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
    from helpers import tiny_run_config

    from ds_relora.config import RunConfig
    from ds_relora.config_base import from_dict
    from ds_relora.train import ds_config as ds_mod
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
