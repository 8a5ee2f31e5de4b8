"""Method-level math of the method seam, single process: MoRA/ReMoRA expansion, the method
registry (validate, wrap, fold) and rank limits. GaLore's math: tests/test_galore_math.py."""

import math
import re

import pytest
import torch
from torch import nn

from ds_relora.errors import ConfigError
from ds_relora.methods import get_method, shard_delta
from ds_relora.methods import mora
from test_galore_math import GAP, RANK, SCALE, Net

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


def test_method_names_agree_in_config_registry_and_cli():
    """config.py sits below methods/ and keeps its own list of names: the three must stay equal."""
    import typing

    from ds_relora.cli import build_parser
    from ds_relora.config import Method as ConfigMethod
    from ds_relora.methods import METHODS

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["estimate-memory"]
    cli = next(a for a in sub._actions if a.dest == "method").choices
    assert set(typing.get_args(ConfigMethod)) == set(METHODS) == set(cli)
