"""The projected optimizer (APOLLO, APOLLO-Mini, Fira) on one process against the reference
packages ``apollo-torch`` and ``fira`` (test oracles only): per-step losses and final weights over
five projector changes, tall (20x12), square (20x20) and wide (8x20) matrices plus a head trained
with plain Adam, weight decay on."""

import copy
import importlib.util
import sys
import types

import pytest
import torch
from torch import nn

from ds_relora.zero.projected_adam import ProjectedAdamW
from ds_relora.zero.projected_layout import split_rows
from ds_relora.zero.projection import canonical_signs, next_seed, random_projector


def _canonical_svd(a, full_matrices=True):
    """The reference's SVD with our rule: fp64, canonical signs, returned in the input's dtype."""
    u, s, vh = torch.linalg.svd(a.double(), full_matrices=full_matrices)
    u, vh = canonical_signs(u, vh)
    return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)


class _TorchWithCanonicalSVD(types.ModuleType):
    """``torch`` as a reference projector module sees it: all of torch, but ``linalg.svd`` is
    :func:`_canonical_svd` (the references run LAPACK's fp32 SVD and keep its signs; we run fp64
    with canonical signs so the projector does not depend on the world size: the one documented
    difference, given to the reference here)."""

    linalg = types.SimpleNamespace(svd=_canonical_svd)

    def __getattr__(self, name):
        return getattr(torch, name)


def _load(package: str, module: str):
    """``package.module`` without the package's ``__init__`` (apollo-torch's imports bitsandbytes)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"{package} is not installed (pip install '.[test]')")
    folder = spec.submodule_search_locations[0]
    alias = f"_reference_{package}"
    pkg = types.ModuleType(alias)
    pkg.__path__ = [folder]
    sys.modules.setdefault(alias, pkg)
    module_spec = importlib.util.spec_from_file_location(f"{alias}.{module}", f"{folder}/{module}.py")
    loaded = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = loaded
    module_spec.loader.exec_module(loaded)
    return loaded


def apollo_reference():
    mod = _load("apollo_torch", "apollo")
    sys.modules["_reference_apollo_torch.svd_projector"].torch = _TorchWithCanonicalSVD("torch")
    return mod.AdamW


def fira_reference():
    mod = _load("fira", "fira_adamw")
    sys.modules["_reference_fira.gradient_projection"].torch = _TorchWithCanonicalSVD("torch")
    return mod.AdamW


class Net(nn.Module):
    """A tall (20x12), a square (20x20) and a wide (8x20) matrix, plus a head trained with plain Adam."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3, self.head = nn.Linear(12, 20), nn.Linear(20, 20), nn.Linear(20, 8), nn.Linear(8, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))))


STEPS, GAP, RANK, LR, EPS, WD = 23, 5, 4, 1e-2, 1e-6, 0.1
NAMES = ("l1", "l2", "l3")


def _data():
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(12, 5, generator=g)
    batches = []
    for _ in range(STEPS):
        x = torch.randn(32, 12, generator=g)
        batches.append((x, (x @ teacher).argmax(-1)))
    return batches


def _groups(model, extra: dict):
    matrices = [getattr(model, n).weight for n in NAMES]
    plain = [p for p in model.parameters() if all(p is not w for w in matrices)]
    return [{"params": plain}, {"params": matrices, **extra}]


def _train(model, opt, data):
    losses = []
    for batch in data:
        loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


# (reference options, our options)
CASES = {
    "apollo-random-channel": ({"proj": "random", "scale_type": "channel", "scale": 1.0},
                              {"proj_kind": "random", "scale_type": "channel", "proj_scale": 1.0}),
    "apollo-svd-channel": ({"proj": "svd", "scale_type": "channel", "scale": 2.0},
                           {"proj_kind": "svd", "scale_type": "channel", "proj_scale": 2.0}),
    "apollo-mini-tensor": ({"proj": "random", "scale_type": "tensor", "scale": 128.0, "rank": 1},
                           {"proj_kind": "random", "scale_type": "tensor", "proj_scale": 128.0, "proj_rank": 1}),
    "fira": ({"alpha": 0.5}, {"proj_kind": "svd", "scale_type": "channel", "proj_scale": 0.5, "residual": True}),
}


