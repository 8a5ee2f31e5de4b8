"""ReMoRA, MoRA and GaLore through the real trainer on 2 CPU ranks: every ZeRO stage, 1 rank vs
2 ranks, exact resume, export folds, and GaLore against its reference package."""

import math

import pytest
import torch

from harness.checks import read_metrics, within_rel
from harness.configs import method_run_config, write_config
from harness.ranks import results, run_workers

WORKER = "tests/workers/run_configs.py"
pytestmark = pytest.mark.distributed

_config = method_run_config


@pytest.fixture(scope="module")
def runs(prepared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("method_engine")
    two, resumed, one, dirs = [], [], [], {}

    def add(key, launch, **extra):
        run_dir = root / "-".join(map(str, key))
        cfg = _config(prepared_data, run_dir, key[0], key[1], **extra)
        launch.append(write_config(root / f"{run_dir.name}.yaml", cfg))
        dirs[key] = run_dir
        return cfg

    for method in ("remora", "galore"):
        for stage in (0, 1, 2, 3):
            add((method, stage), two)
        add((method, 0, "one-rank"), one)
    add(("mora", 2), two)
    # Stopped at step 13 (after a merge / projector update, mid-cycle) and resumed.
    for method, stage in (("remora", 3), ("galore", 2)):
        cut = add((method, stage, "cut"), two, train={"stop_after_steps": 13})
        cut["train"] = {**cut["train"], "stop_after_steps": None, "resume": "auto"}
        resumed.append(write_config(root / f"{method}-{stage}-resume.yaml", cut))
    run_workers([WORKER, *map(str, two)], 2, timeout=900)
    run_workers([WORKER, *map(str, resumed)], 2, timeout=600)
    run_workers([WORKER, *map(str, one)], 1, timeout=600)
    return dirs


@pytest.fixture(scope="module")
def default_kernel_runs(prepared_data, tmp_path_factory):
    """The 1-rank and 2-rank runs of ReMoRA and GaLore again, on ATen's scalar kernels
    (ATEN_CPU_CAPABILITY=default: another CPU's rounding on every machine, AVX2 or AVX-512)."""
    root = tmp_path_factory.mktemp("method_engine_default_kernels")
    dirs, launch = {}, {1: [], 2: []}
    for method in ("remora", "galore"):
        for stage, world in [(0, 1), (0, 2), (1, 2), (2, 2), (3, 2)]:
            run_dir = root / f"{method}-{stage}-{world}"
            cfg = _config(prepared_data, run_dir, method, stage)
            launch[world].append(str(write_config(root / f"{run_dir.name}.yaml", cfg)))
            dirs[(method, stage) if world == 2 else (method, 0, "one-rank")] = run_dir
    for world, configs in launch.items():
        run_workers([WORKER, *configs], world, timeout=900, env={"ATEN_CPU_CAPABILITY": "default"})
    return dirs


def _curve(run_dir):
    losses, events = read_metrics(run_dir)
    return [losses[s] for s in sorted(losses)], events


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("method", ["remora", "galore"])
def test_method_trains_and_merges_under_each_stage(runs, method, stage):
    curve, events = _curve(runs[(method, stage)])
    assert len(curve) == 24 and all(math.isfinite(v) for v in curve)
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4 - 0.3, curve
    kind = "merge" if method == "remora" else "projection"
    expected = [8, 16] if method == "remora" else [0, 8, 16]
    assert [e["lr_index"] for e in events if e["event"] == kind] == expected
    other = "projection" if method == "remora" else "merge"
    assert not [e for e in events if e["event"] == other]


def test_mora_trains_without_merging(runs):
    curve, events = _curve(runs[("mora", 2)])
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4 - 0.3, curve
    assert not [e for e in events if e["event"] in ("merge", "projection")]


@pytest.mark.parametrize("kernels", ["native", "aten-default"])
@pytest.mark.parametrize("method", ["remora", "galore"])
def test_same_losses_on_one_rank_and_two_ranks_under_zero_0_1_2_3(request, method, kernels):
    runs = request.getfixturevalue("runs" if kernels == "native" else "default_kernel_runs")
    ref, _ = _curve(runs[(method, 0, "one-rank")])
    for stage in (0, 1, 2, 3):
        other, _ = _curve(runs[(method, stage)])
        assert len(other) == len(ref) == 24
        for step, (a, b) in enumerate(zip(other, ref), start=1):
            # fp32: 1 rank sums the batch's gradient over 2 micro-batches, 2 ranks over 2 halves
            # plus an all-reduce. ZeRO-0 gives the same bits; ZeRO 1-3 round differently (~1e-7).
            # Worst measured (benchmarks/invariance/tolerances.py, AMD EPYC): galore 9.4e-8 on the
            # native (AVX2) and the ATen-default kernels (107x margin); remora 4.2e-7 native,
            # 5.1e-7 default (20x). Before the fixes of issue 18: galore 1.1e-3, remora 7.6e-5 on
            # the default kernels. A real ZeRO bug shows at 1e-3 or more.
            what = f"1 vs 2 ranks, {method}" + ("" if kernels == "native" else ", ATen default kernels")
            assert within_rel(a, b, 1e-5, what), (method, stage, step, a, b)


@pytest.mark.parametrize("method,stage", [("remora", 3), ("galore", 2)])
def test_resume_after_merge_is_bit_identical(runs, method, stage):
    whole, _ = _curve(runs[(method, stage)])
    cut, events = _curve(runs[(method, stage, "cut")])
    assert cut == whole
    assert any(e["event"] == "resume" for e in events)


@pytest.mark.parametrize("method,stage", [("remora", 3), ("galore", 3), ("mora", 2)])
def test_export_folds_the_adapter(runs, tmp_path, method, stage):
    from transformers import AutoModelForCausalLM

    from ds_relora.eval.evaluate import evaluate_model
    from ds_relora.checkpoint.export import export_model
    from ds_relora.checkpoint.meta import read_meta

    run_dir = runs[(method, stage)]
    ckpt = run_dir / "checkpoints" / "step-24"
    meta = read_meta(ckpt)
    assert meta.method == method and meta.phase == "adapters"
    exported = AutoModelForCausalLM.from_pretrained(str(export_model(ckpt, tmp_path / "export"))).eval()
    assert not any(k in n for n, _ in exported.named_parameters() for k in ("mora", "galore"))
    # The engine's final eval (2 ranks x 2 batches x 4 sequences) equals the folded export's.
    _, events = read_metrics(run_dir)
    final = [e for e in events if e["event"] == "eval"][-1]
    ours = evaluate_model(exported, meta.data_path, 32, batch_size=4, max_batches=4)
    assert ours["loss"] == pytest.approx(final["loss"], rel=1e-5)


def test_remora_pattern_switches_at_every_merge(runs):
    from ds_relora.checkpoint.format import open_weights

    state = open_weights(runs[("remora", 3)] / "checkpoints" / "step-24").load_all()
    patterns = {k: v.tolist() for k, v in state.items() if k.endswith(".mora_pattern")}
    assert patterns and all(v[1] == 2 for v in patterns.values()), patterns  # two merges: pattern 2


def test_galore_matches_galore_torch_through_the_trainer(prepared_data, tmp_path):
    # fp32, 1 rank, ZeRO-0, weight decay 0, no clipping, 3 projector updates in 20 steps.
    cfg = _config(prepared_data, tmp_path / "run", "galore", 0, train={"total_steps": 20, "global_batch_size": 4},
                  optim={"grad_clip": 0.0, "eps": 1e-6}, galore={"update_proj_gap": 7})
    (out,) = results(run_workers(["tests/workers/galore_oracle_worker.py", str(write_config(tmp_path / "c.yaml", cfg))],
                                 1, timeout=600))
    ours, ref = torch.tensor(out["ours"]), torch.tensor(out["reference"])
    assert len(ours) == 20 and ref[-4:].mean() < ref[:4].mean() - 0.3
    rel = ((ours - ref).abs() / ref.abs()).max().item()
    assert rel <= 1e-4, (rel, ours.tolist(), ref.tolist())


def test_remora_merge_and_galore_projection_keep_the_logits_on_every_stage():
    outs = results(run_workers(["tests/workers/method_merge_worker.py"], 2, timeout=900))
    assert len(outs) == 2 * 2 * 4 * 2
    for r in outs:
        assert r["w_moved"] > 0, r  # the merge really wrote ΔW into the (sharded) W
        # fp32: W + ΔW rounds once (~1e-7 relative); bf16: W is rounded to bf16 after the add.
        assert r["max_diff"] <= (2e-2 if r["bf16"] else 1e-4) * max(1.0, r["scale"]), r
        if r["method"] == "remora":
            assert r["pattern"][1] == 1, r  # the next grouping after the merge


def test_galore_projector_is_the_same_bits_on_1_2_3_ranks_and_every_stage(prepared_data, tmp_path):
    # Global batch 12 in micro-batches of 2: 1 rank accumulates 6, 2 ranks 3 each, 3 ranks 2 each,
    # the same 6 micro-batches in every case. The projector of step 0 (identical weights) must
    # then be the same bits everywhere: fp64 gradient sum and SVD, canonical signs.
    dirs, launch = {}, {1: [], 2: [], 3: []}
    for world, stage in [(1, 0), (1, 3)] + [(w, s) for w in (2, 3) for s in (0, 1, 2, 3)]:
        run_dir = tmp_path / f"w{world}-z{stage}"
        cfg = _config(prepared_data, run_dir, "galore", stage,
                      train={"total_steps": 6, "global_batch_size": 12, "micro_batch_size": 2},
                      optim={"warmup_steps": 2})
        launch[world].append(str(write_config(tmp_path / f"{run_dir.name}.yaml", cfg)))
        dirs[(world, stage)] = run_dir
    for world, configs in launch.items():
        run_workers([WORKER, *configs], world, timeout=600)
    from ds_relora.checkpoint.format import open_weights

    def projectors(run_dir):
        state = open_weights(run_dir / "checkpoints" / "step-6").load_all()
        return {k: v for k, v in state.items() if k.endswith(".galore_proj")}

    ref = {stage: projectors(dirs[(1, stage)]) for stage in (0, 3)}
    assert ref[0] and all(v.abs().sum() > 0 for v in ref[0].values())
    for (world, stage), run_dir in dirs.items():
        other, same = projectors(run_dir), ref[3 if stage == 3 else 0]
        assert other.keys() == same.keys(), (world, stage)
        different = [k for k in same if not torch.equal(other[k], same[k])]
        assert not different, (world, stage, different[:3])
    # ZeRO-3's probe gradient differs from ZeRO 0-2's in its last fp32 bits (measured: the
    # projectors then differ by <= 7.9e-7; the forward losses are the same bits, the backward
    # through DeepSpeed's partitioned-parameter hooks and its own linear is not). With canonical
    # signs that moves the projector by ulps, not to another basis (a flip or a swap moves it ~1).
    for key in ref[0]:
        assert (ref[3][key] - ref[0][key]).abs().max() <= 1e-5, key


def test_galore_projector_owners_are_spread_and_one_full_gradient_is_alive_per_rank():
    # 14 wrapped linears round-robin over 2 ranks: each rank runs 7 SVDs, holds one fp64 G at a
    # time (counted by weakref finalizers, so a G kept alive anywhere would show), and installs
    # the same projector bits as all-reducing every G and running every SVD everywhere.
    outs = results(run_workers(["tests/workers/galore_owner_worker.py"], 2, timeout=600))
    assert sorted((r["stage"], r["rank"]) for r in outs) == [(2, 0), (2, 1), (3, 0), (3, 1)]
    for r in outs:
        assert r["layers"] == 14 and r["svd_layers"] == 7, r
        assert r["peak_full_gradients"] == 1, r
        assert r["differ"] == [], r


BAD_SETTINGS = [
    ("remora", {"mora": {"rank": 500}}, r"mora\.rank=500 gives r̂=.* set mora\.rank to at most"),
    ("galore", {"galore": {"rank": 500}}, r"galore\.rank=500 does not fit layer"),
    ("galore", {"optim": {"weight_decay": 0.1}}, r"optim\.weight_decay=0\.1 cannot be honoured"),
    ("galore", {"galore": {"update_proj_gap": 0}}, r"galore\.update_proj_gap=0 must be at least 1"),
    ("mora", {"mora": {"compression": "zip"}}, r"mora\.compression"),
    ("apollo", {"apollo": {"rank": 500}}, r"apollo\.rank=500 does not fit layer"),
    ("fira", {"fira": {"alpha": 0.0}}, r"fira\.alpha=0\.0 must be positive"),
    ("apollo_mini", {"apollo_mini": {"update_proj_gap": 0}}, r"apollo_mini\.update_proj_gap=0 must be at least 1"),
    ("apollo", {"apollo": {"proj": "orthogonal"}}, r"apollo\.proj"),
]


def test_bad_method_settings_fail_before_launch(prepared_data, tmp_path):
    from ds_relora.config import RunConfig
    from ds_relora.config_base import from_dict
    from ds_relora.errors import ConfigError
    from ds_relora.train.plan import plan_run

    for method, extra, message in BAD_SETTINGS:
        with pytest.raises(ConfigError, match=message):
            plan_run(from_dict(RunConfig, method_run_config(prepared_data, tmp_path, method, 2, **extra)), 2)