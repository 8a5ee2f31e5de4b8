"""Issue 21, point 2: one writer per run folder (ds_relora/run_lock.py): a second run on a folder
in use stops naming the first, a stale lock is taken over with one notice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ds_relora.checkpoint.format import FORMAT_VERSION
from harness.configs import tiny_run_config, write_config
from harness.launches import DS_RELORA, env, procs, root, start  # noqa: F401  (fixtures)


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
    for step in (STEPS // 2, STEPS):  # the shards' hashes, taken while written, match the disk (format 6: our sets only)
        assert check_intact(run_dir / "checkpoints" / f"step-{step}").format_version == FORMAT_VERSION == 6
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
