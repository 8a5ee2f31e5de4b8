"""Launch mistakes fail with one ``error: ...`` line that names the fix, and a rank that dies
mid-training takes the whole launch down within seconds instead of hanging."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from ds_relora.launch.hosts import free_port
from ds_relora.launch.supervise import SAME_EVENT_S
from ds_relora.run_folder import EXITS
from harness.launches import DS_RELORA, STEPS, SWAP, TRAIN_TIMEOUT, env, procs, root, run, start_ranks, step_lines, train_config  # noqa: F401  (fixtures are used by name)

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(420)]


# ---------------------------------------------------------------- launch errors: one line, no hang

MASTER_WAIT = 5
NO_SSH = {"launcher": "deepspeed", "no_ssh": True, "master_addr": "127.0.0.1", "num_nodes": 2, "num_gpus": 1}


def one_line_error(rc: int, stdout: str, stderr: str, *fragments: str) -> str:
    """Exit status 2 and exactly one stderr line ``error: <problem>: <fix>``, nothing on stdout."""
    lines = stderr.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and stdout == "", (rc, stdout, stderr)
    line = lines[0]
    assert line.startswith("error: ") and ": " in line[len("error: "):], line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def test_unreachable_master_fails_after_the_configured_wait(prepared_data, root, env, procs):
    """Node 1 of a --no_ssh launch whose master port has nothing listening: run_plan's
    check_master_reachable retries for DS_RELORA_MASTER_WAIT seconds, then one error line."""
    hostfile = root / "hostfile-2x1"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()  # nothing listens there
    launch = {**NO_SSH, "hostfile": str(hostfile), "node_rank": 1, "master_port": port}
    cfg, run_dir = train_config(prepared_data, root / "errors", "unreachable-master", launch)
    p = run(procs, "unreachable-master", [*DS_RELORA, "train", "--config", str(cfg)],
            {**env, "DS_RELORA_MASTER_WAIT": str(MASTER_WAIT)}, root / "logs", timeout=90)
    line = one_line_error(p.p.returncode, p.stdout, p.stderr, f"cannot reach master 127.0.0.1:{port}", "master_addr")
    took = p.ended - p.started
    # It retried the refused connection for the whole wait (rank 0 may still be importing torch),
    # then stopped: DS_RELORA_MASTER_WAIT honoured (not the 120 s default), no rendezvous hang.
    assert MASTER_WAIT <= took < MASTER_WAIT + 40, (took, line)
    assert not (run_dir / "metrics.jsonl").exists()  # the deepspeed launcher never ran


@pytest.mark.parametrize("case, launch, fragments", [
    ("slots-vs-num-gpus", {"hostfile": "2x2", "node_rank": 0}, ("slots=2", "launch.num_gpus=1", "make them equal")),
    ("hosts-vs-num-nodes", {"hostfile": "2x1", "num_nodes": 3, "node_rank": 0},
     ("launch.num_nodes=3", "lists 2 hosts", "set launch.num_nodes=2")),
    ("missing-hostfile", {"hostfile": "absent", "node_rank": 1}, ("does not exist", "make_hostfile.sh", "launch.hostfile")),
    ("no-hostfile", {"node_rank": 0}, ("needs launch.hostfile", "make_hostfile.sh")),
])
def test_bad_launch_fails_before_anything_starts(prepared_data, root, capsys, case, launch, fragments):
    """World size (hostfile slots vs num_nodes x num_gpus) and hostfile mistakes are found by
    build_launch, before the run_dir is written or any process starts: ``ds-relora train`` runs
    in this process (cli.main, as the console script calls it)."""
    from ds_relora.cli import main

    hostfiles = {"2x1": "node0 slots=1\nnode1 slots=1\n", "2x2": "node0 slots=2\nnode1 slots=2\n"}
    launch = {**NO_SSH, "master_port": free_port(), **launch}
    if "hostfile" in launch:
        path = root / "errors" / f"hostfile-{case}"
        if launch["hostfile"] in hostfiles:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(hostfiles[launch["hostfile"]])
        launch["hostfile"] = str(path)
    cfg, run_dir = train_config(prepared_data, root / "errors", case, launch)
    capsys.readouterr()
    rc = main(["train", "--config", str(cfg)])
    captured = capsys.readouterr()
    one_line_error(rc, captured.out, captured.err, *fragments)
    assert not run_dir.exists()  # nothing written, nothing started


# ---------------------------------------------------------------- a rank that dies

DIE_AT = 5


def _die_env(env: dict, mark: Path, rank: int = 1) -> dict:
    return {**env, "DS_RELORA_TEST_DIE_AT_STEP": str(DIE_AT), "DS_RELORA_TEST_DIE_RANK": str(rank),
            "DS_RELORA_TEST_DIE_MARK": str(mark)}


def test_dying_rank_stops_the_deepspeed_launch(prepared_data, root, env, procs):
    """launcher=local (the real deepspeed launcher, 2 ranks) running tests/workers/launch_die_worker.py
    instead of ds_relora.worker: rank 1 exits with 3 after step 5 while rank 0 goes on to the next
    collective."""
    launch = {"launcher": "local", "num_gpus": 2, "master_port": free_port()}
    cfg, run_dir = train_config(prepared_data, root, "die-deepspeed", launch)
    mark = root / "die-deepspeed.mark"
    cmd = [*SWAP, "launch_die_worker", "train", "--config", str(cfg)]
    p = run(procs, "die-deepspeed", cmd, _die_env(env, mark), root / "logs")
    out = p.stdout + p.stderr
    assert "'-m', 'launch_die_worker'" in out and "dist_world_size=2" in out, p.log()
    assert mark.is_file(), p.log()  # it really died where asked, after training started
    assert p.p.returncode != 0, p.log()
    assert p.ended - float(mark.read_text()) < 60, p.log()
    assert "exits with return code" in out  # deepspeed's launch.py saw it and stopped the rest
    assert max(step_lines(run_dir)) == DIE_AT and not (run_dir / "checkpoints" / f"step-{STEPS}").exists()


def test_launcher_names_the_rank_that_failed_first(prepared_data, root, env, procs):
    """The real deepspeed launcher, 2 ranks of ds_relora.worker: rank 1 raises at step 3
    (DS_RELORA_FAULT=error:3), rank 0 fails in its next collective. DeepSpeed's own line names
    whichever command it checked last; ds-relora train's last line names rank 1 and its error."""
    launch = {"launcher": "local", "num_gpus": 2, "master_port": free_port()}
    cfg, run_dir = train_config(prepared_data, root, "fails-first", launch)
    p = run(procs, "fails-first", [*DS_RELORA, "train", "--config", str(cfg)],
            {**env, "DS_RELORA_FAULT": "error:3", "DS_RELORA_FAULT_RANK": "1"}, root / "logs")
    assert p.p.returncode not in (0, 75), p.log()
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, p.log()
    assert errors[0].startswith("error: rank 1 (host ") and "failed first: ValueError: injected fault at step 3" in errors[0]
    assert errors[0].endswith(f"the launcher exited with code {p.p.returncode}"), errors[0]
    # (What the survivor prints depends on whether the launcher's kill or the failed collective
    # reaches it first: tests/test_console_failures.py checks it without a launcher.)


