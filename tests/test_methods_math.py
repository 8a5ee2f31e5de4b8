"""Method-level math of the method seam, single process, no DeepSpeed: MoRA/ReMoRA expansion,
GaLore as a frozen-projection adapter checked against galore-torch's own GaLoreAdamW."""

import copy
import importlib.util
import math
import re
import sys
import types

import pytest
import torch
from torch import nn

from ds_relora.errors import ConfigError
from ds_relora.methods import get_method, shard_delta
from ds_relora.methods import galore as gl
from ds_relora.methods import mora

SHAPES = [(24, 24), (40, 24), (24, 40), (30, 17)]  # d == k, d > k, d < k, nothing divides


def naive_delta(m: torch.Tensor, d: int, k: int, kind: str, seed: int, offset: int) -> torch.Tensor:
    """ΔW built entry by entry from the paper's equations (7 and 8-10), independently of mora.delta_rows."""
    r = m.shape[0]
    perm_in = mora.permutation(k, seed, offset, 0)
    perm_out = mora.permutation(d, seed, offset, 1)
    pos_in = torch.argsort(perm_in)
    if kind == "sharing":  # Eq. 7: ΔW[i, j] = M[g'(i), g(j)], cyclic groups
        out = torch.empty(d, k, dtype=m.dtype)
        for i in range(d):
            for j in range(k):
                out[i, j] = m[int(perm_out[i]) % r, int(pos_in[j]) % r]
        return out
    n = math.ceil(k / r)
    blocks = []
    for b in range(n):  # P_b = M R_b, R_b block-diagonal 2x2 rotations of the pairs (c, c + r/2)
        rot = torch.eye(r, dtype=m.dtype)
        for c in range(r // 2):
            angle = b * 10000.0 ** (-2.0 * c / r)
            rot[c, c], rot[c, c + r // 2] = math.cos(angle), -math.sin(angle)
            rot[c + r // 2, c], rot[c + r // 2, c + r // 2] = math.sin(angle), math.cos(angle)
        blocks.append(m @ rot)
    diag = torch.block_diag(*blocks)  # (n r) x (n r); columns past k are the zero padding
    rows = perm_out % (n * r)         # truncation, or cyclic repeat when d > n r
    return diag[rows][:, pos_in]


@pytest.mark.parametrize("kind", mora.KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_mora_forward_equals_explicit_delta(kind, shape):
    d, k = shape
    torch.manual_seed(0)
    base = nn.Linear(k, d).double()
    layer = mora.MoRALinear(base, rank=1, kind=kind, seed=11, name="q_proj")
    x = torch.randn(2, 3, k, dtype=torch.float64)
    assert torch.equal(layer(x), nn.functional.linear(x, base.weight, base.bias))  # M = 0: exactly W x + b
    for offset in (0, 1, 2):
        with torch.no_grad():
            layer.mora_M.copy_(torch.randn_like(layer.mora_M))
        expanded = naive_delta(layer.mora_M.detach(), d, k, kind, 11, offset)
        if offset == 0 and kind == "sharing":  # the paper code's cyclic pattern (mora_type 1)
            r = layer.r_hat
            assert expanded[d - 1, k - 1] == layer.mora_M[(d - 1) % r, (k - 1) % r]
        want = nn.functional.linear(x, base.weight + expanded, base.bias)
        torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
        full = mora.delta_weight(layer.mora_M.detach(), (d, k), kind, offset, seed=11)
        torch.testing.assert_close(full, expanded, rtol=1e-12, atol=1e-12)
        pat = layer.pattern()
        for row0, row1 in ((0, 1), (3, 11), (d - 5, d)):  # any row block, from M alone
            torch.testing.assert_close(mora.delta_rows(layer.mora_M.detach(), row0, row1, pat), expanded[row0:row1])
        layer.switch_pattern()


def test_shard_delta_covers_every_zero3_split():
    torch.manual_seed(0)
    m = torch.randn(5, 5, dtype=torch.float64)
    d, k = 30, 17
    pat = mora.Pattern(d, k, 5, "rope", 3, 1)
    full = mora.delta_rows(m, 0, d, pat).reshape(-1)
    for world in (1, 2, 3, 7):
        part = -(-full.numel() // world)  # ZeRO-3 pads the last partition
        pieces = [shard_delta(q * part, min((q + 1) * part, full.numel()), k,
                              lambda a, b: mora.delta_rows(m, a, b, pat)) for q in range(world)]
        torch.testing.assert_close(torch.cat(pieces), full)


def _merged_sum(kind, d, k, switch, generator):
    """Two ReMoRA merges on W = 0: W += ΔW(M1); M = 0; (switch grouping); W += ΔW(M2)."""
    layer = mora.MoRALinear(nn.Linear(k, d, bias=False).double(), rank=1, kind=kind, seed=5)
    with torch.no_grad():
        layer.weight.zero_()
    for _ in range(2):
        with torch.no_grad():
            layer.mora_M.copy_(torch.randn(layer.mora_M.shape, generator=generator, dtype=torch.float64))
        x = torch.randn(4, k, dtype=torch.float64)
        before = layer(x)
        layer.merge_local(switch=switch)
        torch.testing.assert_close(layer(x), before)  # a merge preserves the output
        assert not layer.mora_M.any()
    return layer.weight.detach().clone(), layer.r_hat


@pytest.mark.parametrize("shape", [(48, 48), (40, 24)])
def test_remora_sharing_rank_grows_only_with_group_switch(shape):
    d, k = shape
    g = torch.Generator().manual_seed(0)
    switched, r_hat = _merged_sum("sharing", d, k, True, g)
    same, _ = _merged_sum("sharing", d, k, False, g)
    rank_switched = int(torch.linalg.matrix_rank(switched))
    rank_same = int(torch.linalg.matrix_rank(same))
    assert rank_same <= r_hat < rank_switched, (rank_same, r_hat, rank_switched)


def test_remora_rope_merges_leave_one_pattern_only_with_switch():
    """For rope a single ΔW already has rank > r̂ (block diagonal), so "rank grows past r̂" is not
    what the switch buys there. What holds for both kinds: without the switch every merged sum is
    ΔW of one M (it stays in that pattern's r̂²-dim subspace); with it the sum leaves it."""
    d, k = 24, 24
    g = torch.Generator().manual_seed(1)
    for kind in mora.KINDS:
        r_hat = mora.mora_rank(d, k, 1)
        basis = torch.stack([mora.delta_weight(torch.eye(r_hat, dtype=torch.float64)[a][:, None]
                                               * torch.eye(r_hat, dtype=torch.float64)[b][None, :], (d, k), kind, 0, 5)
                             .reshape(-1) for a in range(r_hat) for b in range(r_hat)], dim=1)

        def residual(w):
            coef = torch.linalg.lstsq(basis, w.reshape(-1, 1)).solution
            return float((basis @ coef - w.reshape(-1, 1)).norm() / w.norm())

        same, _ = _merged_sum(kind, d, k, False, g)
        switched, _ = _merged_sum(kind, d, k, True, g)
        assert residual(same) < 1e-10
        assert residual(switched) > 0.1
        if kind == "rope":
            single = mora.delta_weight(torch.randn(r_hat, r_hat, generator=g, dtype=torch.float64), (d, k), "rope")
            assert int(torch.linalg.matrix_rank(single)) > r_hat


def test_mora_fold_matches_the_layer():
    torch.manual_seed(0)
    layer = mora.MoRALinear(nn.Linear(17, 30), rank=1, kind="rope", seed=2, name="o_proj")
    with torch.no_grad():
        layer.mora_M.normal_()
    layer.switch_pattern()
    folded = mora.fold_state({f"o.{n}": t for n, t in layer.state_dict().items()}, "rope")
    assert set(folded) == {"o.weight", "o.bias"}
    x = torch.randn(3, 17)
    torch.testing.assert_close(nn.functional.linear(x, folded["o.weight"], folded["o.bias"]), layer(x), rtol=1e-5, atol=1e-5)
    reloaded = mora.MoRALinear(nn.Linear(17, 30), rank=1, kind="rope", seed=0)
    reloaded.load_state_dict(layer.state_dict())
    assert reloaded.pattern().perm_in.tolist() == layer.pattern().perm_in.tolist()


def test_mora_bad_input_is_one_line():
    with pytest.raises(ConfigError, match=r"mora\.rank=8 gives r̂=20 .*at most 5") as err:
        mora.check_layer("mlp.down_proj", 32, 16, 8, "sharing")
    assert "\n" not in str(err.value)
    assert mora.check_layer("mlp.down_proj", 32, 16, 5, "sharing") == 15  # int(sqrt(48 * 5) + 0.5)
    with pytest.raises(ConfigError, match=r"mora\.compression='rotate' is unknown: use one of sharing, rope"):
        mora.MoRALinear(nn.Linear(16, 16), rank=1, kind="rotate")
    with pytest.raises(ConfigError, match="train.method='nope' is unknown: use one of"):
        get_method("nope")


# ----------------------------------------------------------------------------- GaLore


def load_galore_adamw():
    """galore-torch's ``AdamW`` without its package ``__init__`` (which imports bitsandbytes).

    One documented difference: its SVD's signs follow :func:`galore.canonical_signs` (galore-torch
    keeps whatever LAPACK returns). Its SVD itself (fp32, LAPACK) is untouched. GaLore keeps C's
    moments across projector updates, so the signs are part of the trajectory: without this,
    reference and ours would agree only where LAPACK happens to pick the canonical signs."""
    spec = importlib.util.find_spec("galore_torch")
    if spec is None:
        pytest.skip("galore-torch is not installed (pip install '.[test]')")
    folder = spec.submodule_search_locations[0]
    package = types.ModuleType("_galore_reference")
    package.__path__ = [folder]
    sys.modules.setdefault("_galore_reference", package)
    module_spec = importlib.util.spec_from_file_location("_galore_reference.adamw", f"{folder}/adamw.py")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    sys.modules["_galore_reference.galore_projector"].torch = _TorchWithCanonicalSVD("torch")
    return module.AdamW


def _canonical_svd(a, full_matrices=True):
    u, s, vh = torch.linalg.svd(a, full_matrices=full_matrices)
    u, vh = gl.canonical_signs(u, vh)
    return u, s, vh


class _TorchWithCanonicalSVD(types.ModuleType):
    """``torch`` as the reference projector module sees it: all of torch, but ``linalg.svd``
    returns canonical signs."""

    linalg = types.SimpleNamespace(svd=_canonical_svd)

    def __getattr__(self, name):
        return getattr(torch, name)


class Net(nn.Module):
    """A tall (20x12), a square (20x20) and a wide (8x20) matrix, plus a head trained with plain Adam."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3, self.head = nn.Linear(12, 20), nn.Linear(20, 20), nn.Linear(20, 8), nn.Linear(8, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))))


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


STEPS, GAP, RANK, SCALE, LR, EPS = 23, 5, 4, 0.25, 1e-2, 1e-6
NAMES = ("l1", "l2", "l3")


def _data():
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(12, 5, generator=g)
    batches = []
    for _ in range(STEPS):
        x = torch.randn(32, 12, generator=g)
        batches.append((x, (x @ teacher).argmax(-1)))
    return batches


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


def _cfg(**sections):
    from ds_relora.config import RunConfig
    from ds_relora.config_base import from_dict

    return from_dict(RunConfig, sections)


def test_registered_methods_validate_wrap_and_fold():
    from ds_relora.methods import METHODS, MergeableLayer

    assert {"full", "control", "lora", "relora", "mora", "remora", "galore"} <= set(METHODS)
    cfg = _cfg(mora={"rank": 1, "compression": "rope"}, relora={"target_modules": ["l[12]"]})
    torch.manual_seed(0)
    model = Net()
    layers = get_method("remora").wrap(model, cfg, seed=3)
    assert [n for n, _ in layers] == ["l1", "l2"] and all(isinstance(m, MergeableLayer) for _, m in layers)
    with torch.no_grad():
        for _, layer in layers:
            layer.mora_M.normal_()
    x = torch.randn(4, 12)
    plain = Net()
    plain.load_state_dict(get_method("remora").fold(model.state_dict(), {"mora_compression": "rope"}))
    torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-6)

    galore_cfg = _cfg(galore={"rank": RANK, "update_proj_gap": GAP, "scale": SCALE}, relora={"target_modules": ["l"]})
    galore_model = Net()
    get_method("galore").wrap(galore_model, galore_cfg, seed=0)
    groups = get_method("galore").param_groups(galore_model, galore_cfg)
    assert [g["eps_scale"] for g in groups] == [1.0, SCALE] and len(groups[1]["params"]) == 3
    with pytest.raises(ConfigError, match=r"galore\.update_proj_gap=0 must be at least 1"):
        _cfg(galore={"update_proj_gap": 0})
    with pytest.raises(ConfigError, match=r"galore\.proj_type"):
        _cfg(galore={"proj_type": "full"})
    with pytest.raises(ConfigError, match=r"optim\.weight_decay=0\.1 cannot be honoured .*set optim\.weight_decay=0"):
        get_method("galore").validate(_cfg(optim={"weight_decay": 0.1}), 0)
    with pytest.raises(ConfigError, match=r"mora\.compression"):
        _cfg(mora={"compression": "x"})
    with pytest.raises(ConfigError, match=r"mora\.rank=64 gives r̂=.*layer 'l1'"):
        get_method("mora").wrap(Net(), _cfg(mora={"rank": 64}, relora={"target_modules": ["l1"]}), 0)
    # mora.rank / galore.rank default to relora.rank: one rank for a method comparison.
    assert get_method("mora").wrap(Net(), _cfg(relora={"rank": 2, "target_modules": ["l2"]}), 0)[0][1].r_hat == 9


class _CountCos(torch.overrides.TorchFunctionMode):
    """Counts cos evaluations: only the rope rotation tables compute one."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.cos, torch.Tensor.cos):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_mora_rope_tables_are_built_once_per_pattern_device_and_dtype():
    torch.manual_seed(0)
    d, k = 40, 24
    base = nn.Linear(k, d)
    layer = mora.MoRALinear(base, rank=1, kind="rope", seed=5, name="q_proj")
    with torch.no_grad():
        layer.mora_M.normal_()
    x = torch.randn(2, 3, k)
    m = layer.mora_M.detach()
    want = nn.functional.linear(x, base.weight + mora.delta_weight(m.double(), (d, k), "rope", 0, seed=5).float(), base.bias)
    count = _CountCos()
    with count:
        first = layer(x)
    built = count.calls
    assert built > 0, "the rope forward must evaluate its rotation tables"
    with count:
        for _ in range(3):  # every layer's forward of every later step reuses them
            again = layer(x)
        layer.delta_rows({"mora_M": m}, 0, d)  # the merge, same device and dtype
    assert count.calls == built
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, first)
    with count:
        layer.delta_rows({"mora_M": m.double()}, 0, d)  # another dtype: its own tables, once
        layer.delta_rows({"mora_M": m.double()}, 0, d)
    assert count.calls == 2 * built
    layer.switch_pattern()  # a new pattern builds its own
    with count:
        layer(x)
        layer(x)
    assert count.calls == 3 * built


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
    from distributed import results, run_workers

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


@pytest.mark.parametrize("method, rank, needle", [
    ("galore", 100, "set galore.rank between 1 and 12"),
    ("galore", 60, "set galore.rank between 1 and 12"),
    ("mora", 40, "set mora.rank to at most 2"),
    ("mora", 30, "set mora.rank to at most 2"),
])
def test_rank_error_gives_the_bound_of_all_layers(method, rank, needle):
    # The first wrapped layer is the wide one: its own bound (60 / 30) would only move the error on.
    shapes = [("wide", 64, 60), ("mid", 64, 32), ("narrow", 12, 64)]
    with pytest.raises(ConfigError) as err:
        get_method(method).check_shapes(_cfg(**{method: {"rank": rank}}), shapes)
    msg = str(err.value)
    assert re.search(re.escape(needle) + r"(?!\d)", msg) and "\n" not in msg, msg  # "at most 2", not 29
