"""``ds-relora sweep --slurm`` against the box's SLURM: the job array it writes is submitted with
sbatch, every point runs as an array task and finishes, and ``ds-relora sweep --status`` agrees
with ``squeue`` while the tasks are pending and running (one point at a time: ``max_parallel: 1``
keeps the second task PENDING while the first one trains) and after they are done.

"Agrees" is checked at every poll, in the direction a snapshot allows: a task that ``squeue``
still shows PENDING after ``--status`` ran cannot have started, so ``--status`` must call its
point pending; a point ``--status`` calls running must be RUNNING (or finishing) in ``squeue``
afterwards, never PENDING."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness.configs import tiny_run_config

sys.path.insert(0, str(Path(__file__).parent))
from box_procs import VENV_BIN, rank_env  # noqa: E402
from runs import BOX_PATH, NODE_ENV  # noqa: E402

pytestmark = pytest.mark.distributed
POINT_STEPS = 6
ARRAY_TIMEOUT = 300


def _sweep_file(folder: Path, data: Path) -> Path:
    base = tiny_run_config(data, folder / "unused")
    base["train"].update(total_steps=POINT_STEPS, keep_last=0)
    spec = {"name": "boxsweep", "out": str(folder / "sweep"), "config": base,
            "methods": {"full": {"set": {"train.method": "full"}, "grid": {"train.seed": [0, 1]}}},
            "slurm": {"time": "10", "gpus_per_node": 0, "max_parallel": 1}}
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _squeue(box, job: str) -> dict[int, str]:
    """Array index -> state of the array's tasks SLURM still lists as pending or running."""
    out = box.run("node1", "squeue", "-h", "-r", "-j", job, "-o", "%K %T", check=False).stdout
    return {int(k): st for k, st in (ln.split() for ln in out.splitlines() if ln.strip() and ln.split()[0].isdigit())}


def _status(box, out: Path, env: dict) -> dict[str, str]:
    text = box.run("node1", str(VENV_BIN / "ds-relora"), "sweep", str(out), "--status", env=env).stdout
    return {ln.split()[0]: ln.split()[1] for ln in text.splitlines()[1:-1]}


def test_sweep_slurm_array_finishes_every_point_and_status_agrees_with_squeue(box, cluster_data, tmp_path):
    sweep = _sweep_file(tmp_path, cluster_data)
    env = rank_env({**NODE_ENV, "HOME": "/root", "PATH": f"{VENV_BIN}:{BOX_PATH}"})
    made = box.run("node1", "bash", "-c", f"cd {tmp_path} && {VENV_BIN / 'ds-relora'} sweep {sweep} --slurm", env=env).stdout
    script = tmp_path / "sweep" / "sweep.sbatch"
    assert f"sbatch {script}" in made, made
    # The array's tasks run point i at index i, in points.json's order.
    names = [p["name"] for p in json.loads((tmp_path / "sweep" / "points.json").read_text())]
    assert len(names) == 2, names
    box.wait_idle()
    job = box.run("node1", "sbatch", "--parsable", str(script), env=env).stdout.strip().split(";")[0]
    seen_running_and_pending, history = False, []
    try:
        deadline = time.time() + ARRAY_TIMEOUT
        while True:
            status = _status(box, tmp_path / "sweep", env)
            queue = _squeue(box, job)
            history.append((status, queue))
            for i, name in enumerate(names):
                if queue.get(i) == "PENDING":
                    assert status[name] == "pending", f"{name}: squeue PENDING, --status {status[name]}; {history}"
                if status[name] == "running":
                    assert queue.get(i) != "PENDING", f"{name}: --status running, squeue PENDING; {history}"
            if (queue.get(0) == "RUNNING" and queue.get(1) == "PENDING" and status[names[0]] == "running"
                    and status[names[1]] == "pending"):
                seen_running_and_pending = True
            if not queue:
                break
            assert time.time() < deadline, f"array job {job} not finished in {ARRAY_TIMEOUT} s: {history[-3:]}"
            time.sleep(0.5)
    except BaseException:
        box.run("node1", "scancel", job, check=False)
        raise
    logs = "".join(p.read_text()[-1500:] for p in sorted((tmp_path / "sweep").glob("slurm-*.out")))
    assert seen_running_and_pending, f"never saw point 0 running while point 1 was pending: {history}\n{logs}"
    assert _status(box, tmp_path / "sweep", env) == dict.fromkeys(names, "done"), logs
    for i in range(2):
        info = box.run("node1", "scontrol", "show", "job", "-o", f"{job}_{i}", check=False).stdout
        assert "JobState=COMPLETED" in info and "ExitCode=0:0" in info, f"{info}\n{logs}"
