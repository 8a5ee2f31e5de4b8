"""GaLore as a frozen-projection adapter, single process: checked against galore-torch's own
GaLoreAdamW, the probe gradient, canonical projector signs, fp64 gradient sums, projector dtype."""

import copy
import math

import pytest
import torch
from torch import nn

from ds_relora.errors import ConfigError
from ds_relora.methods import galore as gl
from harness.oracles import Net, load_reference, teacher_batches


# ----------------------------------------------------------------------------- GaLore


def load_galore_adamw():
    """galore-torch's ``AdamW``; its SVD (fp32, LAPACK) keeps our sign rule (harness.oracles)."""
    return load_reference("galore_torch", "adamw", "galore_projector", fp64=False).AdamW


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


STEPS, GAP, RANK, SCALE, LR, EPS = 23, 5, 4, 0.25, 1e-2, 1e-6
NAMES = ("l1", "l2", "l3")


def _data():
    return teacher_batches(STEPS)


def _reference_losses(base, data):
    model = copy.deepcopy(base)
    matrices = [getattr(model, n).weight for n in NAMES]
    plain = [p for p in model.parameters() if all(p is not w for w in matrices)]
    opt = load_galore_adamw()(
        [{"params": plain}, {"params": matrices, "rank": RANK, "update_proj_gap": GAP, "scale": SCALE, "proj_type": "std"}],
        lr=LR, eps=EPS, weight_decay=0.0, no_deprecation_warning=True)
    losses = []
    for batch in data:
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _our_losses(base, data, gap=GAP):
    model = copy.deepcopy(base)
    layers = []
    for name in NAMES:
        layer = gl.GaLoreLinear(getattr(model, name), RANK, SCALE, name)
        setattr(model, name, layer)
        layers.append((name, layer))
    cs = [layer.galore_C for _, layer in layers]
    rest = [p for p in model.parameters() if p.requires_grad and all(p is not c for c in cs)]
    # torch's AdamW, as the DeepSpeed engine runs it; eps per step reproduces galore-torch's placement.
    opt = torch.optim.AdamW([{"params": rest}, {"params": cs, "eps_scale": SCALE}], lr=LR, eps=EPS,
                            weight_decay=0.0, foreach=False)
    losses, updates = [], 0
    for t, batch in enumerate(data):
        if t % gap == 0:
            grads = gl.full_gradients(model, layers, [batch], loss_fn)
            for name, layer in layers:
                layer.update_projection_local(grads[name])
            updates += 1
        gl.set_galore_eps(opt, t + 1, EPS)
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, updates, model


def test_galore_matches_galore_torch_per_step():
    torch.manual_seed(0)
    base, data = Net(), _data()
    ref = torch.tensor(_reference_losses(base, data))
    ours, updates, model = _our_losses(base, data)
    ours = torch.tensor(ours)
    assert updates == 5 and ref[-1] < ref[0] - 0.1  # 5 projector updates (4 switches) while learning
    rel = ((ours - ref).abs() / ref.abs()).max().item()
    assert rel <= 1e-4, rel
    # The check can fail: without the re-projections the losses leave galore-torch's.
    stale, _, _ = _our_losses(base, data, gap=STEPS + 1)
    assert ((torch.tensor(stale) - ref).abs() / ref.abs()).max().item() > 1e-3
    # fold: the plain model with the folded weights computes what the GaLore model computes.
    plain = Net()
    plain.load_state_dict(gl.fold_state(model.state_dict(), SCALE))
    x = data[0][0]
    torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-6)


def test_galore_probe_gradient_is_the_weight_gradient():
    torch.manual_seed(0)
    base, batch = Net(), _data()[0]
    plain = copy.deepcopy(base)
    loss_fn(plain, batch).backward()
    model = copy.deepcopy(base)
    layers = []
    for name in NAMES:
        layer = gl.GaLoreLinear(getattr(model, name), RANK, SCALE, name)
        with torch.no_grad():
            layer.galore_proj.normal_()
            layer.galore_C.normal_(std=1e-2)
        setattr(model, name, layer)
        layers.append((name, layer))
    for name, layer in layers:  # same effective W: fold s * P C / s * C Q into the plain model
        with torch.no_grad():
            getattr(plain, name).weight.add_(layer.delta_rows({"galore_C": layer.galore_C}, 0, layer.out_features))
    plain.zero_grad()
    loss_fn(plain, batch).backward()
    grads = gl.full_gradients(model, layers, [batch, batch], loss_fn)
    for name, layer in layers:
        assert grads[name].dtype == torch.float64  # summed in fp64: the same G in any grouping
        grads[name] = grads[name].float()
        torch.testing.assert_close(grads[name], 2 * getattr(plain, name).weight.grad, rtol=1e-5, atol=1e-7)
        assert layer.galore_C.grad is None  # the probe touches no parameter gradient
        assert layer.side == ("left" if layer.out_features < layer.in_features else "right")


