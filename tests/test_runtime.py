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


# ----------------------------------------------------------------------------- ds-relora eval
@pytest.mark.parametrize("cuda", [True, False])
def test_eval_runs_on_cuda_in_the_runs_precision(monkeypatch, cuda):
    from ds_relora.eval.evaluate import eval_device_and_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    device, dtype = eval_device_and_dtype("auto", "auto", "bfloat16")
    assert (device.type, dtype) == (("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32))
    device, dtype = eval_device_and_dtype("auto", "auto", "float32")
    assert (device.type, dtype) == ("cuda" if cuda else "cpu", torch.float32)
    assert eval_device_and_dtype("auto", "auto", None)[1] == torch.float32, "unknown precision: fp32"
    assert eval_device_and_dtype("cpu", "bfloat16", "float32") == (torch.device("cpu"), torch.bfloat16)
    if cuda:
        assert eval_device_and_dtype("cuda:1", "float32", "bfloat16") == (torch.device("cuda", 1), torch.float32)
    else:
        from ds_relora.errors import UserError

        with pytest.raises(UserError, match="no CUDA device"):
            eval_device_and_dtype("cuda", "auto", "bfloat16")


def _checkpoint_like(folder, compute_dtype):
    from ds_relora.checkpoint.format import FORMAT_VERSION, META

    folder.mkdir()
    (folder / META).write_text(json.dumps({"format_version": FORMAT_VERSION, "step": 4, "data_path": "d", "seq_len": 32,
                                           "compute_dtype": compute_dtype}))
    return folder


@pytest.mark.parametrize("cuda", [True, False])
def test_eval_cli_passes_the_checkpoints_precision(monkeypatch, tmp_path, capsys, cuda):
    import ds_relora.eval.evaluate as ev
    from ds_relora import cli

    folder = _checkpoint_like(tmp_path / "step-4", "bfloat16")
    seen = {}

    def fake_eval(model, data, seq_len, batch_size, max_batches, *, device, dtype):
        seen.update(device=device, dtype=dtype)
        return {"loss": 1.0, "perplexity": 2.7, "sequences": 1, "tokens": 32}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(ev, "evaluate_model", fake_eval)
    monkeypatch.setattr(ev, "load_any_model", lambda path: None)
    assert cli.main(["eval", str(folder)]) == 0
    assert seen == ({"device": torch.device("cuda"), "dtype": torch.bfloat16} if cuda
                    else {"device": torch.device("cpu"), "dtype": torch.float32})
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["device"] == seen["device"].type and out["dtype"] == str(seen["dtype"]).removeprefix("torch.")


def test_eval_autocasts_without_changing_fp32_results(prepared_data):
    from ds_relora.eval.evaluate import evaluate_model
    from ds_relora.models import PRESETS, build_model, llama_config

    model = build_model(llama_config(PRESETS["tiny"], 512, 32), seed=0).eval()
    fp32 = evaluate_model(model, prepared_data, 32, batch_size=4, max_batches=2)
    again = evaluate_model(model, prepared_data, 32, batch_size=4, max_batches=2, device="cpu", dtype=torch.float32)
    assert fp32 == again and fp32["sequences"] == 8
    bf16 = evaluate_model(model, prepared_data, 32, batch_size=4, max_batches=2, device="cpu", dtype=torch.bfloat16)
    assert bf16["loss"] != fp32["loss"] and bf16["loss"] == pytest.approx(fp32["loss"], rel=2e-2)
    assert next(model.parameters()).dtype == torch.float32, "autocast: the weights stay fp32"
