"""The GPU check (``python -m ds_relora.gpu``) without a GPU: its FLOP count, budget,
results file and attention probe, and its ``--smoke`` rehearsal run from an installed wheel in an
empty folder, as ``scripts/gpu_check.sh`` runs it on the GPU machine."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

from harness import REPO


def test_largest_micro_batch_extrapolates_linearly():
    from ds_relora.gpu.bench import largest_micro_batch

    gib = 2**30
    # 10 GiB fixed + 1 GiB per sequence, 100 GiB card, 85% of it usable: 75 sequences.
    assert largest_micro_batch(8, 18 * gib, 16, 26 * gib, 100 * gib) == 75
    assert largest_micro_batch(8, 95 * gib, 16, 99 * gib, 100 * gib) == 8, "never below the measured size"


def test_causal_attention_counts_the_unmasked_half():
    from benchmarks import analytic
    from ds_relora.estimate.flops import flops_per_token
    from ds_relora.models import preset_shape

    shape, s = preset_shape("350m"), 1024
    parts = flops_per_token(shape, 32000, s, "full")
    full_square = 12 * shape.layers * shape.hidden * s
    # Position i attends to i + 1 keys: (s + 1) / 2 on average, not s.
    assert parts["attention"] == full_square * (s + 1) / (2 * s)
    assert parts["total"] == parts["linears"] + parts["adapters"] + parts["head"] + parts["attention"]
    assert analytic.flops_per_token is flops_per_token, "the benchmarks use the package's counts"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_parts_fit_the_budget_and_the_results_file_follows_every_part(tmp_path):
    from ds_relora.gpu.check import Budget, Parts

    clock = Clock()
    res = {"parts": [], "notes": [], "runs": []}
    parts = Parts(res, Budget(100, clock), tmp_path)
    on_disk = lambda: json.loads((tmp_path / "gpu_check.json").read_text())  # noqa: E731

    def slow():  # 3x its estimate; sees itself as running in the file
        assert on_disk()["parts"][-1]["status"] == "running"
        clock.now += 30
        return {"ok": True}

    def broken():
        raise RuntimeError("boom")

    parts.run("a", "run", 10, slow, res["runs"], None, required=True)
    assert on_disk()["parts"][0]["status"] == "ok", "written after the part"
    parts.run("b", "run", 10, broken, res["runs"], lambda err: {"ok": False, "problems": [err]}, required=True)
    # 70 s left, but "run" parts take 3x their estimate: 30 s planned becomes 90 s.
    parts.run("c", "run", 30, slow, res["runs"], None, required=True)
    parts.run("d", "throughput", 20, slow, res["runs"], None, required=False)
    written = on_disk()
    assert [(p["name"], p["status"]) for p in written["parts"]] == [
        ("a", "ok"), ("b", "failed"), ("c", "skipped"), ("d", "ok")]
    assert written["runs"][1] == {"ok": False, "problems": ["RuntimeError: boom"]}
    assert written["parts"][2]["estimate_s"] == 90 and "c skipped" in written["notes"][0]
    assert not parts.ok()
    res["parts"] = [p for p in res["parts"] if p["name"] != "b"]
    assert not parts.ok(), "a required part that did not fit fails the check"
    res["parts"] = [p for p in res["parts"] if p["name"] != "c"]
    assert parts.ok()


def test_budget_must_be_positive(capsys):
    from ds_relora.gpu.check import main

    with pytest.raises(SystemExit) as exc:
        main(["--smoke", "--budget-s", "0"])
    assert exc.value.code == 2 and "error: --budget-s must be positive" in capsys.readouterr().err


def test_attention_probe_names_the_kernel_that_ran():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ds_relora.gpu.bench import attention_ran
    from ds_relora.models import build_model, llama_config, preset_shape

    x = torch.randint(0, 64, (2, 16))
    model = build_model(llama_config(preset_shape("tiny"), 64, 16, attn_implementation="sdpa"), seed=0)
    with sdpa_kernel([SDPBackend.MATH]):
        assert attention_ran(model, x) == "sdpa: math (cpu)"
    assert attention_ran(model, x) in ("sdpa: flash (cpu)", "sdpa: math (cpu)")
    assert torch.nn.functional.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"
    eager = build_model(llama_config(preset_shape("tiny"), 64, 16, attn_implementation="eager"), seed=0)
    assert attention_ran(eager, x) == "eager (no SDPA call)"


def _install_wheel(tmp_path):
    """ds_relora's wheel, built from a copy of the package (an in-tree build would write build/
    into the checkout), installed with --no-deps into a target folder."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "ds_relora", src / "ds_relora", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", str(src), "-w",
                          str(tmp_path / "wheels")], check=True, timeout=120)
    (wheel,) = (tmp_path / "wheels").glob("ds_relora-*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(tmp_path / "site"), str(wheel)],
                   check=True, timeout=120)
    return tmp_path / "site"


