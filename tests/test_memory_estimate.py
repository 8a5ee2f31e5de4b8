import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from ds_relora.errors import ConfigError
from ds_relora.estimate.engine_memory import relative_error
from ds_relora.estimate.memory import activation_bytes, estimate_memory, format_table, model_state_bytes
from ds_relora.models import Shape
from ds_relora.methods.dropout_gemm import dropout_gemm
from harness import REPO
from harness.ranks import run_workers

# 1.3B (h 2048, f 5461, 24 layers, vocab 32000) by hand:
#   wrapped linears 24 * (4*2048^2 + 3*2048*5461)            = 1,207,910,400
#   embeddings + head + norms 2*32000*2048 + 49*2048         =   131,172,352
#   adapters r=128: 24 * 128 * (4*(2048+2048) + 3*(2048+5461)) = 119,534,592
FULL_13B = 1_339_082_752
FROZEN_13B = 1_207_910_400
TRAINABLE_13B = 131_172_352 + 119_534_592


def test_param_counts_13b():
    full = estimate_memory("1.3b", "full", 0, 0, 1, 1, 512)
    assert (full.total_params, full.trainable_params, full.frozen_params) == (FULL_13B, FULL_13B, 0)
    rel = estimate_memory("1.3b", "relora", 128, 0, 1, 1, 512)
    assert rel.trainable_params == TRAINABLE_13B
    assert rel.frozen_params == FROZEN_13B
    assert rel.total_params == FROZEN_13B + TRAINABLE_13B


def test_full_vs_relora_bytes_stage0_bf16():
    full = estimate_memory("1.3b", "full", 0, 0, 1, 1, 512)
    assert full.weights + full.grads + full.master + full.adam == 16 * FULL_13B == 21_425_324_032
    rel = estimate_memory("1.3b", "relora", 128, 0, 1, 1, 512)
    # 2 bytes per frozen param + 16 per trainable param
    assert rel.weights + rel.grads + rel.master + rel.adam == 2 * FROZEN_13B + 16 * TRAINABLE_13B == 6_427_131_904
    assert (rel.weights, rel.grads, rel.master, rel.adam) == (
        2 * (FROZEN_13B + TRAINABLE_13B), 2 * TRAINABLE_13B, 4 * TRAINABLE_13B, 8 * TRAINABLE_13B)


def test_13b_relora_zero2_on_8_gpus_by_hand():
    est = estimate_memory("1.3b", "relora", 128, 2, 8, 1, 512)
    part = 31_338_368  # ceil(250,706,944 / 8)
    assert (est.weights, est.grads, est.master, est.adam) == (2 * 1_458_617_344, 2 * part, 4 * part, 8 * part)


def test_activation_formula_13b_by_hand():
    # per layer per token: 8h + 16h + 8f + 4*heads + 8 = 16384 + 32768 + 43688 + 128 + 8 = 92,976
    # once per token: 4h + 4 + 4h + 4V + 16 = 144,404
    est = estimate_memory("1.3b", "full", 0, 0, 1, 1, 512)
    assert est.activations == 512 * (24 * 92_976 + 144_404) == 1_216_423_936
    assert est.total == est.weights + est.grads + est.master + est.adam + est.activations