def _run_pair(case: str):
    torch.manual_seed(0)
    base, data = Net(), _data()
    ref_opts, our_opts = CASES[case]
    rank = ref_opts.get("rank", RANK)
    ref_model, our_model = copy.deepcopy(base), copy.deepcopy(base)
    common = {"rank": rank, "update_proj_gap": GAP, "proj_type": "std"}
    if case == "fira":
        ref_opt = fira_reference()(_groups(ref_model, {**common, **ref_opts}), lr=LR, eps=EPS, weight_decay=WD,
                                   no_deprecation_warning=True)
    else:
        ref_opt = apollo_reference()(_groups(ref_model, {**common, **ref_opts}), lr=LR, eps=EPS, weight_decay=WD)
    ours = {"proj_rank": rank, "update_proj_gap": GAP, "residual": False, "limiter": True, **our_opts}
    our_opt = ProjectedAdamW(_groups(our_model, ours), lr=LR, eps=EPS, weight_decay=WD)
    return ref_model, _train(ref_model, ref_opt, data), our_model, _train(our_model, our_opt, data), our_opt


@pytest.mark.parametrize("case", sorted(CASES))
def test_projected_adam_matches_the_reference_package(case):
    ref_model, ref, our_model, ours, opt = _run_pair(case)
    assert ref[-1] < ref[0] - 0.1, ref  # it learns
    ref_t, ours_t = torch.tensor(ref), torch.tensor(ours)
    rel = ((ours_t - ref_t).abs() / ref_t.abs()).max().item()
    assert rel <= 1e-6, (case, rel)
    for (name, a), (_, b) in zip(ref_model.named_parameters(), our_model.named_parameters()):
        scale = a.detach().abs().max().item()
        assert (a.detach() - b.detach()).abs().max().item() <= 1e-6 * scale, (case, name)
    # Every step projected each of the 3 matrices: none ran as plain Adam.
    assert opt.projections == 3 * STEPS
    assert all(opt.proj_state[m.index]["step"] == STEPS for m in opt.matrices)


def test_projected_adam_differs_when_the_projector_is_not_renewed():
    """The check can fail: with a gap past the run (one projector) the losses leave the reference's."""
    torch.manual_seed(0)
    base, data = Net(), _data()
    _, ref, _, _, _ = _run_pair("apollo-svd-channel")
    model = copy.deepcopy(base)
    stale = ProjectedAdamW(_groups(model, {"proj_rank": RANK, "update_proj_gap": STEPS + 1, "proj_kind": "svd",
                                           "scale_type": "channel", "proj_scale": 2.0, "residual": False,
                                           "limiter": True}), lr=LR, eps=EPS, weight_decay=WD)
    losses = torch.tensor(_train(model, stale, data))
    assert ((losses - torch.tensor(ref)).abs() / torch.tensor(ref).abs()).max().item() > 1e-4


def test_random_projector_and_seed_chain_equal_apollo_torch():
    rp = _load("apollo_torch", "random_projector")
    assert next_seed(7) == rp.next_seed(7)
    expected = rp.stable_randn((4, 9), seed=next_seed(3)) / 2.0
    assert torch.equal(random_projector((4, 9), 4, next_seed(3)), expected)


def test_a_projected_parameter_must_be_2d():
    with pytest.raises(Exception, match="2-D weights only"):
        ProjectedAdamW([{"params": [nn.Parameter(torch.zeros(5))], "proj_rank": 1}], lr=1e-3)


def test_split_rows_are_the_rows_cut_by_a_partition_boundary():
    # 5 x 4 matrix over 3 ranks: [0, 6) [6, 13) [13, 20): rows 1 (6) and 3 (13) are cut.
    assert split_rows([(0, 6), (6, 13), (13, 20)], 4) == [1, 3]
    assert split_rows([(0, 8), (8, 20), (0, 0)], 4) == []
