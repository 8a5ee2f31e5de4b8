"""Issue 21, point 3: disk errors as one line (ds_relora/disk.py): a full disk during a save, too
little space or a read-only run folder before launch, an export to a full or read-only disk.

The tests mount small tmpfs folders (root only; skipped with the reason otherwise).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds_relora.launch.hosts import free_port
from harness import REPO
from harness.configs import tiny_run_config, write_config


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs of a given size (mount -t tmpfs: needs root); unmounted at the end."""
    mounted = []

    def mount(name: str, size: str, readonly: bool = False) -> Path:
        where = tmp_path / name
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}): needs root")
        mounted.append(where)
        if readonly:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)])


def _one_error_line(stderr: str, *words) -> str:
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def _cli(*argv, cwd=None):
    e = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ds_relora.cli", *argv], capture_output=True, text=True, env=e,
                          timeout=300, cwd=cwd)


def test_a_full_disk_during_a_save_is_one_line_and_leaves_no_checkpoint(prepared_data, tmpfs, tmp_path):
    """Mode: a 1 MiB tmpfs as run_dir; the first checkpoint (weights and Adam moments, one copy:
    more than 1 MiB, as the next test's pre-launch check says) runs out of space in the middle. The worker is started by hand (no parent), so no free-space check precedes the
    save: the save itself must fail on one line and leave nothing that looks like a checkpoint."""
    from ds_relora.checkpoint.choose import resolve_resume

    run_dir = tmpfs("full", "1m") / "run"
    cfg = tiny_run_config(prepared_data, run_dir, 2, train={"method": "full", "total_steps": 4, "save_every": 2},
                          optim={"warmup_steps": 1})
    path = write_config(tmp_path / "full.yaml", cfg)
    e = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "RANK": "0",
         "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    r = subprocess.run([sys.executable, "-m", "ds_relora.worker", "--config", str(path)], capture_output=True,
                       text=True, env=e, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    _one_error_line(r.stderr, "No space left on device", str(run_dir / "checkpoints"), "needs about",
                    "free there", "train.run_dir")
    ckpts = run_dir / "checkpoints"
    assert not [p.name for p in ckpts.iterdir() if p.name.startswith("step-")], "the partial save is deleted"
    assert resolve_resume("auto", run_dir) is None


def test_too_little_space_or_a_read_only_run_dir_is_one_line_before_launch(prepared_data, tmpfs, tmp_path):
    """Mode: a 1 MiB tmpfs (less than one tiny checkpoint) and a tmpfs remounted read-only
    (chmod does not stop root)."""
    small = tmpfs("small", "1m")
    cfg = tiny_run_config(prepared_data, small / "run", 2)
    r = _cli("train", "--config", str(write_config(tmp_path / "small.yaml", cfg)))
    assert r.returncode == 2
    _one_error_line(r.stderr, str(small / "run"), "free but a checkpoint needs about", "train.run_dir")
    assert not (small / "run").exists(), "refused before anything is written"

    ro = tmpfs("ro", "4m", readonly=True)
    cfg = tiny_run_config(prepared_data, ro / "run", 2)
    for extra in (["--dry-run"], []):
        r = _cli("train", "--config", str(write_config(tmp_path / "ro.yaml", cfg)), *extra)
        assert r.returncode == 2
        _one_error_line(r.stderr, str(ro), "Read-only file system", "train.run_dir")


def test_export_to_a_full_or_read_only_disk_is_one_line(tmpfs, tmp_path):
    """Mode: tmpfs of 1 MiB (the export needs more) and a read-only tmpfs, as --out."""
    from ds_relora.checkpoint.format import CheckpointMeta, write_meta
    from transformers import LlamaConfig

    ckpt = tmp_path / "step-1"
    ckpt.mkdir()
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    cfg.save_pretrained(str(ckpt))
    from transformers import AutoModelForCausalLM
    from ds_relora.tensor_files import StreamingWriter

    state = AutoModelForCausalLM.from_config(cfg).state_dict()
    state.pop("lm_head.weight", None) if cfg.tie_word_embeddings else None
    w = StreamingWriter(ckpt / "model.safetensors", [(n, torch.float32, tuple(t.shape)) for n, t in state.items()])
    for n, t in state.items():
        w.write(n, t)
    w.close()
    write_meta(ckpt, CheckpointMeta(step=1, method="full"))
    full, ro = tmpfs("full", "1m"), tmpfs("ro", "4m", readonly=True)
    r = _cli("export", str(ckpt), "--out", str(full / "exp"))
    assert r.returncode == 2
    _one_error_line(r.stderr, str(full), "the export needs about", "--out")
    assert not list(full.iterdir())
    r = _cli("export", str(ckpt), "--out", str(ro / "exp"))
    assert r.returncode == 2
    _one_error_line(r.stderr, str(ro), "Read-only file system", "--out")
