"""Issue 21, points 1-3: no silent damage, one writer per run folder, disk errors as one line.

Runnable alone: ``pytest tests/test_integrity_lock_disk.py``. The disk tests mount small tmpfs
folders (root only; skipped with the reason otherwise).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from distributed import run_workers
from helpers import REPO, tiny_run_config, write_config
from launch_harness import DS_RELORA, env, procs, root, start  # noqa: F401  (fixtures)


# ----------------------------------------------------------------------------- 1. whole-file hashes
def _fake_checkpoint(folder: Path, step: int, numel: int) -> Path:
    """A format-4 checkpoint folder written through the save's own writers: one weights shard of
    ``numel`` fp32 values (StreamingWriter, hashed while written), a small config, meta.json."""
    from ds_relora.checkpoint.format import CheckpointMeta, write_meta
    from ds_relora.tensor_files import shard_name, write_index

    staging = folder.with_name(folder.name + ".saving")
    staging.mkdir(parents=True)
    from ds_relora.tensor_files import StreamingWriter

    digests: dict = {}
    name = shard_name("model", 0, 1)
    w = StreamingWriter(staging / name, [("w", torch.float32, (numel,))], {"format": "pt"}, digests)
    w.write("w", torch.arange(numel, dtype=torch.float32))
    w.close()
    write_index(staging, "model", {"w": name}, numel * 4)
    (staging / "config.json").write_text(json.dumps({"model_type": "llama"}))
    write_meta(staging, CheckpointMeta(step=step, data_path=str(folder), seq_len=32), digests)
    os.rename(staging, folder)
    return folder


def _flip_middle(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


AGREE = textwrap.dedent('''
    import sys
    import torch.distributed as dist
    from ds_relora.checkpoint.store import agree_on_resume
    dist.init_process_group("gloo")
    log = (lambda m: print(m, flush=True)) if dist.get_rank() == 0 else None
    print("CHOSEN", agree_on_resume("auto", sys.argv[1], log), flush=True)
    dist.barrier()
''')


def test_a_byte_flipped_mid_shard_is_skipped_by_resume_and_refused_by_eval_and_export(tmp_path, capsys):
    from ds_relora.checkpoint.format import check_complete, verify
    from ds_relora.cli import main
    from ds_relora.checkpoint.store import resolve_resume

    ckpts = tmp_path / "run" / "checkpoints"
    numel = 3 << 20  # 12 MiB of fp32: its middle lies outside the first and last 4 MiB
    older = _fake_checkpoint(ckpts / "step-1", 1, numel)
    newest = _fake_checkpoint(ckpts / "step-2", 2, numel)
    shard = newest / "model-00001-of-00001.safetensors"
    assert shard.stat().st_size > 8 << 20
    meta = check_complete(newest)
    assert meta.files[shard.name]["size"] == shard.stat().st_size, "the streamed record is the file on disk"
    _flip_middle(shard)

    # The resume decision (rank 0 alone, and the collective one of the workers, 2 ranks).
    lines = []
    assert resolve_resume("auto", tmp_path / "run", lines.append) == older
    assert len(lines) == 1 and f"{newest} is damaged ({shard.name} does not match its hash" in lines[0], lines
    (tmp_path / "agree.py").write_text(AGREE)
    outs = run_workers([str(tmp_path / "agree.py"), str(tmp_path / "run")], 2, timeout=120)
    skipped = [ln for ln in outs[0].splitlines() if ln.startswith("resume: skipping")]
    assert len(skipped) == 1 and shard.name in skipped[0] and "falling back" in skipped[0], outs[0]
    for out in outs:
        assert f"CHOSEN {older}" in out, out

    # Eval and export of the damaged folder: one line each, naming the file.
    capsys.readouterr()
    for argv in (["eval", str(newest)], ["export", str(newest), "--out", str(tmp_path / "exp")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and shard.name in err[0] and "damaged" in err[0], err
    assert not (tmp_path / "exp").exists()

    # Format 3 (hash of the ends) still loads and is verified the old way.
    from ds_relora.checkpoint.format import file_digest, read_meta

    old = json.loads((older / "meta.json").read_text())
    old["format_version"] = 3
    old["files"] = {rel: {"size": e["size"], "sha256_ends": file_digest(older / rel)} for rel, e in old["files"].items()}
    (older / "meta.json").write_text(json.dumps(old))
    old = read_meta(older)
    assert old.format_version == 3
    assert verify(older, old) is None
    with open(older / shard.name, "r+b") as f:  # damage at the end is what format 3 could see
        f.seek(-1, os.SEEK_END)
        f.write(b"\xff")
    assert "does not match its hash" in verify(older, old)


# ----------------------------------------------------------------------------- 2. one run per folder
def _lock_info(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / ".ds-relora.lock").read_text() or "null")
    except (OSError, ValueError):
        return None


STEPS = 16


@pytest.mark.distributed
def test_a_second_run_on_the_same_folder_stops_naming_the_first(prepared_data, procs, env, root, capsys):  # noqa: F811
    from ds_relora.checkpoint.format import check_intact

    run_dir = root / "shared"
    cfg = tiny_run_config(prepared_data, run_dir, 2, train={"total_steps": STEPS, "save_every": STEPS // 2})
    path = write_config(root / "shared.yaml", cfg)
    # The first run waits after step 2 until the test lets it go: it certainly still runs (and
    # holds the lock) while the second run and the dry run look at the folder.
    release = root / "shared.release"
    held = {**env, "DS_RELORA_FAULT": "hold:2", "DS_RELORA_FAULT_RANK": "0", "DS_RELORA_FAULT_RELEASE": str(release)}
    first = start(procs, "first", [*DS_RELORA, "train", "--config", str(path)], held, root / "logs")
    deadline = time.time() + 120
    while not (_lock_info(run_dir) or {}).get("pid"):
        assert first.rc is None and time.time() < deadline, first.log()
        time.sleep(0.2)
    assert _lock_info(run_dir)["pid"] == first.p.pid
    second = start(procs, "second", [*DS_RELORA, "train", "--config", str(path)], env, root / "logs")
    assert second.wait(time.time() + 120) != 0
    errors = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"pid {first.p.pid}" in errors[0] and "in use by another run" in errors[0], second.log()
    assert "Traceback" not in second.stderr
    from ds_relora.cli import main

    capsys.readouterr()
    assert main(["train", "--config", str(path), "--dry-run"]) == 0  # names the holder
    out = capsys.readouterr().out
    assert f"held by pid {first.p.pid}" in out, out
    assert first.rc is None, first.log()
    release.touch()
    assert first.wait(time.time() + 300) == 0, first.log()
    steps = [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["type"] == "step"]
    assert steps == list(range(1, STEPS + 1)), "each step logged once, by the first run only"
    for step in (STEPS // 2, STEPS):  # DeepSpeed's and the shards' hashes, taken while written, match the disk
        assert check_intact(run_dir / "checkpoints" / f"step-{step}").format_version == 4
    assert _lock_info(run_dir)["released"], "a clean end leaves no stale lock"


def test_a_stale_lock_is_taken_over_with_one_notice_and_dry_run_reports_it(tmp_path):
    from ds_relora import run_lock

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / run_lock.LOCK_NAME).write_text(json.dumps({"host": os.uname().nodename, "pid": gone.pid,
                                                          "since": time.time(), "id": "x"}))
    assert run_lock.state(run_dir).startswith(f"stale (left by pid {gone.pid}")
    notes = []
    lock = run_lock.acquire(run_dir, log=notes.append)
    assert len(notes) == 1 and f"taking over the lock of {run_dir} left by pid {gone.pid}" in notes[0]
    assert run_lock.state(run_dir).startswith(f"held by pid {os.getpid()}")
    # A worker started by hand on the folder (no --run-lock id) is refused while it is held.
    with pytest.raises(run_lock.RunLockError, match=f"pid {os.getpid()}"):
        run_lock.acquire(run_dir)
    assert run_lock.acquire(run_dir, token=lock.token) is None, "a worker started under this lock runs"
    lock.release()
    assert run_lock.state(run_dir) == "free"


# ----------------------------------------------------------------------------- 3. disk errors
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
    """Mode: a 2 MiB tmpfs as run_dir; the first checkpoint (~2.8 MB) runs out of space in
    the middle. The worker is started by hand (no parent), so no free-space check precedes the
    save: the save itself must fail on one line and leave nothing that looks like a checkpoint."""
    from ds_relora.checkpoint.store import resolve_resume

    run_dir = tmpfs("full", "2m") / "run"
    cfg = tiny_run_config(prepared_data, run_dir, 2, train={"method": "full", "total_steps": 4, "save_every": 2},
                          optim={"warmup_steps": 1})
    path = write_config(tmp_path / "full.yaml", cfg)
    e = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "RANK": "0",
         "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    r = subprocess.run([sys.executable, "-m", "ds_relora.worker", "--config", str(path)], capture_output=True,
                       text=True, env=e, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    _one_error_line(r.stderr, "No space left on device", str(run_dir / "checkpoints"), "needs about",
                    "free there", "train.run_dir")
    ckpts = run_dir / "checkpoints"
    assert not [p.name for p in ckpts.iterdir() if p.name.startswith("step-")], "the partial save is deleted"
    assert resolve_resume("auto", run_dir) is None


def _free_port() -> int:
    from distributed import free_port

    return free_port()


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
