"""``ds-relora sweep`` / ``compare`` / ``eval --tasks``: a real sweep of tiny runs (one of them
stopped half-way and resumed), its status, its SLURM array, the comparison's numbers against the
runs' own metrics.jsonl, the plots as images, token budgets, and lm-eval on a local task."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import statistics
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from harness import REPO
from harness.checks import read_metrics
from harness.configs import tiny_run_config

TOTAL = 16  # tiny runs: the relora point has a warm start of 4 and 3 cycles of 4 steps


def _cli(*args):
    """``ds-relora ARGS`` in this process: (exit code, stdout, stderr)."""
    from ds_relora.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def _tokens_per_param_for(data: Path, steps: int) -> float:
    """The tokens_per_param that buys ``steps`` steps of the tiny config (half a step of slack)."""
    from ds_relora.config import from_dict, RunConfig
    from ds_relora.study.budgets import full_rank_params

    cfg = from_dict(RunConfig, tiny_run_config(data, Path("unused")))
    per_step = cfg.train.micro_batch_size * cfg.data.seq_len
    return (steps + 0.5) * per_step / full_rank_params(cfg)


def _sweep_file(folder: Path, data: Path, **extra) -> Path:
    base = tiny_run_config(data, folder / "unused")
    base["train"].update({"eval_batches": 2, "keep_last": 0})
    base["launch"]["master_port"] = 29600 + os.getpid() % 300  # other test sessions may share 29500
    spec = {
        "name": "tiny_study", "out": str(folder / "sweep"), "config": base,
        "budget": {"tokens_per_param": _tokens_per_param_for(data, TOTAL)},
        "derive": {"warm_start_fraction": 0.25, "cycles": 3, "restart_warmup_fraction": 0.05, "evals": 2},
        "methods": {
            "full": {"set": {"train.method": "full"}, "grid": {"train.seed": [0, 1]}},
            "relora": {"set": {"train.method": "relora", "relora.lr": 0.01}},
        },
    }
    spec.update(extra)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def swept(prepared_data, tmp_path_factory):
    """A 3-point sweep: relora first stopped at step 8, then the whole sweep (it resumes)."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = f"{REPO}{os.pathsep}{old or ''}"  # the points run in child processes
    try:
        folder = tmp_path_factory.mktemp("study")
        sweep = _sweep_file(folder, prepared_data)
        out = folder / "sweep"
        first = _cli("sweep", sweep, "--only", "relora", "--set", "train.stop_after_steps=8")
        status_partial = _cli("sweep", sweep, "--status")
        compare_partial = _cli("compare", out, "--out", folder / "compare_partial", "--no-plots")
        resumed_at = time.time()
        second = _cli("sweep", sweep)
        status_done = _cli("sweep", out, "--status")
        third = _cli("sweep", sweep)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    return dict(folder=folder, sweep=sweep, out=out, first=first, status_partial=status_partial,
                compare_partial=compare_partial, resumed_at=resumed_at, second=second, status_done=status_done,
                third=third)


def _status_of(text: str) -> dict[str, str]:
    return {ln.split()[0]: ln.split()[1] for ln in text.splitlines()[1:-1]}


