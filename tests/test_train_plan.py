"""Every bad input is one line before any work is spent; installs work outside a checkout;
the console of a run holds what a user acts on (issue 9, inputs and installs).

Run alone: ``pytest tests/test_train_plan.py``. The wheel test builds the package,
installs it into a folder with ``pip --target`` (no dependency downloads: torch & co. come from
this interpreter) and runs the quick start from an empty folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pytest

from ds_relora.launch.hosts import free_port
from harness import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


def _cli(*args) -> tuple[int, str, str]:
    """``ds-relora`` in-process: (exit code, stdout, stderr)."""
    from ds_relora.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's --version / usage errors
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def _one_line_error(rc: int, err: str, needle: str) -> str:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], lines[0]
    return lines[0]


def _write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


DOCS = [f"document number {i}: " + "the quick brown fox jumps over the lazy dog " * (3 + i % 5) for i in range(40)]


@pytest.fixture()
def base(prepared_data, tmp_path):
    return ["--config", "quickstart", "--set", f"data.path={prepared_data}", "data.seq_len=32",
            f"train.run_dir={tmp_path / 'run'}"]


# ---------------------------------------------------------------- config and adapter phase, before launch

@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    from transformers import GPT2Config

    folder = tmp_path_factory.mktemp("gpt2")
    GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=600, n_positions=128,
               bos_token_id=0, eos_token_id=0).save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("overrides,needle", [
    (["relora.rank=0"], "relora.rank=0 must be at least 1"),
    (["relora.target_modules=[q_proj(]"], "relora.target_modules entry 'q_proj(' is not a valid regex"),
    (["relora.target_modules=[nothing_is_named_so]"], "no module matches relora.target_modules"),
    (["relora.lr=-0.001"], "relora.lr=-0.001 must be positive"),
    (["relora.reset_every=0"], "relora.reset_every=0 must be at least 1"),
    (["data.seq_len=0"], "data.seq_len=0 must be at least 1"),
    (["data.seq_len=-5"], "data.seq_len=-5 must be at least 1"),
    (["optim.lr=-1e-3"], "optim.lr=-0.001 must be positive"),
    (["optim.betas=[0.9]"], "optim.betas"),
    (["train.eval_batches=0"], "train.eval_batches=0 must be at least 1"),
    (["prepare.val_fraction=1"], "prepare.val_fraction=1.0 must be in [0, 1)"),
    (["model.name_or_path=/nonexistent/model", "model.preset=null"], "is not an existing folder"),
    (["model.name_or_path=no-such-org/no-such-model", "model.preset=null"], "cannot be loaded"),
    (["deepspeed.overrides={zero_optimization: {stage: 3, zero_hpz_partition_size: 2}}"], "zero_hpz_partition_size=2"),
    (["deepspeed.overrides={zero_optimization: {stage: 3, zero_quantized_weights: true}}"], "zero_quantized_weights=True"),
    (["deepspeed.overrides={zero_optimization: {stage: 3, zero_quantized_nontrainable_weights: true}}"],
     "zero_quantized_nontrainable_weights"),
    (["relora.zero3_frozen_base=replicate"], "needs ZeRO-3"),
    (["relora.zero3_frozen_base=replicate", "deepspeed.config=zero3_offload"], "with offload_param is not supported"),
])
def test_bad_config_is_one_line_before_launch(base, overrides, needle):
    # --dry-run stops right before the launch: the check cannot have been spent in a worker.
    _one_line_error(*_cli("train", *base, *overrides, "--dry-run")[::2], needle)


def test_gpt2_is_refused_before_launch_naming_the_fix(base, gpt2_folder):
    rc, _, err = _cli("train", *base, f"model.name_or_path={gpt2_folder}", "model.preset=null", "--dry-run")
    line = _one_line_error(rc, err, "Conv1D")
    assert "LLaMA-style" in line


def test_adapter_phase_is_wrapped_on_meta_device_without_memory(prepared_data):
    """The check builds the real model on the meta device and runs the real wrap_model."""
    import torch

    from ds_relora.config import load_config
    from ds_relora.data import read_data_meta
    from ds_relora.train import plan as plan_mod

    cfg = load_config(None, [f"data.path={prepared_data}", "data.seq_len=32", "model.preset=1.3b", "relora.rank=128"])
    meta = read_data_meta(cfg.data.path)
    hf = plan_mod.build_hf_config(cfg, meta)
    model = plan_mod._meta_model(hf)
    assert all(p.device == torch.device("meta") for p in model.parameters())
    assert plan_mod.check_adapter_phase(cfg, hf) == 24 * 7  # every q/k/v/o/gate/up/down of the 1.3B model


def test_lora_keeps_hpz(prepared_data):
    """Only merges write W, so LoRA may keep a ZeRO++ secondary copy; ReLoRA may not."""
    from ds_relora.config import load_config
    from ds_relora.errors import ConfigError
    from ds_relora.zero.ds_config import build_ds_config

    sets = [f"data.path={prepared_data}", "deepspeed.config=zero3",
            "deepspeed.overrides={zero_optimization: {zero_hpz_partition_size: 2}}"]
    from ds_relora.methods import get_method

    def build(method):
        return build_ds_config(load_config(None, sets + [f"train.method={method}"]), 2,
                               writes_base=get_method(method).writes_base)

    assert build("lora")["zero_optimization"]["zero_hpz_partition_size"] == 2
    with pytest.raises(ConfigError, match="hpZ"):
        build("relora")


# ---------------------------------------------------------------- data

def test_jsonl_with_one_broken_line_names_file_and_line(tmp_path):
    src = tmp_path / "corpus.jsonl"
    good = [json.dumps({"text": d}) for d in DOCS[:5]]
    src.write_text("\n".join(good[:3] + ['{"text": "unterminated'] + good[3:]) + "\n")
    rc, _, err = _cli("prepare-data", "--set", f"prepare.source={src}", "prepare.vocab_size=300", "--out", tmp_path / "out")
    _one_line_error(rc, err, f"{src} line 4 is not valid JSON")
    assert not (tmp_path / "out").exists()


def test_empty_jsonl_says_empty(tmp_path):
    src = tmp_path / "empty.jsonl"
    src.write_text("")
    rc, _, err = _cli("prepare-data", "--set", f"prepare.source={src}", "--out", tmp_path / "out")
    line = _one_line_error(rc, err, f"{src} is empty")
    assert "StopIteration" not in line


def test_prepare_data_refuses_to_overwrite_prepared_data(tmp_path):
    src = _write_jsonl(tmp_path / "a.jsonl", DOCS)
    out = tmp_path / "data"
    args = ["prepare-data", "--set", f"prepare.source={src}", "prepare.vocab_size=300", "--out", out]
    assert _cli(*args)[0] == 0
    before = (out / "meta.json").read_bytes()
    _one_line_error(*_cli(*args)[::2], "--overwrite")
    assert (out / "meta.json").read_bytes() == before
    _write_jsonl(src, DOCS[:20])
    assert _cli(*args, "--overwrite")[0] == 0
    assert json.loads((out / "meta.json").read_text())["num_documents"] != json.loads(before)["num_documents"]


# ---------------------------------------------------------------- resume and eval checks, before launch

@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A real 1-rank ReLoRA run (warm start 2, merge every 2, 6 steps) with its final checkpoint."""
    from ds_relora.config import PrepareConfig
    from ds_relora.data import prepare_data

    root = tmp_path_factory.mktemp("real_run")
    data = prepare_data(PrepareConfig(source=str(_write_jsonl(root / "c.jsonl", DOCS)), vocab_size=300, val_fraction=0.2),
                        root / "data", log=lambda _m: None)
    run = root / "run"
    sets = [f"data.path={data}", "data.seq_len=32", f"train.run_dir={run}", "train.total_steps=6", "train.micro_batch_size=2",
            "relora.rank=4", "relora.warm_start_steps=2", "relora.reset_every=2", "relora.restart_warmup_steps=1",
            "optim.warmup_steps=1", "train.eval_every=0", "train.eval_batches=1", "train.save_every=0",
            "launch.launcher=none", "launch.num_gpus=1", f"launch.master_port={free_port()}"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "ds_relora.cli", "train", "--config", "quickstart", "--set", *sets],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ckpt = run / "checkpoints" / "step-6"
    assert (ckpt / "meta.json").is_file()
    return {"data": data, "run": run, "ckpt": ckpt, "sets": sets}