def test_galore_projector_has_canonical_signs():
    g = torch.Generator().manual_seed(3)
    for shape in ((20, 12), (12, 20), (16, 16)):
        grad = torch.randn(shape, generator=g)
        rows = gl.projector(grad, RANK)
        rows = rows if shape[0] >= shape[1] else rows.T  # one singular vector per row
        u, s, vh = torch.linalg.svd(grad.double(), full_matrices=False)
        plain = vh[:RANK] if shape[0] >= shape[1] else u[:, :RANK].T
        assert rows.dtype == torch.float32
        torch.testing.assert_close(rows.double().abs(), plain.abs(), rtol=0, atol=1e-6)
        assert (rows.gather(1, rows.abs().argmax(1, keepdim=True)) > 0).all(), (shape, rows)
        # An SVD routine that returns the opposite signs gives the same bits; u S vh is kept.
        flipped, kept = gl.canonical_signs(-u, -vh), gl.canonical_signs(u, vh)
        assert torch.equal(flipped[0], kept[0]) and torch.equal(flipped[1], kept[1])
        torch.testing.assert_close(kept[0] * s @ kept[1], grad.double())


def test_galore_gradient_sum_does_not_depend_on_the_micro_batch_order():
    # 1 rank sums micro-batches 0, 1, 2; 3 ranks reduce them in another order. In fp32 the two
    # sums differ in their last bits (and the SVD may then choose another basis); in fp64 they
    # are the same bits.
    torch.manual_seed(0)
    model, data = Net(), _data()
    layers = []
    for name in NAMES:
        layer = gl.GaLoreLinear(getattr(model, name), RANK, SCALE, name)
        setattr(model, name, layer)
        layers.append((name, layer))
    batches = [(x * 1e3 ** k, y) for k, (x, y) in enumerate(data[:3])]  # magnitudes far apart
    ab = gl.full_gradients(model, layers, batches, loss_fn)
    ba = gl.full_gradients(model, layers, batches[::-1], loss_fn)
    for name in NAMES:
        assert torch.equal(ab[name], ba[name]), name
        assert torch.equal(gl.projector(ab[name], RANK), gl.projector(ba[name], RANK))
    parts = [gl.full_gradients(model, layers, [b], loss_fn)["l2"].float() for b in batches]
    assert not torch.equal((parts[0] + parts[1]) + parts[2], (parts[2] + parts[1]) + parts[0])  # fp32 would


def test_galore_eps_and_bad_rank():
    assert gl.adam_eps(1, 1e-6, 0.999, 0.25) == pytest.approx(0.25e-6 / math.sqrt(1e-3))
    with pytest.raises(ConfigError, match=r"galore\.rank=9 does not fit layer 'l3' \(8x20\): set galore\.rank between 1 and 8"):
        gl.GaLoreLinear(nn.Linear(20, 8), 9, SCALE, "l3")


GALORE_ZERO3_BF16 = r"""
import json, os
import torch
from ds_relora.config import RunConfig
from ds_relora.config_base import from_dict
from ds_relora.methods import get_method
from ds_relora.models import PRESETS, build_model, llama_config
from ds_relora.worker import init_distributed

init_distributed()
ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1,
      "bf16": {"enabled": True}, "zero_optimization": {"stage": int(os.environ["STAGE"])}}
model = build_model(llama_config(PRESETS["tiny"], 64, 16), seed=0, ds_config=ds)
cfg = from_dict(RunConfig, {"galore": {"rank": 4}, "relora": {"target_modules": ["q_proj", "down_proj"]}})
layers = get_method("galore").wrap(model, cfg, seed=1)
print("RESULT " + json.dumps({"weights": sorted({str(l.weight.dtype) for _, l in layers}),
                              "proj": sorted({str(l.galore_proj.dtype) for _, l in layers})}), flush=True)
os._exit(0)
"""


def test_galore_projector_is_fp32_under_zero3_bf16_init():
    from harness.ranks import results, run_workers

    (res,) = results(run_workers(["-c", GALORE_ZERO3_BF16], 1, timeout=240, env={"STAGE": "3"}))
    assert res["weights"] == ["torch.bfloat16"], "the model must really be built partitioned in bf16"
    # fp32 as on ZeRO 0-2 (DeepSpeed keeps buffers fp32 there): merges and elastic resumes
    # between stages then use the same projector values.
    assert res["proj"] == ["torch.float32"]


def test_galore_projector_dtype_follows_the_activation_in_forward():
    torch.manual_seed(0)
    layer = gl.GaLoreLinear(nn.Linear(12, 20).double(), 3, SCALE)
    assert layer.galore_proj.dtype == torch.float64, "an fp64 model keeps an fp64 projector"
    layer = gl.GaLoreLinear(nn.Linear(12, 20).bfloat16(), 3, SCALE)
    assert layer.galore_proj.dtype == torch.float32
    with torch.no_grad():
        layer.galore_proj.normal_()
        layer.galore_C.normal_()
    x = torch.randn(2, 12, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    want = nn.functional.linear(x, layer.weight) + SCALE * (x @ layer.galore_proj.bfloat16().t() @ layer.galore_C.t())
    torch.testing.assert_close(y, want + layer.bias, rtol=2e-2, atol=2e-2)
