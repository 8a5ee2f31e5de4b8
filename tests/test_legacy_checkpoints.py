"""Checkpoints written by earlier ds_relora code still resume, evaluate and export.

tests/data/format3 and tests/data/format4 were written by the code of d8603f4^ (the last commit
of checkpoint format 3) and f53d0d1 (format 4, before issue 19 moved the checkpoint code and typed
its meta): a tiny ReLoRA run stopped at step 4, with the prepared data it trained on and the
losses the same code logged when it resumed to step 8 (tests/data/make_legacy_checkpoints.py).
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import yaml

from harness import REPO
from harness.checks import read_metrics

DATA = Path(__file__).parent / "data"
VERSIONS = (3, 4)


def _copy(version: int, tmp_path: Path) -> tuple[Path, Path]:
    """The fixture in ``tmp_path`` (it is resumed in place), its run config pointed at the copy;
    returns (config file, step-4 folder)."""
    root = tmp_path / f"format{version}"
    shutil.copytree(DATA / f"format{version}", root)
    config = root / "run" / "config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["path"] = str(root / "data")
    cfg["model"]["name_or_path"] = str(root / "model")
    cfg["train"].update(run_dir=str(root / "run"), resume="auto", stop_after_steps=None)
    cfg["deepspeed"]["config"] = str(REPO / "ds_configs" / "zero2.json")
    config.write_text(yaml.safe_dump(cfg))
    return config, root / "run" / "checkpoints" / "step-4"


def _train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``ds-relora train`` in a child process (the run starts its own process group)."""
    return subprocess.run([sys.executable, "-m", "ds_relora.cli", "train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


class _RecordingUnpickler(pickle.Unpickler):
    """Records every (module, name) a pickle imports, then imports it as pickle does."""

    seen: set = set()

    def find_class(self, module, name):
        _RecordingUnpickler.seen.add((module, name))
        return super().find_class(module, name)


@pytest.mark.parametrize("version", VERSIONS)
def test_pickles_reference_no_moved_module(version):
    """DeepSpeed's and the RNG's .pt files are pickles: every class they name must still import
    from where they name it (a moved ds_relora module would break every old checkpoint)."""
    import torch

    recorder = types.SimpleNamespace(Unpickler=_RecordingUnpickler, load=pickle.load, __name__="recording_pickle")
    folder = DATA / f"format{version}" / "run" / "checkpoints" / "step-4"
    pickles = sorted(folder.glob("*.pt"))
    assert len(pickles) == 3, pickles  # DeepSpeed's module and optimizer states, rank 0's RNG
    _RecordingUnpickler.seen = set()
    for path in pickles:
        assert zipfile.is_zipfile(path)
        torch.load(path, map_location="cpu", weights_only=False, pickle_module=recorder)
    seen = _RecordingUnpickler.seen
    assert seen, "the recorder saw the pickles' imports"
    ours = sorted(f"{m}.{n}" for m, n in seen if m.split(".")[0] == "ds_relora")
    assert not ours, f"old checkpoints pickle ds_relora objects: {ours}"


@pytest.mark.parametrize("version", VERSIONS)
def test_old_checkpoint_resumes_evaluates_and_exports(version, tmp_path, capsys):
    config, step4 = _copy(version, tmp_path)
    meta = json.loads((step4 / "meta.json").read_text())
    assert meta["format_version"] == version
    run_dir = step4.parent.parent

    r = _train("--config", str(config), "--resume", "auto", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    losses, events = read_metrics(run_dir)
    resumes = [e for e in events if e["event"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] == 4 and resumes[0]["checkpoint"].endswith("step-4"), resumes
    # The old code's own resume of the same checkpoint: the same data position, weights, Adam
    # state, LR position and RNG give the same losses.
    expected = json.loads((run_dir.parent / "resumed_losses.json").read_text())
    expected = {int(step): loss for step, loss in expected.items()}
    assert sorted(losses) == [5, 6, 7, 8], losses
    for step, loss in expected.items():
        assert abs(losses[step] - loss) <= 1e-5 * abs(loss), (step, losses[step], loss)

    # The old checkpoint itself, evaluated and exported by this code (in this process).
    from transformers import AutoModelForCausalLM

    from ds_relora.checkpoint.meta import read_meta
    from ds_relora.cli import main

    capsys.readouterr()
    assert main(["eval", str(step4), "--data", str(run_dir.parent / "data"), "--device", "cpu"]) == 0
    result = json.loads([ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][-1])
    assert result["loss"] > 0 and result["perplexity"] > 1
    assert main(["export", str(step4), "--out", str(tmp_path / "export")]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    assert not any("lora" in n for n, _ in model.named_parameters())

    # What the resumed run wrote is read back by the one reader.
    new = read_meta(run_dir / "checkpoints" / "step-8", for_resume=True)
    assert new.format_version == 6 and new.step == 8 and new.method == "relora"
    assert new.method_settings["lora_scale"] == 2.0 and new.data_position()["consumed_samples"] == 32
