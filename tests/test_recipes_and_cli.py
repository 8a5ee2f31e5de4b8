"""The README quick start, every shipped recipe, and the CLI's one-line errors."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness import REPO
from harness.checks import read_metrics
from harness.configs import deep_update, write_config
from harness.ranks import run_workers

RECIPES = sorted((REPO / "ds_relora" / "recipes").glob("*.yaml"))


def _cli(*args):
    """Run ``ds-relora`` in-process; returns (exit code, stderr)."""
    import contextlib
    import io

    from ds_relora.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, err.getvalue()


@pytest.mark.distributed
def test_readme_quickstart_shortened(tmp_path):
    readme = (REPO / "README.md").read_text()
    assert "bash scripts/quickstart.sh" in readme and "bash scripts/test.sh" in readme
    shorten = ["--set", "prepare.max_documents=80", "train.total_steps=50", "relora.warm_start_steps=10",
               "relora.reset_every=15", "relora.restart_warmup_steps=3", "optim.warmup_steps=5",
               "train.eval_every=25", "train.save_every=0", f"launch.master_port={29600 + os.getpid() % 300}"]
    env = {**os.environ, "DS_RELORA_SKIP_SETUP": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "quickstart.sh"), *shorten], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses, events = read_metrics(tmp_path / "runs" / "quickstart")
    assert len(losses) == 50
    assert [e["lr_index"] for e in events if e["event"] == "merge"] == [25, 40]
    assert [e["step"] for e in events if e["event"] == "switch"] == [10]
    evals = [e["loss"] for e in events if e["event"] == "eval"]
    assert len(evals) == 2 and evals[-1] < evals[0]
    eval_line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    assert math.isfinite(json.loads(eval_line)["perplexity"])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "exports" / "quickstart"))
    assert model.config.num_hidden_layers == 2


def _shortened(recipe: Path, data: Path, run_dir: Path) -> dict:
    cfg = yaml.safe_load(recipe.read_text())
    return deep_update(cfg, {
        "model": {"preset": "tiny"},
        "data": {"path": str(data), "seq_len": 32},
        "relora": {"rank": 8, "warm_start_steps": 6 if cfg.get("relora", {}).get("warm_start_steps") else 0,
                   "reset_every": 6, "restart_warmup_steps": 2},
        "mora": {"rank": None}, "galore": {"rank": None}, "apollo": {"rank": None}, "fira": {"rank": None},  # relora.rank above, for the tiny model
        "optim": {"warmup_steps": 2},
        "train": {"total_steps": 18, "micro_batch_size": 2, "global_batch_size": None, "eval_every": 0,
                  "eval_batches": 1, "save_every": 0, "run_dir": str(run_dir)},
        "launch": {"launcher": "none", "num_gpus": 1, "num_nodes": 1, "hostfile": None},
    })


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_as_shipped_is_consistent(recipe):
    from ds_relora.config import load_config
    from ds_relora.zero.ds_config import build_ds_config
    from ds_relora.train.plan import check_relora

    cfg = load_config(recipe)
    check_relora(cfg)
    build_ds_config(cfg, cfg.launch.num_nodes * cfg.launch.num_gpus)


@pytest.mark.distributed
def test_every_shipped_recipe_trains_shortened(prepared_data, tmp_path):
    from ds_relora.methods import get_method

    assert len(RECIPES) >= 6
    configs = [write_config(tmp_path / f"{r.stem}.yaml", _shortened(r, prepared_data, tmp_path / r.stem))
               for r in RECIPES]
    run_workers(["tests/workers/run_configs.py", *map(str, configs)], 2, timeout=600)
    for recipe in RECIPES:
        losses, events = read_metrics(tmp_path / recipe.stem)
        assert len(losses) == 18, recipe.stem
        method = yaml.safe_load(recipe.read_text())["train"]["method"]
        merges = [e for e in events if e["event"] == "merge"]
        assert bool(merges) == get_method(method).merges, recipe.stem


@pytest.fixture()
def base_args(prepared_data, tmp_path):
    return ["--config", "quickstart", "--set", f"data.path={prepared_data}", "data.seq_len=32",
            f"train.run_dir={tmp_path / 'run'}", "prepare.max_documents=10"]


@pytest.mark.parametrize("overrides,needle", [
    (["data.path=/nonexistent/data"], "prepare-data"),
    (["data.seq_len=4096", "model.max_position_embeddings=64"], "exceeds model.max_position_embeddings=64"),
    (["train.global_batch_size=10"], "not divisible by micro_batch_size x ranks"),
    (["train.total_steps=70", "relora.warm_start_steps=10", "relora.reset_every=50"], "multiple of"),
    (["train.total_steps=40", "relora.warm_start_steps=10", "relora.reset_every=50"], "no merge would happen"),
    (["relora.restart_warmup_steps=60"], "must be shorter than the cycle"),
    (["train.method=relra"], "did you mean 'relora'"),
    (["model.preset=70b"], "unknown model preset '70b'"),
    (["train.totl_steps=5"], "did you mean 'train.total_steps'"),
    (["relora.prune_ratio=1.0"], "outside [0, 1)"),
    (["relora.rank=100"], "set relora.rank to at most 64"),
    (["deepspeed.overrides={train_micro_batch_size_per_gpu: 3}"], "one source of truth"),
    (["launch.num_gpus=2", "launch.launcher=deepspeed", "launch.hostfile=/nonexistent/hostfile"], "hostfile"),
])
def test_train_errors_are_one_line_before_any_worker(base_args, overrides, needle):
    rc, err = _cli("train", *base_args, *overrides, "--dry-run")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], lines[0]


def test_tokenizer_larger_than_model_embedding_is_rejected(base_args, tmp_path):
    from ds_relora.models import PRESETS, llama_config

    small = tmp_path / "small_vocab_model"
    llama_config(PRESETS["tiny"], 100, 64).save_pretrained(str(small))
    rc, err = _cli("train", *base_args, f"model.name_or_path={small}", "model.preset=null", "--dry-run")
    assert rc == 2 and "embedding has 100 rows" in err and len(err.strip().splitlines()) == 1, err


def test_resume_from_folder_without_checkpoint_is_rejected(base_args, tmp_path):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    (empty / "step-10").mkdir()  # an interrupted save: no meta.json, so not a checkpoint
    rc, err = _cli("train", *base_args, "--resume", str(empty), "--dry-run")
    assert rc == 2 and "no complete checkpoint" in err and len(err.strip().splitlines()) == 1, err


def test_dry_run_prints_the_deepspeed_command(base_args):
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc, _ = _cli("train", *base_args, "--dry-run")
    assert rc == 0
    text = out.getvalue()
    assert "deepspeed" in text and "--num_gpus 2" in text and "ds_relora.worker" in text


def test_config_explain_documents_every_field():
    import contextlib
    import dataclasses
    import io

    from ds_relora.config import RunConfig

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert _cli("config", "--explain")[0] == 0
    text = out.getvalue()
    for section in dataclasses.fields(RunConfig):
        for f in dataclasses.fields(section.default_factory()):
            assert f.metadata.get("doc"), f"{section.name}.{f.name} has no help text"
            assert f"  {f.name}: " in text


def test_spectrum_and_estimate_memory_commands(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 12, generator=g)
    low_rank = torch.randn(16, 2, generator=g) @ torch.randn(2, 12, generator=g)
    for name, weight in (("before", w), ("after", w + low_rank)):
        folder = tmp_path / name
        folder.mkdir()
        save_file({"model.layers.0.mlp.up_proj.weight": weight.contiguous()}, str(folder / "model_fp32.safetensors"))
        (folder / "meta.json").write_text(json.dumps({"format_version": 1, "lora_scale": None, "step": 1}))
    plot = tmp_path / "s.png"
    rc, err = _cli("spectrum", str(tmp_path / "before"), str(tmp_path / "after"), "--plot", str(plot))
    out = capsys.readouterr().out
    assert rc == 0, err
    row = [ln for ln in out.splitlines() if ln.startswith("| up_proj")][0]
    # rank-2 update of a 16x12 matrix: 12 singular values, 10 of them ~0
    assert row.split("|")[3].strip() == "12" and row.split("|")[4].strip() == "10"
    assert plot.stat().st_size > 1000
    rc, err = _cli("estimate-memory", "--preset", "1.3b", "--method", "relora", "--zero-stage", "2", "--gpus", "8")
    assert rc == 0, err
    assert "250,706,944 trainable" in capsys.readouterr().out


def test_streaming_sources_prepare_the_run_token_budget_by_default():
    from ds_relora.cli import streaming_token_budget
    from ds_relora.config import load_config

    RECIPES = REPO / "ds_relora" / "recipes"

    cfg = load_config(RECIPES / "c4_relora_1.3b.yaml")
    budget = streaming_token_budget(cfg)
    trained = cfg.train.total_steps * cfg.train.global_batch_size * cfg.data.seq_len  # 21.0 B tokens
    assert trained < budget < trained * 1.03
    assert streaming_token_budget(load_config(RECIPES / "c4_relora_1.3b.yaml", ["prepare.max_tokens=1000"])) is None
    assert streaming_token_budget(load_config(RECIPES / "quickstart.yaml")) is None  # a local corpus is prepared whole
