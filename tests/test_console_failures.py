"""What the console says when a launch goes wrong after every check passed: one line per
problem that names the fix, not one traceback per rank."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from harness import REPO
from harness.configs import tiny_run_config, write_config
from harness.launches import env, procs, root  # noqa: F401  (fixtures are used by name)

pytestmark = pytest.mark.timeout(300)


def test_port_taken_after_the_check_is_one_line_naming_the_setting(prepared_data, root, env):
    """Another process binds the rendezvous port between `ds-relora train`'s check and the
    workers' start: rank 0 (the TCPStore host) says so in one line."""
    cfg = write_config(root / "port.yaml", tiny_run_config(prepared_data, root / "port-run", 2, launch={"launcher": "none"}))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        renv = {**env, "DS_RELORA_VERBOSE": "0", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_RELORA_DIST_TIMEOUT": "20"}
        res = subprocess.run([sys.executable, "-m", "ds_relora.worker", "--config", str(cfg)], env=renv, cwd=str(REPO),
                             capture_output=True, text=True, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-4000:]
    assert lines[0].startswith("error: ") and f"port {port}" in lines[0] and "launch.master_port" in lines[0], lines[0]


def test_survivor_of_a_dead_rank_says_one_line(prepared_data, root, env, procs):
    """Two ranks without a launcher (srun/torchrun-style env); rank 1 exits hard after step 3
    (tests/workers/launch_die_worker.py). Rank 0 sees gloo's closed connection and says so in one
    line, without the traceback of the collective it was in."""
    import time

    from ds_relora.launch.hosts import free_port
    from harness.launches import TRAIN_TIMEOUT, start_ranks, train_config

    cfg, _ = train_config(prepared_data, root, "survivor", {"launcher": "none"})
    renv = {**env, "DS_RELORA_VERBOSE": "0", "DS_RELORA_TEST_DIE_AT_STEP": "3", "DS_RELORA_TEST_DIE_RANK": "1"}
    ranks = start_ranks(procs, "survivor", [sys.executable, "-m", "launch_die_worker", "--config", str(cfg)], renv,
                        root / "logs", 2, free_port())
    for r in ranks:
        r.wait(time.time() + TRAIN_TIMEOUT)
    survivor = ranks[0]
    assert ranks[1].p.returncode == 3 and survivor.p.returncode == 1, "\n".join(r.log() for r in ranks)
    err = survivor.stderr
    assert "Traceback" not in err, err[-4000:]
    stops = [ln for ln in err.splitlines() if "stopping" in ln]
    assert len(stops) == 1 and stops[0].startswith("rank 0: stopping: rank 1 died"), err[-4000:]
