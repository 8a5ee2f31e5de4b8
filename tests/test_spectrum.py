import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ds_relora.errors import CheckpointError
from ds_relora.models import WRAPPED_TYPES
from ds_relora.eval.spectrum import compute_spectrum, count_small, format_report, plot_spectrum

H, F = 12, 20  # hidden and intermediate of the synthetic model
SHAPES = {"q_proj": (H, H), "k_proj": (H, H), "v_proj": (H, H), "o_proj": (H, H),
          "gate_proj": (F, H), "up_proj": (F, H), "down_proj": (H, F)}


def _name(layer: int, kind: str) -> str:
    block = "self_attn" if kind in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{block}.{kind}.weight"


def _base_state(layers=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {_name(i, k): torch.randn(*SHAPES[k], generator=g) for i in range(layers) for k in WRAPPED_TYPES}
    state["model.embed_tokens.weight"] = torch.randn(50, H, generator=g)
    state["model.layers.0.input_layernorm.weight"] = torch.ones(H)
    return state


def _write_ckpt(folder, state, lora_scale=0.25):
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model_fp32.safetensors"))
    (folder / "meta.json").write_text(json.dumps({"format_version": 1, "lora_scale": lora_scale}))
    return folder


def _low_rank(out, inp, sigmas, seed):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, len(sigmas), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, len(sigmas), generator=g, dtype=torch.float64))
    return (u * torch.tensor(sigmas, dtype=torch.float64)) @ v.T


def test_known_rank_gives_exactly_k_large_singular_values(tmp_path):
    before = _base_state()
    after = dict(before)
    sigmas = [3.0, 1.0, 0.5]  # rank 3, all above the 0.1 threshold
    for i, name in enumerate(n for n in before if n.endswith("proj.weight")):
        after[name] = (before[name].double() + _low_rank(*before[name].shape, sigmas, seed=i)).float()
    spectra = compute_spectrum(_write_ckpt(tmp_path / "a", before), _write_ckpt(tmp_path / "b", after))

    assert set(spectra) == set(WRAPPED_TYPES)
    small = count_small(spectra)
    for kind, values in spectra.items():
        assert len(values) == 2
        for s in values:
            assert s.dtype == np.float64
            assert int((s >= 0.1).sum()) == 3
            np.testing.assert_allclose(s[:3], sigmas, rtol=1e-5)
        assert small[kind] == 2 * (min(SHAPES[kind]) - 3)


def test_adapters_in_after_are_merged_with_scale(tmp_path):
    before = _base_state(layers=1)
    after = dict(before)
    g = torch.Generator().manual_seed(7)
    expected = {}
    for kind in WRAPPED_TYPES:
        out, inp = SHAPES[kind]
        prefix = _name(0, kind)[: -len(".weight")]
        a, b = torch.randn(4, inp, generator=g), torch.randn(out, 4, generator=g)
        after[prefix + ".lora_A"], after[prefix + ".lora_B"] = a, b
        expected[kind] = torch.linalg.svdvals(0.5 * (b.double() @ a.double())).numpy()
    spectra = compute_spectrum(_write_ckpt(tmp_path / "a", before), _write_ckpt(tmp_path / "b", after, lora_scale=0.5))
    for kind in WRAPPED_TYPES:
        (s,) = spectra[kind]
        np.testing.assert_allclose(s[:4], expected[kind][:4], rtol=1e-4)
        assert s[4:].max(initial=0.0) < 1e-4  # rank 4 adapters: the rest is fp32 rounding
        assert count_small(spectra)[kind] == min(SHAPES[kind]) - 4


def test_export_folder_and_natural_layer_order(tmp_path):
    before = _base_state(layers=11)
    export = tmp_path / "export"
    export.mkdir()
    save_file(before, str(export / "model.safetensors"))
    after = dict(before)
    after[_name(10, "q_proj")] = before[_name(10, "q_proj")] + 1.0  # rank-1 change in layer 10 only
    spectra = compute_spectrum(export, _write_ckpt(tmp_path / "ck", after))
    q = spectra["q_proj"]
    assert len(q) == 11
    assert q[10][0] == pytest.approx(H, rel=1e-5)  # all-ones 12x12 has one singular value 12
    assert all(s.max() == 0.0 for s in q[:10])


def test_errors(tmp_path):
    good = _write_ckpt(tmp_path / "good", _base_state())
    with pytest.raises(CheckpointError, match="does not exist"):
        compute_spectrum(tmp_path / "missing", good)
    no_wrapped = _write_ckpt(tmp_path / "nowrap", {"model.embed_tokens.weight": torch.zeros(5, H)})
    with pytest.raises(CheckpointError, match="has no weights named"):
        compute_spectrum(no_wrapped, no_wrapped)
    other = _base_state()
    other[_name(1, "down_proj")] = torch.zeros(H, F + 1)
    with pytest.raises(CheckpointError, match="has shape"):
        compute_spectrum(good, _write_ckpt(tmp_path / "shape", other))
    extra = _base_state(layers=3)
    with pytest.raises(CheckpointError, match="not in"):
        compute_spectrum(good, _write_ckpt(tmp_path / "extra", extra))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError) as info:
        compute_spectrum(empty, good)
    assert "\n" not in str(info.value)


def test_report_and_plot(tmp_path):
    spectra = {"q_proj": [np.array([2.0, 0.5, 0.05, 0.0]), np.array([1.0, 0.2, 0.01, 0.0])],
               "down_proj": [np.array([0.3, 0.09])]}
    assert count_small(spectra) == {"q_proj": 4, "down_proj": 1}
    report = format_report(spectra)
    lines = report.splitlines()
    assert lines[0].startswith("| type | #matrices | #singular values | #below 0.1 | median σ |")
    assert "| q_proj | 2 | 8 | 4 |" in report
    assert "| down_proj | 1 | 2 | 1 |" in report
    assert "| all | 3 | 10 | 5 |" in report
    for per_layer in (False, True):
        out = plot_spectrum(spectra, tmp_path / f"plot_{per_layer}.png", per_layer=per_layer)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