@pytest.mark.distributed
def test_gpu_check_rehearsal_runs_every_part_from_an_installed_wheel(tmp_path):
    site = _install_wheel(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    # -S: no .pth files, so no editable install of the checkout; torch & co. from site-packages.
    env = dict(os.environ, OUT=str(tmp_path / "out"),
               PYTHONPATH=os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]]))
    proc = subprocess.run([sys.executable, "-S", "-m", "ds_relora.gpu", "--smoke", "--work", str(tmp_path / "work")],
                          cwd=empty, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ds_relora GPU check" in proc.stdout and "result: PASS" in proc.stdout
    res = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert res["ds_relora"].endswith(f"({site / 'ds_relora'})"), "the wheel, not the checkout, ran"
    runs = [f"{m} {s}" for m in ("relora", "remora", "galore") for s in ("zero0", "zero3_offload")]
    assert [(p["name"], p["status"]) for p in res["parts"]] == [
        (name, "ok") for name in ["prepare data", *runs, "throughput tiny"]]
    assert res["finished"] and res["ok"] and res["wall_s"] > 0
    # Merges (projector updates) before the stop at step 3 and again after the resume.
    expected = {"relora": [2, 4], "remora": [2, 4], "galore": [0, 2, 4]}
    for r in res["relora_runs"]:
        assert r["ok"] and r["merges"] == expected[r["method"]] and r["eval_loss"] is not None, r
    (pair,) = res["throughput"]
    kinds = [(r["method"], r["kind"]) for r in pair["rows"]]
    assert kinds == [(m, k) for m in ("full", "relora") for k in ("equal micro-batch", "largest micro-batch")]
    for r in pair["rows"]:
        assert r["tokens_per_s"] > 0 and r["flops_per_token"] > 0 and r["mfu"] > 0 and r["peak_mem_gib"] > 0
    # The simulated card: extrapolation says 7 sequences, 7 runs out of memory, 5 (80%) fits.
    largest = [r for r in pair["rows"] if r["kind"] == "largest micro-batch"]
    assert all(r["micro_batch"] == 5 and r["oom_retries"] == 1 for r in largest)
    assert set(pair["relora_over_full"]) == {"equal micro-batch", "largest micro-batch"}
    assert res["attention"] == pair["attn"] and res["attention"].startswith("sdpa: ")
    assert res["attention"].endswith("(cpu)") and res["attention_configured"] == "sdpa"


@pytest.mark.distributed
def test_compiled_throughput_compiles_one_graph_for_every_micro_batch(prepared_data, tmp_path):
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-m", "ds_relora.gpu", "--smoke", "--stages", "zero0",
                           "--methods", "relora", "--compile", "aot_eager", "--data", str(prepared_data),
                           "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ZeRO-2, compiled aot_eager" in proc.stdout
    res = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    (pair,) = res["throughput"]
    for r in pair["rows"]:
        # The first size compiles; 4, 7 (out of memory) and 5 reuse that graph.
        assert r["new_graphs"] == (1 if r["kind"] == "equal micro-batch" else 0), r
