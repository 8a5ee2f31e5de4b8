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



def test_cpu85_preset_is_dominated_by_the_wrapped_linears():
    """The issue-24 quality shape: with its 512-token vocabulary the linears that the low-rank
    methods adapt or project hold >= 85% of the params (the 9m preset at 2048 tokens: 60%), and
    the analytic count is the real model's."""
    from ds_relora.models import PRESETS, WRAPPED_TYPES, param_counts

    shape, vocab = PRESETS["cpu85"], 512
    counts = param_counts(shape, vocab)
    assert counts["linear"] / counts["total"] >= 0.85, counts
    assert param_counts(PRESETS["9m"], 2048)["linear"] / param_counts(PRESETS["9m"], 2048)["total"] < 0.65
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(llama_config(shape, vocab, 128))
    params = dict(model.named_parameters())
    linear = sum(p.numel() for n, p in params.items() if n.split(".")[-2] in WRAPPED_TYPES)
    assert (linear, sum(p.numel() for p in params.values())) == (counts["linear"], counts["total"])


@pytest.mark.parametrize("numel, chunk", [(4096, 1008), (1000 * 64, 1024), (37 * 3, 16), (300 * 7, 48), (17, 16),
                                          (2 * 1008 + 5, 1008), (16, 1024)])
def test_normal_chunks_are_the_one_shot_draw(numel, chunk):
    # A ZeRO-3 weight is initialised from these pieces, its ZeRO 0-2 twin from the one-shot draw:
    # the bits must agree, tails shorter than 16 elements included.
    from ds_relora.models import normal_chunks

    whole = torch.empty(numel).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(9))
    pieces = list(normal_chunks(numel, 0.02, torch.Generator().manual_seed(9), chunk))
    assert [offset for offset, _ in pieces] == [sum(len(v) for _, v in pieces[:i]) for i in range(len(pieces))]
    assert torch.equal(torch.cat([v for _, v in pieces]), whole)
    assert all(len(v) % 16 == 0 for _, v in pieces[:-1]) and len(pieces[-1][1]) >= min(16, numel)
