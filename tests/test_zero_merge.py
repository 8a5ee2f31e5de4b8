"""ReLoRA under DeepSpeed ZeRO 0-3: real 2-rank CPU runs (gloo).

Each launch runs every stage inside the same two processes to pay the start-up cost once.
"""

import pytest

from harness.checks import within_rel
from harness.ranks import results, run_workers

WORKER = "tests/workers/relora_engine_worker.py"
pytestmark = pytest.mark.distributed


def _by_stage(res):
    out = {}
    for r in res:
        out.setdefault(r["stage"], []).append(r)
    return out


@pytest.fixture(scope="module")
def fp32_checks():
    return _by_stage(results(run_workers([WORKER, "--mode", "checks", "--stages", "0,1,2,3"], 2)))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_merge_keeps_function_and_reinit_reaches_masters_fp32(fp32_checks, stage):
    ranks = fp32_checks[stage]
    assert len(ranks) == 2
    for r in ranks:
        assert r["weight_changed"] > 1e-3, "the merge must move W"
        assert r["merge_logit_diff"] <= 1e-5 * max(1.0, r["logit_scale"])
        assert r["reinit_module"] and r["reinit_master"], "B == 0 and A == new init, in module and master"
        assert r["after_lr0_module"] and r["after_lr0_master"], "an LR-0 step must not bring the old A/B back"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_moment_reset_prunes_fraction_and_touches_nothing_else(fp32_checks, stage):
    for r in fp32_checks[stage]:
        assert r["masks_ok"], "moments must equal known * joint mask"
        assert r["others_untouched"], "non-adapter Adam state must be untouched"
        for name, frac in r["prune_fractions"].items():
            assert 0.89 <= frac <= 0.9, (name, frac)


def test_masks_identical_across_stages_and_world_sizes(fp32_checks):
    one_rank = _by_stage(results(run_workers([WORKER, "--mode", "checks", "--stages", "0"], 1)))[0][0]
    reference = one_rank["mask_digests"]
    assert reference
    for stage, ranks in fp32_checks.items():
        for r in ranks:
            assert r["mask_digests"] == reference, f"stage {stage} rank {r['rank']}"


def test_bf16_merge_and_reinit_all_stages():
    res = _by_stage(results(run_workers([WORKER, "--mode", "checks", "--stages", "0,1,2,3", "--bf16", "1"], 2)))
    assert sorted(res) == [0, 1, 2, 3]
    for stage, ranks in res.items():
        for r in ranks:
            # W is rounded to bf16 after the merge: the outputs move by bf16 resolution only.
            assert r["merge_logit_diff"] <= 2e-2 * max(1.0, r["logit_scale"]), (stage, r["merge_logit_diff"])
            assert r["reinit_module"] and r["reinit_master"], stage
            assert r["after_lr0_module"] and r["after_lr0_master"], stage
            assert r["masks_ok"] and r["others_untouched"], stage


def test_zero3_sharded_base_without_persistence():
    # Threshold 0: W and the adapters are never persistent, so the merge must add its rows into
    # each rank's own shard of W.
    (r0, r1) = results(run_workers([WORKER, "--mode", "checks", "--stages", "3", "--persist", "0"], 2))
    for r in (r0, r1):
        assert r["merge_logit_diff"] <= 1e-5 * max(1.0, r["logit_scale"])
        assert r["reinit_master"] and r["after_lr0_master"] and r["masks_ok"]


def test_same_losses_on_one_rank_and_under_zero_1_2_3():
    ref = results(run_workers([WORKER, "--mode", "losses", "--stages", "0"], 1))[0]
    assert ref["merges"] == [4, 8]
    assert ref["losses"][-1] < ref["losses"][0] - 0.05, "the run must learn"
    runs = results(run_workers([WORKER, "--mode", "losses", "--stages", "1,2,3"], 2))
    assert sorted({r["stage"] for r in runs}) == [1, 2, 3]
    for r in runs:
        assert r["merges"] == [4, 8]
        for step, (a, b) in enumerate(zip(r["losses"], ref["losses"])):
            # fp32: 1 rank sums the batch's gradient in one pass, 2 ranks in two halves plus an
            # all-reduce, so the sums round differently (~1e-7 relative). Measured worst 1.1e-7
            # native (AVX2), 2.3e-7 ATen default (benchmarks/invariance/tolerances.py, AMD EPYC):
            # 44x margin.
            assert within_rel(a, b, 1e-5, "relora 1 rank vs 2 ranks ZeRO 1-3"), (r["stage"], step, a, b)
