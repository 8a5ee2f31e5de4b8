"""Running sweep points: one after another on this machine, or as a SLURM job array.

Each point is one ``ds-relora train --config RUN_DIR/config.yaml --resume auto`` in a child
process (a failing point cannot take the sweep down; its output goes to ``RUN_DIR/train.log``).
``RUN_DIR/sweep_state.json`` records running / failed / stopped / done with the host, pid, exit
code and the accumulated wall time, so ``--status`` can tell a live point from a dead one.
A point is done when its final checkpoint (``checkpoints/step-<total_steps>`` with its
``meta.json``) exists; a half-finished one resumes from its latest checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ds_relora.checkpoint.choose import complete_checkpoints
from ds_relora.durable import write_atomic
from ds_relora.run_folder import checkpoint_root, config_file, metrics_file
from ds_relora.train.job_limits import REQUEUE_EXIT_CODE

STATE_FILE = "sweep_state.json"
STATUSES = ("done", "running", "failed", "partial", "pending")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def last_step(run_dir: Path) -> int:
    """Highest optimizer step recorded in ``metrics.jsonl`` (0 if none)."""
    best = 0
    path = metrics_file(run_dir)
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if rec.get("type") == "step" and isinstance(rec.get("step"), int):
                best = max(best, rec["step"])
    return best


def total_steps_of(run_dir: Path) -> int | None:
    try:
        return int((yaml.safe_load((config_file(run_dir)).read_text()) or {})["train"]["total_steps"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def point_state(run_dir: Path) -> dict:
    """``{"status", "step", "total_steps", "detail"}`` of one run folder."""
    run_dir = Path(run_dir)
    total = total_steps_of(run_dir)
    ckpts = [s for s, _ in complete_checkpoints(checkpoint_root(run_dir))]
    step = max([last_step(run_dir), *ckpts] or [0])
    out = {"status": "pending", "step": step, "total_steps": total, "detail": ""}
    state = _read_json(run_dir / STATE_FILE)
    if total is not None and total in ckpts:
        return {**out, "status": "done", "step": total}
    if state.get("status") == "running":
        here = state.get("host") == socket.gethostname()
        if not here or _alive(int(state.get("pid", -1))):
            return {**out, "status": "running", "detail": f"{state.get('host')} pid {state.get('pid')}"}
        if ckpts:  # killed (node lost, scancel, kill): the next sweep resumes it
            return {**out, "status": "partial", "detail": f"interrupted (its process is gone), resumes from step {ckpts[-1]}"}
        return {**out, "status": "failed", "detail": "interrupted (its process is gone)"}
    if state.get("status") == "failed":
        return {**out, "status": "failed", "detail": f"exit {state.get('returncode')}, see {run_dir / 'train.log'}"}
    if ckpts or step:
        resume = f"resumes from step {ckpts[-1]}" if ckpts else "no checkpoint: restarts"
        return {**out, "status": "partial", "detail": resume}
    return out


def _claim(run_dir: Path):
    """An exclusive lock on the point, held while it trains (released by the OS when this process
    dies): two ``ds-relora sweep`` processes on one sweep never train the same point. None if
    another process holds it."""

    handle = open(run_dir / ".running.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def run_point(run_dir: Path, log=print) -> int:
    """Train one point to the end (resuming if it was started); returns the exit code."""
    run_dir = Path(run_dir)
    claim = _claim(run_dir)
    if claim is None:
        log(f"{run_dir.name}: running in another process, skipped")
        return 0
    with claim:
        return _run_claimed(run_dir, log)


def _run_claimed(run_dir: Path, log) -> int:
    state = point_state(run_dir)
    if state["status"] in ("done", "running"):
        log(f"{run_dir.name}: {state['status']}, skipped")
        return 0
    if not complete_checkpoints(checkpoint_root(run_dir)) and (metrics_file(run_dir)).is_file():
        # A fresh start would append to a dead attempt's records: keep them aside instead.
        n = len(list(run_dir.glob("metrics.attempt-*.jsonl")))
        (metrics_file(run_dir)).rename(run_dir / f"metrics.attempt-{n}.jsonl")
    previous = _read_json(run_dir / STATE_FILE)
    wall = float(previous.get("wall_s", 0.0))
    info = {"status": "running", "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
            "wall_s": wall, "attempts": int(previous.get("attempts", 0)) + 1}
    write_atomic(run_dir / STATE_FILE, json.dumps(info))
    cmd = [sys.executable, "-m", "ds_relora.cli", "train", "--config", str(config_file(run_dir)),
           "--resume", "auto"]
    started, rc = time.time(), 1
    try:
        with open(run_dir / "train.log", "a") as out:
            out.write(f"$ {shlex.join(cmd)}\n")
            out.flush()
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    finally:
        info["wall_s"] = wall + time.time() - started
        info["returncode"] = rc
        finished = point_state_final(run_dir)
        info["status"] = "done" if finished else ("stopped" if rc in (0, REQUEUE_EXIT_CODE) else "failed")
        info["ended"] = time.time()
        write_atomic(run_dir / STATE_FILE, json.dumps(info))
    return rc


def point_state_final(run_dir: Path) -> bool:
    total = total_steps_of(run_dir)
    return total is not None and total in [s for s, _ in complete_checkpoints(checkpoint_root(run_dir))]


def _error_line(run_dir: Path) -> str:
    try:
        lines = (run_dir / "train.log").read_text().splitlines()
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or [ln for ln in lines if ln.strip()] or [""])[-1][:300]


def run_local(run_dirs: list[Path], log=print) -> int:
    """Every point one after the other; finished ones are skipped. 1 if any point failed."""
    failed = []
    for i, run_dir in enumerate(run_dirs, 1):
        state = point_state(run_dir)
        tag = f"[{i}/{len(run_dirs)}] {run_dir.name}"
        if state["status"] in ("done", "running"):
            log(f"{tag}: {state['status']}, skipped")
            continue
        log(f"{tag}: {'resuming' if state['status'] == 'partial' else 'starting'} (log: {run_dir / 'train.log'})")
        started = time.time()
        rc = run_point(run_dir, log=lambda _m: None)
        after = point_state(run_dir)
        if rc == REQUEUE_EXIT_CODE:
            log(f"{tag}: stopped by a job limit at step {after['step']}/{after['total_steps']}: "
                "run the sweep again to continue it")
        elif rc != 0:
            failed.append(run_dir.name)
            log(f"{tag}: failed (exit {rc}) {_error_line(run_dir)}")
        else:
            log(f"{tag}: {after['status']} at step {after['step']}/{after['total_steps']} "
                f"in {time.time() - started:.0f}s")
    if failed:
        log(f"{len(failed)} point(s) failed: {', '.join(failed)}")
    return 1 if failed else 0


def format_status(run_dirs: list[Path]) -> str:
    rows, counts = [], dict.fromkeys(STATUSES, 0)
    for run_dir in run_dirs:
        s = point_state(run_dir)
        counts[s["status"]] += 1
        rows.append(f"{run_dir.name:<40} {s['status']:<8} {s['step']:>7}/{s['total_steps'] or '?':<7} {s['detail']}")
    head = f"{'point':<40} {'status':<8} {'step':>7}/{'total':<7} detail"
    summary = ", ".join(f"{n} {k}" for k, n in counts.items())
    return "\n".join([head, *rows, summary])


# ----------------------------------------------------------------------------- other schedulers
def point_command(run_dir: Path) -> str:
    return shlex.join(["ds-relora", "sweep", "--run-point", str(run_dir)])


def write_commands(run_dirs: list[Path], out: Path) -> Path:
    """``commands.txt``: one shell command per point, for any scheduler."""
    path = out / "commands.txt"
    write_atomic(path, "".join(point_command(d) + "\n" for d in run_dirs))
    return path


def write_slurm(run_dirs: list[Path], out: Path, name: str, slurm, launch, workdir: Path) -> Path:
    """``sweep.sbatch``: a job array, index i runs point i (the same command as commands.txt line i+1).

    ``launch`` is the points' common LaunchConfig: one node/task request for the whole array.
    """
    per_node = launch.num_gpus if launch.launcher in ("slurm", "mpi") else 1
    gpus = launch.num_gpus if slurm.gpus_per_node is None else slurm.gpus_per_node
    n = len(run_dirs)
    array = f"0-{n - 1}" + (f"%{slurm.max_parallel}" if slurm.max_parallel else "")
    lines = ["#!/usr/bin/env bash", f"#SBATCH --job-name={name}", f"#SBATCH --array={array}",
             f"#SBATCH --nodes={launch.num_nodes}", f"#SBATCH --ntasks-per-node={per_node}",
             f"#SBATCH --time={slurm.time}", f"#SBATCH --output={out.resolve()}/slurm-%A_%a.out"]
    if gpus:
        lines.append(f"#SBATCH --gpus-per-node={gpus}")
    for key in ("partition", "account", "cpus_per_task"):
        value = getattr(slurm, key)
        if value:
            lines.append(f"#SBATCH --{key.replace('_', '-')}={value}")
    lines += [f"#SBATCH {opt}" for opt in slurm.extra]
    lines += [f"# ds-relora sweep: {n} points; submit with: sbatch {out / 'sweep.sbatch'}",
              "# the same commands, one per line, for other schedulers: " + str(out / "commands.txt"),
              "set -euo pipefail", f"cd {shlex.quote(str(workdir))}", *slurm.setup,
              'case "${SLURM_ARRAY_TASK_ID:?run this through sbatch --array}" in']
    lines += [f"  {i}) {point_command(d)} ;;" for i, d in enumerate(run_dirs)]
    lines += ['  *) echo "no sweep point for array index $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;', "esac"]
    path = out / "sweep.sbatch"
    write_atomic(path, "\n".join(lines) + "\n")
    path.chmod(0o755)
    return path