@pytest.mark.parametrize("method", ["full", "relora"])
def test_zero_division_per_stage(method):
    n = 8
    base = estimate_memory("350m", method, 64, 0, n, 2, 256)
    t = base.trainable_params
    p = base.total_params
    ceil = lambda x: -(-x // n)  # noqa: E731
    expect = {
        0: (2 * p, 2 * t, 4 * t, 8 * t),
        1: (2 * p, 2 * ceil(t), 4 * ceil(t), 8 * ceil(t)),
        2: (2 * p, 2 * ceil(t), 4 * ceil(t), 8 * ceil(t)),
        3: (2 * ceil(p), 2 * ceil(t), 4 * ceil(t), 8 * ceil(t)),
    }
    for stage, parts in expect.items():
        est = estimate_memory("350m", method, 64, stage, n, 2, 256)
        assert (est.weights, est.grads, est.master, est.adam) == parts, stage
        assert est.activations == base.activations
    # with gradient accumulation ZeRO-1 holds the full gradients between micro-steps
    assert estimate_memory("350m", method, 64, 1, n, 2, 256, grad_accum_steps=4).grads == 2 * t
    assert estimate_memory("350m", method, 64, 2, n, 2, 256, grad_accum_steps=4).grads == 2 * ceil(t)


def test_control_is_a_smaller_full_rank_model():
    rel = estimate_memory("350m", "relora", 128, 2, 4, 1, 256)
    ctl = estimate_memory("350m", "control", 128, 2, 4, 1, 256)
    assert ctl.frozen_params == 0
    assert ctl.trainable_params <= rel.trainable_params
    assert ctl.trainable_params > 0.8 * rel.trainable_params
    assert "control" in ctl.setting


def test_fp32_and_keep_base_fp32():
    p, t = 1000, 100
    assert model_state_bytes(p, t, 0, 2, "fp32") == {"weights": 4000, "grads": 400, "master": 0, "adam": 800, "cpu": 0}
    for stage in (1, 2, 3):
        got = model_state_bytes(p, t, stage, 2, "fp32")
        assert got["master"] == 200 and got["adam"] == 400
    # keep_base_fp32 runs DeepSpeed torch_autocast: every param, frozen or not, stays fp32
    for stage in range(4):
        assert model_state_bytes(p, t, stage, 2, "bf16", keep_base_fp32=True) == model_state_bytes(p, t, stage, 2, "fp32")
    frozen_fp32 = estimate_memory("60m", "relora", 32, 2, 2, 1, 128, keep_base_fp32=True)
    plain = estimate_memory("60m", "relora", 32, 2, 2, 1, 128)
    assert frozen_fp32.weights == 2 * plain.weights


def test_offload():
    on = model_state_bytes(1000, 100, 2, 2, offload_optimizer=True)
    assert (on["master"], on["adam"], on["grads"]) == (0, 0, 0)
    assert on["cpu"] == 200 + 400 + 200  # master, Adam, fp32 gradient partition
    z3 = model_state_bytes(1000, 100, 3, 2, offload_optimizer=True, offload_params=True)
    assert z3["weights"] == 0 and z3["cpu"] == 200 + 400 + 100 + 1000


@pytest.mark.parametrize("kwargs, words", [
    (dict(method="qlora"), "method"),
    (dict(rank=0), "rank"),
    (dict(zero_stage=4), "zero_stage"),
    (dict(num_gpus=0), "num_gpus"),
    (dict(precision="fp16"), "precision"),
    (dict(precision="fp32", keep_base_fp32=True), "keep_base_fp32"),
    (dict(zero_stage=0, offload_optimizer=True), "offload_optimizer"),
    (dict(zero_stage=2, offload_params=True), "offload_params"),
    (dict(preset="1b"), "preset"),
])
def test_user_errors(kwargs, words):
    args = dict(preset="60m", method="relora", rank=16, zero_stage=2, num_gpus=2, micro_batch=1, seq_len=64)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=words) as info:
        estimate_memory(**args)
    assert "\n" not in str(info.value)


def test_activation_options_and_table():
    kw = dict(preset="130m", rank=64, zero_stage=1, num_gpus=2, micro_batch=4, seq_len=256)
    full = estimate_memory(method="full", **kw)
    rel = estimate_memory(method="relora", **kw)
    ckpt = estimate_memory(method="relora", activation_checkpointing=True, **kw)
    eager = estimate_memory(method="full", attn_implementation="eager", **kw)
    assert ckpt.activations < full.activations < rel.activations < eager.activations + rel.activations
    assert eager.activations > full.activations
    assert rel.activations == full.activations + 4 * 256 * 12 * 7 * 2 * 64  # A x of 7 linears per layer
    by_shape = estimate_memory(Shape(768, 2048, 12, 12), "full", 0, 1, 2, 4, 256)
    assert dataclasses.replace(by_shape, setting="") == dataclasses.replace(full, setting="")
    table = format_table(rel)
    for word in ("lp weights", "gradients", "fp32 master", "Adam moments", "activations (approx.)", "total per GPU"):
        assert word in table


