"""Processes of the cluster tests: ``ds-relora train`` in its own session with its output in files,
and the check that nothing of a run is left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness import REPO

VENV_BIN = Path(sys.executable).parent
DS_RELORA = [str(VENV_BIN / "ds-relora")] if (VENV_BIN / "ds-relora").is_file() else [sys.executable, "-m", "ds_relora.cli"]
# Variables a surrounding launcher may have set: they would change how the ranks find each other.
FOREIGN = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE")
FOREIGN_PREFIXES = ("SLURM_", "PMI_", "PMIX_", "OMPI_", "HYDRA_", "MPI_LOCAL", "DS_RELORA_")


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


class Proc:
    """One command in its own session; stdout/stderr in ``logdir``."""

    def __init__(self, cmd: list[str], env: dict, logdir: Path):
        logdir.mkdir(parents=True, exist_ok=True)
        self.cmd = cmd
        self._out, self._err = open(logdir / "out", "w+"), open(logdir / "err", "w+")
        self.p = subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=self._out, stderr=self._err,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.p.pid

    def poll(self):
        return self.p.poll()

    def wait(self, timeout: float) -> int:
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout:.0f} s: killed\n{self.log()}") from None

    def kill(self) -> None:
        """SIGKILL the whole session (launcher, ranks), even after the leader exited."""
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def _read(self, f) -> str:
        f.flush()
        f.seek(0)
        return f.read()

    @property
    def stdout(self) -> str:
        return self._read(self._out)

    @property
    def stderr(self) -> str:
        return self._read(self._err)

    def log(self) -> str:
        return f"--- {' '.join(self.cmd)}\n--- stdout\n{self.stdout[-6000:]}\n--- stderr\n{self.stderr[-6000:]}"


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
