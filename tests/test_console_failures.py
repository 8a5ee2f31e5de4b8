"""What the console says when a launch goes wrong after every check passed: one line per
problem that names the fix, not one traceback per rank."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from launch_harness import env, root  # noqa: F401  (fixtures are used by name)
from helpers import REPO, tiny_run_config, write_config

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