def test_sweep_runs_resumes_and_reports_status(swept):
    rc, out, err = swept["first"]
    assert rc == 0, out + err
    assert "3 point(s) validated" in out and "relora: done" not in out
    assert _status_of(swept["status_partial"][1]) == {"full_seed0": "pending", "full_seed1": "pending",
                                                       "relora": "partial"}
    assert "resumes from step 8" in swept["status_partial"][1]
    rc, out, err = swept["second"]
    assert rc == 0, out + err
    assert "relora: resuming" in out and "full_seed0: starting" in out
    rc, text, _ = swept["status_done"]
    assert rc == 0 and _status_of(text) == dict.fromkeys(["full_seed0", "full_seed1", "relora"], "done")
    assert text.splitlines()[-1].startswith("3 done, 0 running, 0 failed, 0 partial, 0 pending")
    rc, out, _ = swept["third"]
    assert rc == 0 and out.count("done, skipped") == 3  # nothing reruns

    relora = swept["out"] / "relora"
    raw = [json.loads(ln) for ln in (relora / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in raw if r["type"] == "step"]
    assert steps == list(range(1, TOTAL + 1))  # each step once: the second attempt resumed at 9
    first_attempt = [r for r in raw if r["type"] == "step" and r["step"] <= 8]
    assert all(r["time"] < swept["resumed_at"] for r in first_attempt)
    assert all(r["time"] > swept["resumed_at"] for r in raw if r["type"] == "step" and r["step"] > 8)
    state = json.loads((relora / "sweep_state.json").read_text())
    assert state["status"] == "done" and state["attempts"] == 2 and state["wall_s"] > 0
    _, events = read_metrics(relora)
    assert [e["lr_index"] for e in events if e["event"] == "merge"] == [8, 12]  # none at the run's end
    resolved = yaml.safe_load((relora / "config.yaml").read_text())
    assert resolved["train"]["total_steps"] == TOTAL and resolved["relora"]["warm_start_steps"] == 4
    assert resolved["relora"]["reset_every"] == 4 and resolved["train"]["eval_every"] == 8
    assert resolved["train"]["run_dir"] == str(relora)


def test_compare_numbers_equal_the_runs_metrics(swept):
    from PIL import Image

    rc, out, err = _cli("compare", swept["out"])
    assert rc == 0, err
    folder = swept["out"] / "compare"
    runs = {row["name"]: row for row in csv.DictReader((folder / "runs.csv").open())}
    assert set(runs) == {"full_seed0", "full_seed1", "relora"}
    for name, row in runs.items():
        run_dir = swept["out"] / name
        losses, events = read_metrics(run_dir)
        evals = [e for e in events if e["event"] == "eval"]
        steps = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in steps if r["type"] == "step"]
        assert float(row["final_val_loss"]) == evals[-1]["loss"]
        assert float(row["final_val_ppl"]) == evals[-1]["perplexity"]
        assert int(row["tokens"]) == steps[-1]["tokens"] == TOTAL * 4 * 32
        assert int(row["merges"]) == sum(e["event"] == "merge" for e in events)
        meta = json.loads((run_dir / "checkpoints" / f"step-{TOTAL}" / "meta.json").read_text())
        assert int(row["trainable"]) == meta["params"]["trainable"] and int(row["total"]) == meta["params"]["total"]
        expected_rate = steps[-1]["tokens"] / sum(r["step_time"] for r in steps)
        assert math.isclose(float(row["tokens_per_s"]), expected_rate, rel_tol=1e-9)
        assert row["peak_mem_mb"] == ""  # not recorded by the trainer: blank, never made up
    assert runs["relora"]["merges"] == "2" and runs["full_seed0"]["merges"] == "0"
    assert int(runs["relora"]["trainable"]) < int(runs["relora"]["total"])

    groups = list(csv.DictReader((folder / "compare.csv").open()))
    full = next(g for g in groups if g["method"] == "full")
    seeds = [float(runs[n]["final_val_loss"]) for n in ("full_seed0", "full_seed1")]
    assert full["runs"] == "2" and full["seeds"] == "0 1"
    assert math.isclose(float(full["final_val_loss"]), statistics.fmean(seeds), rel_tol=1e-12)
    assert math.isclose(float(full["final_val_loss_std"]), statistics.stdev(seeds), rel_tol=1e-12)
    assert seeds[0] != seeds[1]  # the seed changes init and data order
    table = (folder / "compare.md").read_text()
    assert f"{statistics.fmean(seeds):.4g} ± {statistics.stdev(seeds):.2g}" in table and "| relora | tiny | 1 |" in table
    for name, size in (("val_loss.png", (720, 450)), ("lr_schedule.png", (720, 405)), ("scaling.png", (585, 450))):
        with Image.open(folder / name) as img:
            img.load()
            assert img.format == "PNG" and img.size == size, (name, img.size)


def test_compare_works_on_an_unfinished_run(swept):
    rc, out, err = swept["compare_partial"]
    assert rc == 0, err
    rows = {r["name"]: r for r in csv.DictReader((swept["folder"] / "compare_partial" / "runs.csv").open())}
    assert rows["relora"]["status"] == "partial" and rows["relora"]["step"] == "8"
    assert rows["full_seed0"]["status"] == "pending" and rows["full_seed0"]["final_val_loss"] == ""
    # the partial run's eval at step 8 is its latest: the same number its metrics.jsonl held then
    losses, events = read_metrics(swept["out"] / "relora")
    at8 = [e["loss"] for e in events if e["event"] == "eval" and e["step"] == 8]
    assert float(rows["relora"]["final_val_loss"]) == at8[0] and rows["relora"]["eval_step"] == "8"


def test_changed_sweep_does_not_overwrite_started_runs(swept):
    rc, _, err = _cli("sweep", swept["sweep"], "--set", "optim.lr=0.1", "--dry-run")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "was started with another config (optim.lr: 0.005 -> 0.1)" in lines[0]


def test_a_config_field_added_since_a_run_started_is_not_a_change(swept):
    """A run folder written before ds_relora grew a field (here: it lacks one) still matches."""
    import yaml

    resolved = swept["out"] / "relora" / "config.yaml"
    text = resolved.read_text()
    try:
        old = yaml.safe_load(text)
        old["relora"].pop("fuse_shared_inputs")
        resolved.write_text(yaml.safe_dump(old))
        rc, _, err = _cli("sweep", swept["sweep"], "--dry-run")
        assert rc == 0, err
    finally:
        resolved.write_text(text)


