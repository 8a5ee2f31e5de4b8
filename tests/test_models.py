"""models.build_model: one initialisation pass, the same values as transformers' build plus ours."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from ds_relora.models import Shape, build_model, init_weights, llama_config


def _tiny(tied: bool = False):
    hf = llama_config(Shape(hidden=32, intermediate=86, layers=2, heads=4), 300, 64)
    hf.tie_word_embeddings = tied
    return hf


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_build_skips_transformers_init_and_keeps_every_value(monkeypatch, tied):
    hf = _tiny(tied)
    torch.manual_seed(3)
    reference = AutoModelForCausalLM.from_config(hf, attn_implementation=hf._attn_implementation).float()
    init_weights(reference, 3, hf.initializer_range)
    expected = {**reference.state_dict(), **dict(reference.named_buffers())}

    calls = []
    cls = type(reference)
    monkeypatch.setattr(cls, "_init_weights", lambda self, module: calls.append(module))
    model = build_model(hf, 3)
    assert calls == []  # transformers' own pass would draw every weight a second time
    got = {**model.state_dict(), **dict(model.named_buffers())}
    assert got.keys() == expected.keys()
    assert [k for k in got if not torch.equal(got[k], expected[k])] == []
    shared = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert shared == tied, "tie_word_embeddings is part of the initialisation that was skipped"