class _LoRA(nn.Module):
    def __init__(self, lin: nn.Linear, r: int, p: float):
        super().__init__()
        self.weight = lin.weight
        self.weight.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(r, lin.in_features, dtype=lin.weight.dtype))
        self.B = nn.Parameter(torch.zeros(lin.out_features, r, dtype=lin.weight.dtype))
        self.p = p

    def forward(self, x):
        return nn.functional.linear(x, self.weight) + dropout_gemm(x, self.A, self.p, self.training) @ self.B.t() * 0.25


def _saved_bytes(shape: Shape, vocab: int, batch: int, seq: int, dtype, rank: int) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.heads, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype).train()
    if rank:
        for module in list(model.modules()):
            for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                if isinstance(getattr(module, kind, None), nn.Linear):
                    setattr(module, kind, _LoRA(getattr(module, kind), rank, 0.1))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, vocab, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(v for k, v in saved.items() if k not in params)


@pytest.mark.parametrize("method, precision", [("full", "bf16"), ("relora", "bf16"), ("full", "fp32"), ("relora", "fp32")])
def test_activation_formula_matches_saved_tensors(method, precision):
    shape, vocab, batch, seq, rank = Shape(128, 344, 2, 4), 500, 2, 64, 8
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    measured = _saved_bytes(shape, vocab, batch, seq, dtype, rank if method == "relora" else 0)
    formula = activation_bytes(shape, method, rank, batch, seq, vocab, precision)
    assert relative_error(formula, measured) < 0.03, (formula, measured)