def test_slurm_array_runs_one_point_per_index(swept, tmp_path):
    rc, out, err = _cli("sweep", swept["sweep"], "--slurm")
    assert rc == 0, err
    script = (swept["out"] / "sweep.sbatch").read_text()
    commands = (swept["out"] / "commands.txt").read_text().splitlines()
    points = [p["run_dir"] for p in json.loads((swept["out"] / "points.json").read_text())]
    assert "#SBATCH --array=0-2\n" in script and "#SBATCH --nodes=1\n" in script
    assert commands == [f"ds-relora sweep --run-point {p}" for p in points]
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ds-relora").write_text('#!/usr/bin/env bash\necho "ds-relora $*"\n')
    (fake / "ds-relora").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    for index, command in enumerate(commands):
        proc = subprocess.run(["bash", str(swept["out"] / "sweep.sbatch")], env={**env, "SLURM_ARRAY_TASK_ID": str(index)},
                              capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stdout.strip() == command, proc.stderr
    proc = subprocess.run(["bash", str(swept["out"] / "sweep.sbatch")], env={**env, "SLURM_ARRAY_TASK_ID": "3"},
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no sweep point for array index 3" in proc.stderr


def test_tokens_per_param_and_derived_fractions(prepared_data, tmp_path):
    from ds_relora.config import RunConfig, from_dict
    from ds_relora.data import read_data_meta
    from ds_relora.models import PRESETS, build_model, describe_params, llama_config, param_counts
    from ds_relora.study.budgets import full_rank_params, steps_for_tokens
    from ds_relora.study.sweep import expand, load_sweep

    vocab = int(read_data_meta(prepared_data)["vocab_size"])
    cfg = from_dict(RunConfig, tiny_run_config(prepared_data, tmp_path))
    n = full_rank_params(cfg)
    assert n == param_counts(PRESETS["tiny"], vocab)["total"]
    assert n == describe_params(build_model(llama_config(PRESETS["tiny"], vocab, 32), 0))["total"]
    assert steps_for_tokens(20 * 1_000_000, 256, 1024) == 76  # 20M tokens / 262144 per step
    assert steps_for_tokens(20 * 1_000_000, 256, 1024, multiple=10) == 70

    sweep = _sweep_file(tmp_path, prepared_data, budget={"tokens_per_param": 1.0, "step_multiple": 5},
                        grid={"train.global_batch_size": [8]}, derive={"cycles": 4, "warm_start_fraction": 0.2})
    sweep_data = yaml.safe_load(sweep.read_text())
    sweep_data["methods"]["control"] = {"set": {"train.method": "control"}}
    sweep.write_text(yaml.safe_dump(sweep_data))
    spec, path = load_sweep(sweep)
    points = {p.name: p for p in expand(spec, path, tmp_path / "out")}
    steps = int(1.0 * n // (8 * 32))
    steps -= steps % 5
    assert points["full_seed0"].total_steps == points["control"].total_steps == steps  # N of the full model
    relora = points["relora"].cfg
    warm = round(0.2 * steps)
    assert relora.relora.warm_start_steps == warm and relora.relora.reset_every == (steps - warm) // 4
    assert relora.train.total_steps == warm + 4 * relora.relora.reset_every  # ends on a merge
    assert points["full_seed0"].cfg.relora.reset_every == 8  # untouched for a full-rank run


def test_bad_point_is_one_line_before_anything_runs(prepared_data, tmp_path):
    sweep = _sweep_file(tmp_path, prepared_data)
    data = yaml.safe_load(sweep.read_text())
    data["methods"]["relora_long"] = {"set": {"train.method": "relora", "derive.cycles": None,
                                              "relora.reset_every": 50}}
    sweep.write_text(yaml.safe_dump(data))
    rc, out, err = _cli("sweep", sweep)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: sweep point relora_long: relora.reset_every=50") and "no merge" in lines[0]
    assert not (tmp_path / "sweep").exists()  # nothing written, nothing run
    rc, _, err = _cli("sweep", sweep, "--set", "budget.tokns=3")
    assert rc == 2 and "did you mean 'budget.tokens'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(__import__("importlib").util.find_spec("lm_eval") is None
                    or __import__("importlib").util.find_spec("accelerate") is None,
                    reason="lm-eval extra not installed (pip install '.[eval]')")
def test_lm_eval_on_a_local_task_shows_in_compare(swept, tmp_path):
    import torch
    from transformers import AutoTokenizer

    from ds_relora.eval.evaluate import load_any_model

    ckpt = swept["out"] / "relora" / "checkpoints" / f"step-{TOTAL}"
    docs = [{"question": "def main", "choices": ["(", "import"], "label": 0},
            {"question": "import", "choices": ["os", "return"], "label": 0},
            {"question": "for i in", "choices": ["range", "class"], "label": 1}]
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy.yaml").write_text(yaml.safe_dump({
        "task": "toy_choice", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tmp_path / "toy.jsonl")}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]}))
    rc, out, err = _cli("eval", ckpt, "--tasks", "toy_choice", "--include-path", tasks)
    assert rc == 0, err
    stored = json.loads((ckpt / "lm_eval.json").read_text())
    acc = stored["scores"]["toy_choice/acc"]

    # The same accuracy by hand: argmax over choices of log p(" " + choice | question).
    model, tok = load_any_model(ckpt), AutoTokenizer.from_pretrained(str(ckpt / "tokenizer"))
    right = 0
    for d in docs:
        context = tok(d["question"])["input_ids"]
        scores = []
        for choice in d["choices"]:
            whole = tok(d["question"] + " " + choice)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        right += int(max(range(len(scores)), key=scores.__getitem__) == d["label"])
    assert acc == right / len(docs)

    rc, _, err = _cli("compare", swept["out"], "--out", tmp_path / "cmp", "--no-plots")
    assert rc == 0, err
    rows = {r["name"]: r for r in csv.DictReader((tmp_path / "cmp" / "runs.csv").open())}
    assert float(rows["relora"]["toy_choice/acc"]) == acc and rows["full_seed0"]["toy_choice/acc"] == ""
    assert "toy_choice/acc" in (tmp_path / "cmp" / "compare.md").read_text()


