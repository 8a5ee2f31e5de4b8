"""The device and precision of ``ds-relora eval`` (ds_relora/eval/evaluate.py), choices that only
matter on a GPU, checked on the CPU."""

from __future__ import annotations

import json

import pytest
import torch


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