@pytest.mark.parametrize("fuse", [True, False])
def test_activation_formula_matches_relora_layer(fuse):
    """The package's own layer, with dropout, shared-input fusion on and off."""
    from ds_relora.models import WRAPPED_TYPES, build_model, llama_config
    from ds_relora.methods.lora_layer import wrap_model

    shape, vocab, batch, seq, rank = Shape(128, 344, 2, 4), 500, 2, 64, 8
    model = build_model(llama_config(shape, vocab, seq), seed=0).train()
    wrap_model(model, rank=rank, alpha=16, dropout=0.1, target_modules=list(WRAPPED_TYPES), fuse_shared_inputs=fuse)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    ids = torch.randint(0, vocab, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    measured = sum(v for k, v in saved.items() if k not in params)
    formula = activation_bytes(shape, "relora", rank, batch, seq, vocab, "fp32")
    assert relative_error(formula, measured) < 0.03, (formula, measured)


# ---------------------------------------------------------------------------------------------
# Live engines: 2 CPU ranks, every ZeRO stage, compared with model_state_bytes


@pytest.fixture(scope="module")
def engine_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("mem") / "results.json"
    run_workers([str(REPO / "tests" / "workers" / "mem_worker.py"), str(out)], 2, timeout=120, env={"DS_ACCELERATOR": "cpu"})
    return json.loads(out.read_text())


@pytest.mark.distributed
def test_engine_model_states_match_analytic(engine_results):
    assert len(engine_results) >= 12
    for case in engine_results:
        exp = case["expected"]
        elt = 2 if case["precision"] == "bf16" else 4
        label = f"{case['precision']} ZeRO-{case['stage']} GAS {case['gas']} ({case['wrapper']})"
        for rank, got in enumerate(case["measured_per_rank"]):
            where = f"{label} rank {rank}: {got} vs {exp}"
            for key in ("weights", "master", "adam"):
                assert relative_error(got[key], exp[key]) < 0.005, where
            # ZeRO-1/2 size the gradient partition by the whole params that touch it
            assert 0.995 * exp["grads"] <= got["grads"] <= exp["grads"] + 2 * elt * case["largest_trainable"], where
            assert relative_error(got["total"], exp["total"]) < 0.02, where
            assert got["weights_gathered"] == 0 and got["other"] < 1024, where
            assert got["host"] == got["total"], where  # a CPU run: everything is host memory


def test_zero3_replicated_frozen_base_weights():
    p, t = 1_000_003, 200_001
    part = model_state_bytes(p, t, 3, 4, "bf16")
    rep = model_state_bytes(p, t, 3, 4, "bf16", zero3_frozen_base="replicate")
    assert rep["weights"] == part["weights"] + 2 * (p - t)
    assert {k: v for k, v in rep.items() if k != "weights"} == {k: v for k, v in part.items() if k != "weights"}
    assert model_state_bytes(p, t, 2, 4, "bf16", zero3_frozen_base="replicate") == model_state_bytes(p, t, 2, 4, "bf16")
    a = estimate_memory("1.3b", "relora", 128, 3, 8, 1, 512)
    b = estimate_memory("1.3b", "relora", 128, 3, 8, 1, 512, zero3_frozen_base="replicate")
    assert b.weights - a.weights == 2 * FROZEN_13B and "replicated" in b.setting


PROJECTOR_PEAK = """
import sys, torch
from ds_relora.worker import return_freed_host_memory
from ds_relora.train.phase_memory import PhaseMemory, host_peak_bytes
from ds_relora.zero.owner_reduce import reduce_apply_broadcast
from ds_relora.zero.projection import gram, projector_from_gram
return_freed_host_memory()  # as in a rank: multi-MiB arrays are returned to the OS when freed
m, n, r = (int(a) for a in sys.argv[1:4])
# BLAS and LAPACK set up their buffers on first use (16-32 MiB here, once per process): a run
# pays that at its first projector update, the figure measured is every update's.
projector_from_gram(gram(torch.randn(m, n, dtype=torch.float64)), r, m >= n)
phase = PhaseMemory()
phase.start("projector update")
p = reduce_apply_broadcast(lambda: torch.randn(m, n, dtype=torch.float64), 0,
                           lambda k: projector_from_gram(k, r, m >= n), (r, n) if m >= n else (m, r), torch.float32,
                           condense=gram)
print(host_peak_bytes() - phase.start_bytes, tuple(p.shape))
"""


@pytest.mark.parametrize("m, n", [(2752, 1024), (1024, 2752)])
def test_projector_update_transient_is_measured_within_the_planner(m, n):
    # One process makes an fp64 G of the largest linear and runs the projector update's owner
    # path (Gram matrix, G freed, eigendecomposition): its peak above the start must be within
    # projection_bytes (+10 % and 8 MiB of allocator slack) and well under the previous design's
    # SVD of G (G, LAPACK's copy, U, Vh and workspace: 16mn + 16k(m + n)), which this would catch.
    from ds_relora.estimate.memory import projection_bytes

    shape = Shape(hidden=1024, intermediate=2752, layers=1, heads=8)
    planned = projection_bytes(shape)
    k = min(m, n)
    assert planned == max(8 * m * n + 8 * k * k, 32 * k * k)
    out = subprocess.run([sys.executable, "-c", PROJECTOR_PEAK, str(m), str(n), "64"], cwd=REPO, check=True,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    peak, proj_shape = out.stdout.split(" ", 1)
    assert proj_shape.strip() == str((64, n) if m >= n else (m, 64))
    assert 8 * m * n <= int(peak) <= 1.1 * planned + 8 * 2**20 < 16 * m * n + 16 * k * (m + n)


def test_projector_update_transient_only_for_methods_with_a_probe():
    galore = estimate_memory("7b", "galore", 128, 2, 8, 1, 2048, 32000)
    assert galore.projection_host == 32 * 4096**2  # 7B: the eigendecomposition of a 4096 x 4096 Gram matrix
    assert "projector update" in format_table(galore)
    for method in ("full", "relora"):
        assert estimate_memory("7b", method, 128, 2, 8, 1, 2048, 32000).projection_host == 0


def test_stage_advice_picks_the_fastest_setting_that_fits():
    from ds_relora.estimate.memory import GiB
    from ds_relora.estimate.stage_advice import HEADROOM, OPTIONS, format_advice, recommend_stage

    setting = dict(preset="1.3b", method="relora", rank=128, num_gpus=8, micro_batch=8, seq_len=1024)
    rows, pick = recommend_stage(1000, **setting)
    assert [label for label, _ in rows] == [label for label, _ in OPTIONS] and pick == "ZeRO-0"
    totals = {label: est.total for label, est in rows}
    # A budget between ZeRO-2's and ZeRO-3's totals must pick ZeRO-3, the first that fits.
    assert totals["ZeRO-3"] < totals["ZeRO-2"]
    between = (totals["ZeRO-3"] + totals["ZeRO-2"]) / 2 / GiB / HEADROOM
    assert recommend_stage(between, **setting)[1] == "ZeRO-3"
    rows, pick = recommend_stage(0.5, **setting)
    assert pick is None and "nothing fits" in format_advice(0.5, rows, pick)


@pytest.mark.parametrize("method", ["relora", "mora", "remora", "galore"])
def test_adapter_method_counts_match_the_wrapped_model(method):
    # The planner's trainable/total counts against the method's own wrap of the real model.
    from ds_relora.config import RunConfig
    from ds_relora.methods import adapter_buffers, get_method
    from ds_relora.models import llama_config, preset_shape

    cfg = RunConfig()
    cfg.train.method, cfg.relora.rank = method, 16
    with torch.device("meta"):
        model = __import__("transformers").AutoModelForCausalLM.from_config(
            llama_config(preset_shape("20m"), 2048, 256, attn_implementation="sdpa"))
    get_method(method).wrap(model, cfg, seed=0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for b in adapter_buffers(model).values() if b.is_floating_point())
    est = estimate_memory("20m", method, 16, 2, 1, 1, 256, vocab_size=2048)
    assert (est.trainable_params, est.total_params) == (trainable, total)


# ---------------------------------------------------------------------------------------------
# Projection methods (APOLLO, APOLLO-Mini, Fira): their own optimizer state


@pytest.mark.distributed
def test_projection_methods_optimizer_state_matches_the_engine(tmp_path):
    """Per-rank optimizer-state bytes of live 2-rank engines (tiny preset, ZeRO 0-3) equal
    ``projection_state_bytes`` within 1% (ZeRO-3 and ZeRO-0 on every rank; ZeRO-1/2, whose flat
    partitions hold unequal mixes of projected and plain elements, in the mean over ranks)."""
    from ds_relora.estimate.memory import projection_state_bytes
    from ds_relora.models import param_counts, preset_shape

    out = tmp_path / "results.json"
    run_workers([str(REPO / "tests" / "workers" / "projection_mem_worker.py"), str(out)], 2, timeout=300,
                env={"DS_ACCELERATOR": "cpu"})
    cases = json.loads(out.read_text())
    assert len(cases) == 5
    for case in cases:
        expected = projection_state_bytes(preset_shape("tiny"), 512, case["rank"], case["stage"], 2)
        got = case["adam_per_rank"]
        measured = got if case["stage"] in (0, 3) else [sum(got) / len(got)]
        for value in measured:
            assert relative_error(value, expected) < 0.01, (case, expected)
        # AdamW keeps 8 bytes per trainable element (per rank: 1/N of them on ZeRO 1-3).
        adamw = model_state_bytes(*(param_counts(preset_shape("tiny"), 512)["total"],) * 2, case["stage"], 2, "fp32")["adam"]
        assert expected < 0.75 * adamw, (case, expected, adamw)


def test_apollo_mini_state_per_matrix_is_linear_in_its_sides():
    """APOLLO-Mini keeps O(max side) per projected matrix: quadrupling every side of the model's
    linears (16x their elements) multiplies its projected-matrix state by ~4, AdamW's by 16."""
    from ds_relora.estimate.memory import projection_state_bytes

    small, large = Shape(256, 688, 4, 4), Shape(1024, 2752, 4, 16)

    def matrices_only(shape, rank):  # minus the plain (embedding, norm) part, vocab 0
        return projection_state_bytes(shape, 0, rank, 0, 1) - 8 * (2 * shape.layers + 1) * shape.hidden

    ratio = matrices_only(large, 1) / matrices_only(small, 1)
    assert 3.9 < ratio < 4.1, ratio
    est = estimate_memory(large, "apollo_mini", None, 0, 1, 1, 64, vocab_size=1000)
    # The rest is the 1000 x 1024 embedding and head (8 bytes per element, 16.4 MB of the 17.0 MB).
    assert "r=1" in est.setting and est.adam < 0.05 * estimate_memory(large, "full", 1, 0, 1, 1, 64, vocab_size=1000).adam