def test_power_law_fit_and_defensive_records(tmp_path):
    from ds_relora.study.compare import read_records
    from ds_relora.study.plots import fit_power_law

    rows = [{"method": "full", "variant": "", "total_params": n, "final_val_loss": 3.0 * n ** -0.1}
            for n in (1e6, 4e6, 1.6e7)]
    rows.append({"method": "relora", "variant": "", "total_params": 1e6, "final_val_loss": 4.0})  # one size: no fit
    fits = fit_power_law(rows)
    assert set(fits) == {"full"} and fits["full"]["points"] == 3
    assert math.isclose(fits["full"]["exponent"], -0.1, rel_tol=1e-9)
    assert math.isclose(fits["full"]["coefficient"], 3.0, rel_tol=1e-9)
    # An unfinished size (its last eval is from early in its budget) stays out of the fit.
    rows.append({"method": "full", "variant": "", "total_params": 6.4e7, "final_val_loss": 9.0, "finished": False})
    assert fit_power_law(rows)["full"]["points"] == 3
    assert math.isclose(fit_power_law(rows)["full"]["exponent"], -0.1, rel_tol=1e-9)

    # A run killed after step 3 (checkpoint at 2) and resumed: steps 3 and the eval at 3 appear
    # twice, the file ends in a cut line; the later records win, unknown keys are ignored.
    lines = [{"type": "step", "step": 1, "loss": 5.0}, {"type": "step", "step": 2, "loss": 4.0},
             {"type": "step", "step": 3, "loss": 9.9}, {"type": "event", "event": "eval", "step": 3, "loss": 9.9},
             {"type": "step", "step": 3, "loss": 3.0, "new_field": 1},
             {"type": "event", "event": "eval", "step": 3, "loss": 3.5}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"type": "step", "st')
    steps, events = read_records(path)
    assert sorted(steps) == [1, 2, 3] and steps[3]["loss"] == 3.0 and events["eval"][3]["loss"] == 3.5


def test_a_point_trained_by_another_process_is_skipped(tmp_path):
    # Two `ds-relora sweep` processes on one sweep share its points: a claimed point is left alone.
    from ds_relora.study.runner import _claim, run_point

    run_dir = tmp_path / "point"
    run_dir.mkdir()
    held = _claim(run_dir)
    assert held is not None
    lines = []
    assert run_point(run_dir, log=lines.append) == 0
    assert lines == ["point: running in another process, skipped"]
    assert not (run_dir / "train.log").exists()
    held.close()
    assert _claim(run_dir) is not None  # free again once the holder is gone


BENCHMARK_SWEEPS = sorted((REPO / "benchmarks").glob("*/*.yaml"))


@pytest.mark.parametrize("sweep", BENCHMARK_SWEEPS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_benchmark_sweep_file_validates(sweep, prepared_data, tmp_path):
    """Every sweep file the benchmarks ship (the quality tables' commands) expands into points that
    pass every pre-launch check (methods, their sections, derived schedules), on the test data."""
    rc, out, err = _cli("sweep", sweep, "--dry-run", "--out", tmp_path / "sweep", "--set", f"data.path={prepared_data}")
    assert rc == 0, err
    assert "point(s) validated" in out