def test_a_signal_to_ds_relora_train_reaches_the_launcher_and_its_code_comes_back(tmp_path):
    """ds-relora train stays the launcher's parent: a SIGTERM sent to it alone (kill, timeout,
    a scheduler) is passed on, and the launcher's exit code (75: stopped for a requeue) is its."""
    import os
    import signal
    import subprocess

    ready = tmp_path / "ready"
    child = f"trap 'exit 75' TERM; touch {ready}; while :; do sleep 0.05; done"
    code = ("import os, sys; from ds_relora.launch.supervise import run_supervised; "
            f"sys.exit(run_supervised(['sh', '-c', {child!r}], dict(os.environ), None))")
    parent = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.05)
        assert ready.exists()
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 75
    finally:
        if parent.poll() is None:
            parent.kill()


def test_a_stop_signal_during_the_checks_is_held_until_the_launcher_runs(tmp_path):
    """SLURM's USR1 warning can arrive while ds-relora train still checks the run (before any
    launcher): it must not end the command (rc 138, no checkpoint, no requeue) but reach the
    ranks as a stop request once the launcher runs; a second one, later, ends it at once."""
    import os
    import signal
    import subprocess

    ready, go, run_dir = tmp_path / "ready", tmp_path / "go", tmp_path / "run"
    stop_file = run_dir / EXITS / "stop"
    # The "launcher": exits 75 once the stop request is in the run folder (what the ranks read).
    child = f"while [ ! -f {stop_file} ]; do sleep 0.05; done; exit 75"
    script = tmp_path / "train.py"  # ds-relora train's shape: hold, check (until `go`), launch
    script.write_text(
        "import os, sys, time\n"
        "from ds_relora.launch import supervise\n"
        "supervise.hold_stop_signals()\n"
        f"open({str(ready)!r}, 'w').close()\n"
        f"while not os.path.exists({str(go)!r}):\n"
        "    time.sleep(0.05)\n"
        f"sys.exit(supervise.run_supervised(['sh', '-c', {child!r}], dict(os.environ), {str(run_dir)!r}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}

    def start():
        for f in (ready, go):
            f.unlink(missing_ok=True)
        p = subprocess.Popen([sys.executable, str(script)], env=env, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.05)
        assert ready.exists()
        return p

    parent = start()
    try:
        parent.send_signal(signal.SIGUSR1)  # during the "checks"
        time.sleep(0.5)
        assert parent.poll() is None, parent.stderr.read()
        go.touch()  # the checks end, the launcher starts and gets the held stop
        assert parent.wait(timeout=60) == 75, parent.stderr.read()
        assert "during the checks" in parent.stderr.read()
    finally:
        if parent.poll() is None:
            parent.kill()
    assert not stop_file.exists()  # cleared once the run ended

    parent = start()
    try:
        parent.send_signal(signal.SIGTERM)
        time.sleep(SAME_EVENT_S + 0.5)
        parent.send_signal(signal.SIGTERM)  # the sender insists: nothing started, so stop now
        assert parent.wait(timeout=30) == 128 + signal.SIGTERM
        assert "nothing started" in parent.stderr.read()
    finally:
        if parent.poll() is None:
            parent.kill()


@pytest.fixture(scope="module")
def plain_env_deaths(prepared_data, root, env, procs):
    """No launcher watching (srun/torchrun-style env vars), rank 1 dies in one group and rank 0
    (the TCPStore host) in another; both 2-rank groups run at the same time."""
    groups = {}
    for dying in (0, 1):
        cfg, run_dir = train_config(prepared_data, root, f"die-env-{dying}", {"launcher": "none"})
        mark = root / f"die-env-{dying}.mark"
        cmd = [sys.executable, "-m", "launch_die_worker", "--config", str(cfg)]
        ranks = start_ranks(procs, f"die-env-{dying}", cmd, _die_env(env, mark, dying), root / "logs", 2, free_port())
        groups[dying] = (ranks, mark, run_dir)
    deadline = time.time() + TRAIN_TIMEOUT
    for ranks, _, _ in groups.values():
        for r in ranks:
            r.wait(deadline)
    return groups


@pytest.mark.parametrize("dying", [1, 0])
def test_dying_rank_stops_a_plain_env_launch(plain_env_deaths, dying):
    """The survivor must notice on its own (gloo sees the closed connection) and exit non-zero,
    not sit in the collective until the 600 s process-group timeout."""
    ranks, mark, run_dir = plain_env_deaths[dying]
    logs = "\n".join(r.log() for r in ranks)
    assert mark.is_file(), logs
    died, survivor = float(mark.read_text()), ranks[1 - dying]
    assert ranks[dying].p.returncode == 3, logs
    assert survivor.p.returncode != 0 and survivor.ended - died < 60, logs
    assert max(step_lines(run_dir)) == DIE_AT  # rank 0 logged up to the death, nothing after
