"""Single-process unit tests of the ReLoRA layer, wrapper, schedule and masks."""

import math
import pickle

import pytest
import torch
from torch import nn

from ds_relora.errors import ConfigError
from ds_relora.models import PRESETS, build_model, llama_config
from ds_relora.methods.schedule import JaggedCosine, merge_points
from ds_relora.methods.lora_layer import ReLoRALinear, wrap_model
from ds_relora.zero.optim_reset import check_reset_args, keep_mask
from ds_relora.methods.lora import merge_adapters

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_model():
    return build_model(llama_config(PRESETS["tiny"], 50, 16, attn_implementation="eager"), seed=0)


@pytest.mark.parametrize(
    "step,lr",
    [(5000, 0.0), (5050, 3.97e-4), (5100, 7.94e-4), (9999, 3.39e-4), (10000, 0.0), (14999, 1.0e-4), (250, 5e-4)],
)
def test_jagged_schedule_matches_reference_points(step, lr):
    sched = JaggedCosine(15000, 500, 0.1, restart_every=5000, restart_warmup_steps=100)
    assert 1e-3 * sched(step) == pytest.approx(lr, abs=5e-7)


def test_jagged_schedule_offset_and_pickle():
    full = JaggedCosine(1000, 50, 0.1, restart_every=200, restart_warmup_steps=20, cycle_start=300)
    phase = pickle.loads(pickle.dumps(JaggedCosine(1000, 50, 0.1, restart_every=200, restart_warmup_steps=20,
                                                   cycle_start=300, offset=300)))
    assert [phase(i) for i in range(700)] == [full(300 + i) for i in range(700)]
    assert full(300) == 0.0 and full(500) == 0.0 and full(310) == pytest.approx(0.5 * full.cosine(320))
    assert merge_points(1000, 200, 300) == [500, 700, 900]


def test_schedule_rejects_restart_warmup_longer_than_cycle():
    with pytest.raises(ConfigError, match="restart_warmup_steps=100 must be shorter"):
        JaggedCosine(1000, 10, restart_every=50, restart_warmup_steps=100)


def test_scheduler_state_round_trips_through_lambdalr():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    s1 = torch.optim.lr_scheduler.LambdaLR(opt, JaggedCosine(100, 5, 0.1, restart_every=20, restart_warmup_steps=4))
    for _ in range(23):
        opt.step()
        s1.step()
    state = s1.state_dict()
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    s2 = torch.optim.lr_scheduler.LambdaLR(opt2, JaggedCosine(1, 0))
    s2.load_state_dict(state)
    opt2.step()
    s2.step()
    opt.step()
    s1.step()
    assert s2.get_last_lr() == s1.get_last_lr() and s2.last_epoch == 24


def test_wrapped_model_computes_the_same_and_trains_only_adapters_and_rest():
    model = tiny_model()
    x = torch.randint(0, 50, (2, 16))
    before = model(input_ids=x).logits
    mods = wrap_model(model, rank=8, alpha=16, dropout=0.1, target_modules=TARGETS, seed=0)
    model.eval()
    assert torch.allclose(model(input_ids=x).logits, before, atol=1e-6)
    assert len(mods) == 7 * PRESETS["tiny"].layers
    for name, p in model.named_parameters():
        if name.endswith(("lora_A", "lora_B")) or "embed" in name or "norm" in name or "lm_head" in name:
            assert p.requires_grad, name
        else:
            assert not p.requires_grad, name
    a = mods[0][1].lora_A
    bound = 1 / math.sqrt(a.shape[1])
    assert a.abs().max() <= bound and a.abs().max() > 0.5 * bound, "Kaiming-uniform A, not zero"
    assert not mods[0][1].lora_B.any()


def test_adapter_path_scale_and_merge_formula():
    base = nn.Linear(6, 5, bias=True)
    layer = ReLoRALinear(base, rank=2, alpha=4.0, dropout=0.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 6)
    expected = x @ base.weight.T + base.bias + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    merged = merge_adapters({"l.weight": base.weight.detach(), "l.lora_A": layer.lora_A.detach(),
                             "l.lora_B": layer.lora_B.detach()}, 2.0)
    assert set(merged) == {"l.weight"}
    assert torch.allclose(x @ merged["l.weight"].T + base.bias, expected, atol=1e-5)


def test_freeze_modules_freezes_embeddings():
    model = tiny_model()
    wrap_model(model, rank=4, alpha=8, dropout=0, target_modules=TARGETS, freeze_modules=[r"embed_tokens"])
    assert not model.model.embed_tokens.weight.requires_grad


def test_rank_too_large_is_one_line_error():
    with pytest.raises(ConfigError, match=r"relora.rank=100 exceeds min\(in, out\)=64 .*set relora.rank to at most 64"):
        wrap_model(tiny_model(), rank=100, alpha=8, dropout=0, target_modules=TARGETS)


def test_no_matching_target_is_one_line_error():
    with pytest.raises(ConfigError, match="no module matches relora.target_modules"):
        wrap_model(tiny_model(), rank=4, alpha=8, dropout=0, target_modules=["c_attn"])


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_prune_ratio_outside_range_is_rejected(ratio):
    with pytest.raises(ConfigError, match=r"outside \[0, 1\)"):
        check_reset_args("magnitude", ratio)


def test_keep_mask_magnitude_exact_count_and_stable_ties():
    score = torch.tensor([3.0, 1.0, 1.0, 1.0, 2.0, 0.0, 1.0, 5.0, 4.0, 1.0])
    keep = keep_mask(score, "magnitude", 0.5)
    assert int((~keep).sum()) == 5
    # 0.0 and the first four of the five 1.0s go (ties broken by position); the last 1.0 stays
    assert keep.tolist() == [True, False, False, False, True, False, False, True, True, True]


def test_keep_mask_random_and_full():
    score = torch.rand(1000)
    g = torch.Generator().manual_seed(0)
    keep = keep_mask(score, "random", 0.99, g)
    assert int(keep.sum()) == 10
    assert not keep_mask(score, "full", 0.5).any()
    big = torch.rand(2**24 + 10)  # beyond torch.quantile's limit
    assert int((~keep_mask(big, "magnitude", 0.99)).sum()) == int(0.99 * big.numel())


def test_merging_method_merges_once_per_scheduler_step(monkeypatch):
    """A step DeepSpeed skipped (overflow) leaves the scheduler where it was: no second merge."""
    from types import SimpleNamespace

    from harness.configs import merging_method

    from ds_relora.methods import merging

    calls = []
    monkeypatch.setattr(merging, "merge_and_reinit", lambda engine, modules, **kw: calls.append(kw["step"]) or {})
    engine = SimpleNamespace(lr_scheduler=SimpleNamespace(last_epoch=0))
    method = merging_method(total_steps=12, reset_every=4)
    assert method.merge_at == {4, 8}
    epochs = [1, 2, 3, 4, 5, 5, 5, 6, 7, 8, 9, 9]  # 5 and 9 repeat: skipped steps
    events = []
    for e in epochs:
        engine.lr_scheduler.last_epoch = e
        events.append(method.after_step(engine, engine.lr_scheduler.last_epoch))
    assert calls == [4, 8]
    assert [ev["step"] for ev in events if ev] == [4, 8]
