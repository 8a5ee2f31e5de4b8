"""``sbatch launchers/slurm_deepspeed.sbatch`` on 2 box nodes (1 rank each), for real: a signal to
the job or a requeue from outside stops the ranks at a step boundary, the job checkpoints, exits
75, is requeued, resumes and finishes; its per-step losses equal an uninterrupted run's bit for bit.

The interrupted job holds rank 0 at step HOLD (fault point ``hold``) until the stop request is
visible to it, so the stop step is exact. Modes:

* ``hostfile``: one ``deepspeed --hostfile`` on the batch host reaches both nodes over pdsh/ssh;
  SLURM's own time-limit warning, ``sbatch --signal=B:USR1@119``: once the ranks train, the test
  lowers the job's limit (``scontrol update TimeLimit``) to 61-120 s ahead, so SLURM's periodic
  limit check (about every 30 s) sends USR1 to the batch shell; the limit goes back up once the
  job is requeued, or the requeued job would be warned again at once (SLURM's limits are whole
  minutes: a real short ``--time`` would make the test take minutes and time it to SLURM's clock);
* ``mpi``: ``mpirun`` (MPICH's Hydra) on the allocation's hosts, the rendezvous address found by
  the ranks; ``scancel --batch --signal=USR1`` (the batch shell, as ``--signal=B:USR1@N`` does);
* ``no_ssh``: srun starts ``deepspeed --no_ssh`` per node; ``scancel --full --signal=USR1``
  (the batch shell and every process of the job, DeepSpeed's launchers included);
* ``srun``: one srun task per rank; ``scontrol requeue`` from outside (SLURM's SIGTERM to the
  whole job, srun ends its tasks at once; the job starts again from the newest complete
  checkpoint, and still ends with the uninterrupted losses).

The four jobs run at once (most of a case is waiting on SLURM: its limit check, the requeue
delay): each takes one of each node's four CPUs, ``--oversubscribe`` on the command line
overriding the script's ``--exclusive``, and its own rendezvous port (derived from the job id).
"""

from __future__ import annotations

import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from harness import REPO
from harness.checks import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from box_procs import VENV_BIN, rank_env  # noqa: E402
from runs import BOX_PATH, NODE_ENV, STEPS, last_step, run_config  # noqa: E402

pytestmark = pytest.mark.distributed
HOLD = 5
SBATCH = REPO / "launchers" / "slurm_deepspeed.sbatch"
JOB_TIMEOUT = 300


def _job(box, job: str) -> dict:
    out = box.run("node1", "scontrol", "show", "job", "-o", job, check=False).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def _wait_job(box, job: str, pred, what: str, timeout: float, output: Path) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = _job(box, job)
        if pred(info):
            return info
        time.sleep(0.5)
    box.run("node1", "scancel", job, check=False)
    text = output.read_text()[-6000:] if output.exists() else ""
    raise AssertionError(f"job {job}: {what} not reached in {timeout:.0f} s: {_job(box, job)}\n{text}\n"
                         f"slurmctld: {box.log('slurmctld.log')[-1500:]}")


