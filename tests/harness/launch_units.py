"""What the launch layer's fast tests share: a PATH of fake launchers, a hostfile of two
"nodes" that both resolve, a SLURM allocation's environment, and the one-line-error check."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ds_relora.config import LaunchConfig
from ds_relora.errors import LaunchError
from ds_relora.launch import launchers as L
from ds_relora.launch.hosts import free_port
from harness import REPO as ROOT

ARGS = ["--config", "runs/x/resolved.yaml"]
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_NNODES": "2"}


@pytest.fixture
def fakebin(tmp_path, monkeypatch):
    """A PATH holding only fake deepspeed/pdsh/srun/mpirun; mpirun's --version is $FAKE_MPI."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("deepspeed", "pdsh", "srun"):
        (bin_dir / name).write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "mpirun").write_text('#!/bin/sh\necho "$FAKE_MPI"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(L, "VENV_BIN", str(empty))
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_MPI": "mpirun (Open MPI) 5.0.3"}


@pytest.fixture
def hostfile(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("# two 'nodes' that both resolve\nlocalhost slots=2\n127.0.0.1 slots=2  # comment\n")
    return str(path)


def cfg(**kw) -> LaunchConfig:
    kw.setdefault("master_port", free_port())
    return LaunchConfig(**kw)


def names(cmd):
    return [os.path.basename(cmd[0])] + cmd[1:]


def one_line_error(fn, *args, match: str, **kw) -> str:
    with pytest.raises(LaunchError, match=match) as exc:
        fn(*args, **kw)
    msg = str(exc.value)
    assert "\n" not in msg and ": " in msg, msg  # one line: problem, then the fix
    return msg


def run_helper(args, env, **kw):
    """``python -m ds_relora.launch ARGS`` (the helpers the shell launchers call)."""
    full = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-m", "ds_relora.launch", *args], env=full, capture_output=True, text=True, timeout=60, **kw)