def _resume(real_run, *overrides):
    sets = [s for s in real_run["sets"] if not s.startswith("launch.")]
    return _cli("train", "--config", "quickstart", "--set", *sets, *overrides, "--resume", "auto", "--dry-run")


def test_resume_of_the_same_run_is_accepted(real_run):
    rc, out, err = _resume(real_run, "launch.launcher=none", "launch.num_gpus=1")
    assert rc == 0, err


def test_resume_with_other_number_of_ranks_is_accepted(real_run):
    # Elastic: the checkpoint holds the whole fp32 masters and moments (tests/test_checkpoint_elastic.py).
    # It keeps the global batch (2), split over 2 ranks: plan_run checks the batch layout before
    # launch now (the workers refused another global batch before).
    rc, _, err = _resume(real_run, "launch.launcher=local", "launch.num_gpus=2", "train.micro_batch_size=1")
    assert rc == 0, err


def test_resume_without_optimizer_state_on_other_ranks_is_refused_before_launch(real_run, tmp_path):
    # A checkpoint from before elastic checkpoints (no optimizer_step / optimizer_fp32.safetensors).
    old = tmp_path / "step-6"
    shutil.copytree(real_run["ckpt"], old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["optimizer_step"]
    (old / "meta.json").write_text(json.dumps(meta))
    sets = [s for s in real_run["sets"] if not s.startswith("launch.")]
    rc, _, err = _cli("train", "--config", "quickstart", "--set", *sets, "launch.launcher=local", "launch.num_gpus=2",
                      "--resume", str(old), "--dry-run")
    line = _one_line_error(rc, err, "written by 1 rank on ZeRO-")
    assert "resume it with 1 rank and" in line and "warm_start_from" not in line


@pytest.mark.parametrize("overrides,needle", [
    (["model.preset=9m"], "hidden_size=64"),
    (["relora.rank=8"], "relora.rank=4"),
    (["train.method=lora"], "train.method=relora checkpoint"),
])
def test_resume_with_another_model_is_refused_before_launch(real_run, overrides, needle):
    _one_line_error(*_resume(real_run, "launch.launcher=none", "launch.num_gpus=1", *overrides)[::2], needle)


def test_resume_with_another_vocabulary_is_refused_before_launch(real_run, prepared_data):
    # The session corpus has a 512-token vocabulary; the checkpoint was trained on 300.
    _one_line_error(*_resume(real_run, "launch.launcher=none", "launch.num_gpus=1", f"data.path={prepared_data}")[::2],
                    "vocab_size=300")


def test_warm_start_from_another_model_is_refused_before_launch(real_run, tmp_path):
    full = [m.parent for m in sorted(real_run["run"].glob("checkpoints/step-*/meta.json"))
            if json.loads(m.read_text()).get("phase") == "full"]
    if not full:
        pytest.skip("the run kept no full-rank checkpoint (the switch did not save one)")
    sets = [s for s in real_run["sets"] if not s.startswith(("launch.", "train.run_dir", "relora.warm_start_steps"))]
    rc, _, err = _cli("train", "--config", "quickstart", "--set", *sets, f"train.run_dir={tmp_path / 'new'}",
                      "launch.launcher=none", "launch.num_gpus=1", "relora.warm_start_steps=0", f"relora.warm_start_from={full[0]}",
                      "model.preset=9m",
                      "--dry-run")
    _one_line_error(rc, err, "holds a model with hidden_size=64")


def test_eval_of_a_folder_that_is_not_a_checkpoint(real_run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _one_line_error(*_cli("eval", empty)[::2], "neither a ds_relora checkpoint")
    assert "--data" not in line
    _one_line_error(*_cli("eval", real_run["run"])[::2], "holds step-N folders")
    _one_line_error(*_cli("eval", tmp_path / "missing")[::2], "does not exist")


# ---------------------------------------------------------------- package: DeepSpeed JSONs, version, license

def test_ds_configs_have_one_source_of_truth():
    from ds_relora.zero.ds_config import SHIPPED

    top = REPO / "ds_configs"
    assert SHIPPED == REPO / "ds_relora" / "ds_configs"
    assert top.is_symlink() and top.resolve() == SHIPPED.resolve(), "top-level ds_configs/ must link to the package copy"
    assert {p.name for p in SHIPPED.glob("*.json")} >= {"zero0.json", "zero1.json", "zero2.json", "zero3.json"}


def test_ds_config_by_bare_name_from_any_folder(tmp_path, monkeypatch):
    from ds_relora.errors import ConfigError
    from ds_relora.zero.ds_config import SHIPPED, resolve_json_path

    monkeypatch.chdir(tmp_path)
    for name in ("zero3", "zero3.json", "ds_configs/zero3.json"):
        assert resolve_json_path(name) == SHIPPED / "zero3.json"
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "zero3.json").write_text("{}")
    assert resolve_json_path("ds_configs/zero3.json") == Path("ds_configs/zero3.json")  # the user's own copy wins
    with pytest.raises(ConfigError, match="zero0, zero1"):
        resolve_json_path("zero9")


def test_version_is_one_string_everywhere():
    import ds_relora

    rc, out, _ = _cli("--version")
    assert rc == 0 and out.strip() == f"ds-relora {ds_relora.__version__}"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ds_relora.__version__"}


def test_license_is_an_spdx_string():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    # PEP 639 string licenses need setuptools >= 77; older ones reject the string form.
    assert "setuptools>=77" in project["build-system"]["requires"]


# ---------------------------------------------------------------- what a user reads

def test_local_launcher_is_quiet_unless_asked(tmp_path):
    from ds_relora.config import LaunchConfig
    from ds_relora.launch.launchers import build_launch

    env = {"PATH": os.environ["PATH"]}
    port = free_port()
    cmd = build_launch(LaunchConfig(num_gpus=2, master_port=port), ["--config", "x"], env, strict=False).commands[0]
    assert cmd[cmd.index("--log_level") + 1] == "error" and cmd.index("--log_level") < cmd.index("--module")
    cmd = build_launch(LaunchConfig(num_gpus=2, master_port=port, extra_args=["--log_level=info"]), ["--config", "x"], env,
                       strict=False).commands[0]
    assert "--log_level" not in cmd and "--log_level=info" in cmd
    cmd = build_launch(LaunchConfig(num_gpus=2, master_port=port), ["--config", "x"], {**env, "DS_RELORA_VERBOSE": "1"},
                       strict=False).commands[0]
    assert "--log_level" not in cmd


def test_quiet_worker_drops_only_library_noise():
    from deepspeed.utils import logger as ds_logger

    from ds_relora.quiet import quiet_worker

    level = ds_logger.level
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert quiet_worker(verbose=False)
            warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
            warnings.warn("something the user should see", FutureWarning)
            warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated", UserWarning)
        assert [str(w.message) for w in seen] == ["something the user should see",
                                                   "`torch.distributed.all_gather_into_tensor` is deprecated"]
        assert ds_logger.level >= 30
        assert quiet_worker(verbose=True) is False
    finally:
        ds_logger.setLevel(level)


# ---------------------------------------------------------------- a wheel install, run from an empty folder

def _wheel_buildable() -> str | None:
    try:
        import setuptools
        from packaging.version import Version
    except ImportError:
        return "setuptools/packaging are not installed"
    if Version(setuptools.__version__) < Version("77"):
        return f"setuptools {setuptools.__version__} < 77 cannot build PEP 639 license strings without build isolation"
    return None


@pytest.mark.skipif(_wheel_buildable() is not None, reason=str(_wheel_buildable()))
def test_wheel_install_runs_quickstart_eval_export_from_empty_folder(tmp_path):
    # Build from a copy holding only what the sdist holds, so nothing of the checkout leaks in.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "ds_relora", src / "ds_relora", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    # -v shows the backend's own output: the old `license = {text = ...}` table printed screens of
    # SetuptoolsDeprecationWarning there.
    build = subprocess.run([*pip, "wheel", "-v", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"), str(src)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "deprecat" not in (build.stdout + build.stderr).lower(), build.stdout + build.stderr
    (wheel,) = (tmp_path / "dist").glob("ds_relora-*.whl")
    sdist = subprocess.run([sys.executable, "-c", "from setuptools import build_meta as b; print(b.build_sdist('../sdist'))"],
                           cwd=src, capture_output=True, text=True, timeout=300)
    assert sdist.returncode == 0, sdist.stderr[-3000:]
    with tarfile.open(tmp_path / "sdist" / sdist.stdout.split()[-1]) as tar:
        names = tar.getnames()
    assert any(n.endswith("ds_relora/ds_configs/zero2.json") for n in names), names
    site = tmp_path / "site"
    inst = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stdout[-3000:] + inst.stderr[-3000:]
    assert (site / "ds_relora" / "ds_configs" / "zero2.json").is_file()
    assert (site / "ds_relora" / "recipes" / "quickstart.yaml").is_file()

    work = tmp_path / "empty"
    work.mkdir()
    # Only the installed copy is importable: no checkout on PYTHONPATH, the editable install shadowed.
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PATH": f"{site / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def ds_relora(*args):
        proc = subprocess.run([str(site / "bin" / "ds-relora"), *map(str, args)], cwd=work, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"ds-relora {args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    where = subprocess.run([sys.executable, "-c", "import ds_relora; print(ds_relora.__file__, ds_relora.__version__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert Path(where[0]).is_relative_to(site)
    assert ds_relora("--version").strip() == f"ds-relora {where[1]}"
    short = ["--set", "prepare.max_documents=30", "train.total_steps=8", "relora.warm_start_steps=2", "relora.reset_every=3",
             "relora.restart_warmup_steps=1", "optim.warmup_steps=1", "train.eval_batches=2", "train.eval_every=0", "train.save_every=0",
             "train.micro_batch_size=4", "launch.launcher=none", "launch.num_gpus=1", f"launch.master_port={free_port()}"]
    ds_relora("prepare-data", "--config", "quickstart", *short)
    ds_relora("train", "--config", "quickstart", *short)
    ckpt = work / "runs" / "quickstart" / "checkpoints" / "step-8"
    assert (ckpt / "meta.json").is_file()
    result = json.loads([ln for ln in ds_relora("eval", ckpt, "--max-batches", "2").splitlines() if ln.startswith("{")][-1])
    assert result["sequences"] > 0 and result["loss"] > 0
    ds_relora("export", ckpt, "--out", "exports/quickstart")
    assert (work / "exports" / "quickstart" / "config.json").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["data", "exports", "runs"]
