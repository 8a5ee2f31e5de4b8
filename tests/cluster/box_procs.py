"""Processes of the cluster tests: ``ds-relora train`` in its own session with its output in files,
and the check that nothing of a run is left running."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

from harness import REPO
from harness.launches import FOREIGN
from harness.launches import FOREIGN_PREFIXES as HARNESS_FOREIGN_PREFIXES
from harness.launches import Proc as LaunchedProc

VENV_BIN = Path(sys.executable).parent
DS_RELORA = [str(VENV_BIN / "ds-relora")] if (VENV_BIN / "ds-relora").is_file() else [sys.executable, "-m", "ds_relora.cli"]
# A surrounding launcher's variables (the harness's list) and our own fault/test switches.
FOREIGN_PREFIXES = (*HARNESS_FOREIGN_PREFIXES, "DS_RELORA_")


def rank_env(extra: dict | None = None) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in FOREIGN and not k.startswith(FOREIGN_PREFIXES)}
    base.update({
        "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1", "DS_RELORA_MASTER_WAIT": "60",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', os.defpath)}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    })
    base.update(extra or {})
    return base


class Proc(LaunchedProc):
    """One command in its own session, output in ``logdir`` (the harness's process, waited on by a
    timeout in seconds rather than a deadline)."""

    def __init__(self, cmd: list[str], env: dict, logdir: Path):
        super().__init__("run", cmd, env, logdir)
        self.pid = self.p.pid

    def poll(self):
        return self.rc

    def wait(self, timeout: float) -> int:
        return super().wait(time.time() + timeout)


def start_train(config: Path, logdir: Path, extra_env: dict, resume: bool = False) -> Proc:
    cmd = [*DS_RELORA, "train", "--config", str(config)] + (["--resume", "auto"] if resume else [])
    return Proc(cmd, rank_env(extra_env), logdir)


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


def no_processes_mention(text: str, within: float) -> bool:
    deadline = time.time() + within
    while processes_mentioning(text):
        if time.time() > deadline:
            return False
        time.sleep(0.2)
    return True


def python_tcp_peers(sockets: str) -> set[tuple[str, str]]:
    """(local, remote) IPv4 addresses of the established TCP connections held by python processes
    (the ranks, the launchers) in ``ss -tnp`` output taken on one node."""
    found = set()
    for ln in sockets.splitlines():
        m = re.search(r"ESTAB\s+\d+\s+\d+\s+(\d+\.\d+\.\d+\.\d+):\d+\s+(\d+\.\d+\.\d+\.\d+):\d+\s+users:.*python", ln)
        if m:
            found.add((m.group(1), m.group(2)))
    return found
