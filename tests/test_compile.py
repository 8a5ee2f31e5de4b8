"""``train.compile``: the compiled model trains like the eager one (warm start, switch, merges),
on ZeRO-2 and ZeRO-3, and the adapter layer traces into one graph."""

import pytest
import torch

from harness.checks import one_line_error, read_metrics
from harness.configs import tiny_run_config, write_config
from harness.ranks import run_workers

WORKER = "tests/workers/run_configs.py"


@pytest.fixture(scope="module")
def compile_runs(prepared_data, tmp_path_factory):
    # aot_eager: the full Dynamo + AOTAutograd path (graphs, partitioned backward) without
    # generating C++ code, which would cost minutes on 2 cores.
    root = tmp_path_factory.mktemp("compile")
    runs = {}
    for name, stage, train, relora in (
        ("eager-z2", 2, {}, {}),
        ("compiled-z2", 2, {"compile": True, "compile_backend": "aot_eager"}, {}),
        ("compiled-z3-dropout", 3, {"compile": True, "compile_backend": "aot_eager"}, {"dropout": 0.1}),
    ):
        run_dir = root / name
        cfg = tiny_run_config(prepared_data, run_dir, stage, train={"total_steps": 24, **train}, relora=relora)
        runs[name] = (write_config(root / f"{name}.yaml", cfg), run_dir)
    run_workers([WORKER, *[str(c) for c, _ in runs.values()]], 2, timeout=900)
    return {name: read_metrics(run_dir) for name, (_, run_dir) in runs.items()}


@pytest.mark.distributed
def test_compiled_run_matches_eager(compile_runs):
    """Warm start 8 steps, switch, merges at 16: the same losses as eager, step for step."""
    eager, eager_events = compile_runs["eager-z2"]
    compiled, events = compile_runs["compiled-z2"]
    switched = lambda evs: [e["compiled"] for e in evs if e["event"] == "switch"]  # noqa: E731
    assert switched(events) == [True] and switched(eager_events) == [False]
    assert sorted(compiled) == sorted(eager) == list(range(1, 25))
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], abs=2e-4), step
    assert [e["lr_index"] for e in events if e["event"] == "merge"] == [16]


@pytest.mark.distributed
def test_compiled_zero3_with_dropout_trains(compile_runs):
    losses, events = compile_runs["compiled-z3-dropout"]
    curve = [losses[s] for s in sorted(losses)]
    assert len(curve) == 24 and all(torch.isfinite(torch.tensor(curve)))
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4 - 0.3, curve
    assert [e["lr_index"] for e in events if e["event"] == "merge"] == [16]


def test_wrapped_model_traces_into_one_graph():
    """No graph break in a ReLoRA model with dropout and shared-input fusion (the eager-only seed
    draw and cache are bypassed when compiling)."""
    import torch._dynamo

    from ds_relora.models import WRAPPED_TYPES, Shape, build_model, llama_config
    from ds_relora.methods.lora_layer import wrap_model

    model = build_model(llama_config(Shape(hidden=48, intermediate=100, layers=2, heads=4), 61, 32), seed=0)
    wrap_model(model, rank=4, alpha=8.0, dropout=0.1, target_modules=list(WRAPPED_TYPES), seed=1)
    x = torch.randint(0, 61, (2, 16))
    explained = torch._dynamo.explain(model.train())(input_ids=x, labels=x)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]


def test_unknown_compile_backend_is_refused_before_workers(prepared_data, tmp_path):
    from ds_relora.config import load_config
    from ds_relora.errors import ConfigError
    from ds_relora.train.plan import plan_run

    cfg = tiny_run_config(prepared_data, tmp_path / "run", 2, train={"compile": True, "compile_backend": "inductr"})
    with pytest.raises(ConfigError) as info:
        plan_run(load_config(write_config(tmp_path / "c.yaml", cfg)), 1)
    one_line_error(info, "train.compile_backend='inductr'", "inductor")
