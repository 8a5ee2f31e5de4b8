"""The projected optimizer (APOLLO, APOLLO-Mini, Fira) on one process against the reference
packages ``apollo-torch`` and ``fira`` (test oracles only): per-step losses and final weights over
five projector changes, tall (20x12), square (20x20) and wide (8x20) matrices plus a head trained
with plain Adam, weight decay on."""

import copy

import pytest
import torch
from torch import nn

from ds_relora.zero.projected_adam import ProjectedAdamW
from ds_relora.zero.projected_layout import split_rows
from ds_relora.zero.projection import next_seed, random_projector
from harness.oracles import Net, load_reference, teacher_batches


def apollo_reference():
    return load_reference("apollo_torch", "apollo", "svd_projector", fp64=True).AdamW


def fira_reference():
    return load_reference("fira", "fira_adamw", "gradient_projection", fp64=True).AdamW


STEPS, GAP, RANK, LR, EPS, WD = 23, 5, 4, 1e-2, 1e-6, 0.1
NAMES = ("l1", "l2", "l3")


def _data():
    return teacher_batches(STEPS)


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
    rp = load_reference("apollo_torch", "random_projector")
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


def test_plain_step_updates_every_run_in_pieces_as_one_concatenated_adamw_step(monkeypatch):
    """The non-projected elements of a ZeRO partition come in several runs (a row-blocked head's
    blocks, params beside projected matrices): stepped in place in pieces, their values and
    moments are those of one HF-AdamW step on the concatenated runs (the whole-tensor kernel)."""
    from ds_relora.zero import adam_kernels

    monkeypatch.setattr(adam_kernels, "PLAIN_CHUNK", 96)  # pieces inside runs and across run ends
    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(1000, generator=gen)
    runs = [(0, 250), (300, 301), (700, 300)]  # (offset, numel): gaps are another method's elements
    group = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.1}
    reference, reference_state = torch.cat([flat[o:o + n] for o, n in runs]), {"step": 0}
    state = {"step": 0}
    untouched = flat.clone()
    for _ in range(3):
        grad = torch.randn(1000, generator=gen)
        adam_kernels.adam_step_runs(state, [(flat.narrow(0, o, n), grad.narrow(0, o, n)) for o, n in runs], group)
        direction, step_size = adam_kernels.adam_direction(reference_state, torch.cat([grad[o:o + n] for o, n in runs]), group)
        reference.add_(direction, alpha=-step_size).add_(reference, alpha=-group["lr"] * group["weight_decay"])
    # Elementwise kernels: the same sums; only a vector loop's scalar tail may round a fused
    # multiply-add differently, far below what a moment read at the wrong offset would move.
    torch.testing.assert_close(torch.cat([flat[o:o + n] for o, n in runs]), reference, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(state["exp_avg_sq"], reference_state["exp_avg_sq"], rtol=1e-6, atol=1e-9)
    assert state["step"] == 3
    assert torch.equal(flat[250:300], untouched[250:300]) and torch.equal(flat[601:700], untouched[601:700])