def _submit_and_interrupt(box, data: Path, root: Path, mode: str, how: str) -> dict:
    cfg, run_dir = run_config(data, root, mode, {"launcher": "slurm"})
    jobdir = root / f"job-{mode}"
    jobdir.mkdir()
    release = root / f"release-{mode}"
    fault = {"DS_RELORA_FAULT": f"hold:{HOLD}", "DS_RELORA_FAULT_RANK": "0", "DS_RELORA_FAULT_RELEASE": str(release)}
    (jobdir / ".deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in {**NODE_ENV, **fault}.items()))
    env = rank_env({**NODE_ENV, **fault, "MODE": mode, "GPUS_PER_NODE": "1", "PYTHON": sys.executable,
                    "DS_RELORA": str(VENV_BIN / "ds-relora"), "HOME": "/root",
                    "PATH": f"{VENV_BIN}:{BOX_PATH}"})
    output = jobdir / "job.out"
    started = time.time()
    warn = ["--signal=B:USR1@119"] if how == "limit" else []
    job = box.run("node1", "sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--oversubscribe", "--time=10", "--requeue", *warn,
                  "--open-mode=append", f"--chdir={jobdir}", f"--output={output}", str(SBATCH), str(cfg),
                  env=env).stdout.strip().split(";")[0]
    try:
        deadline = time.time() + JOB_TIMEOUT
        while last_step(run_dir) < HOLD - 1:
            assert time.time() < deadline and _job(box, job).get("JobState") in ("PENDING", "CONFIGURING", "RUNNING"), (
                f"job {job} did not reach step {HOLD - 1}: {_job(box, job)}\n" + (output.read_text()[-6000:] if output.exists() else ""))
            time.sleep(0.3)
        stop_file = run_dir / ".ds-relora-exits" / "stop"
        if how == "requeue":
            box.run("node1", "scontrol", "requeue", job)
            # SLURM's SIGTERM reaches the batch shell, which asks ds-relora train to stop the ranks.
        elif how == "limit":
            h, m, sec = (int(x) for x in _job(box, job)["RunTime"].split("-")[-1].split(":"))
            # 61-120 s left: within the warning's 119 s, and time to save and requeue before the limit.
            box.run("node1", "scontrol", "update", f"jobid={job}", f"TimeLimit={(h * 3600 + m * 60 + sec) // 60 + 2}")
        else:
            box.run("node1", "scancel", "--batch" if how == "batch" else "--full", "--signal=USR1", job)
        t = time.time()
        # SLURM's limit check runs about every 30 s (and the warning may come up to a minute early).
        while not stop_file.exists() and time.time() - t < (90 if how == "limit" else 30):
            time.sleep(0.05)
        stop_seen = stop_file.exists()
        time.sleep(1.2)  # the ranks look at the request at most once a second
        release.touch()
        if how == "limit":
            _wait_job(box, job, lambda i: i.get("Restarts") == "1", "requeued", JOB_TIMEOUT, output)
            box.run("node1", "scontrol", "update", f"jobid={job}", "TimeLimit=10")
        info = _wait_job(box, job, lambda i: i.get("JobState") == "COMPLETED" and i.get("Restarts") == "1",
                         "COMPLETED after one requeue", JOB_TIMEOUT, output)
    except BaseException:
        # Never leave a held job behind: it would keep both nodes from the next test.
        release.touch()
        box.run("node1", "scancel", job, check=False)
        raise
    return {"run_dir": run_dir, "output": output.read_text(), "info": info, "stop_seen": stop_seen,
            "seconds": time.time() - started, "job": job}


CASES = [("hostfile", "limit"), ("no_ssh", "full"), ("srun", "requeue"), ("mpi", "batch")]


@pytest.fixture(scope="module")
def jobs(box, cluster_data, reference, tmp_path_factory):
    """Every case's job, submitted and interrupted at the same time; each test reads its own."""
    root = tmp_path_factory.mktemp("sbatch")
    box.wait_idle()  # a job submitted while a node is DOWN would wait for it
    with ThreadPoolExecutor(len(CASES)) as pool:
        futures = {case: pool.submit(_submit_and_interrupt, box, cluster_data, root, *case) for case in CASES}
    return futures


@pytest.mark.parametrize("mode,how", CASES)
def test_job_stops_at_a_step_boundary_is_requeued_and_resumes_bit_identically(jobs, reference, mode, how):
    job = jobs[(mode, how)].result()
    out = job["output"]
    assert job["stop_seen"], f"no stop request was written\n{out[-6000:]}"
    # The requeue count, in the job's own output: one start, then the requeued one.
    assert "requeued 0 time(s)" in out and "requeued 1 time(s)" in out, out[-6000:]
    assert "exits with return code" not in out and "Traceback" not in out, out[-6000:]
    losses, events = read_metrics(job["run_dir"])
    resumed = [e["step"] for e in events if e["event"] == "resume"]
    if how == "requeue":
        # SLURM's SIGTERM reaches srun too, which ends its tasks at once ("forcing job
        # termination"): the job restarts from the newest complete checkpoint, never a partial one.
        assert len(resumed) == 1 and resumed[0] in (4, HOLD), (resumed, out[-6000:])
    else:
        assert f"step {HOLD}: stopped by a stop signal, checkpoint saved; exit code 75" in out, out[-6000:]
        assert "ds-relora stopped early to be requeued (exit 75)" in out, out[-6000:]
        assert resumed == [HOLD], out[-6000:]
    if how == "limit":  # SLURM's warning, not a signal sent by hand
        assert "ds-relora train: SIGUSR1: the ranks stop at the next step boundary" in out, out[-6000:]
    assert f"resumed from step-{resumed[0]}" in out, out[-6000:]
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert [losses[s] for s in range(1, STEPS + 1)] == [reference[s] for s in range(1, STEPS + 1)], out[-3000:]
    assert job["info"]["ExitCode"] == "0:0", job["info"]
