"""Run N local ranks of one Python command (gloo on CPU) to the end: each rank gets the
torch.distributed variables, one hang timeout covers the group, and every rank's output comes
back. Every multi-rank test starts its ranks here; benchmarks/common.launch_ranks is a thin
wrapper (a bigger timeout, rank 0's progress echoed, RESULT records parsed).

Needs only the standard library and ds_relora (benchmarks import it without pytest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ds_relora.launch.hosts import free_port
from harness import REPO

RESULT_TAG = "RESULT "


class RanksFailed(AssertionError):
    """A rank exited non-zero or the group ran past its timeout; the message holds every rank's
    log tail. An AssertionError, so a test fails with the logs and ``pytest.raises(AssertionError)``
    catches a crash the test provokes."""


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The env-var rendezvous of one rank on this machine (what torchrun or srun would set)."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def run_workers(args: list[str], nprocs: int, *, timeout: float = 300, env: dict | None = None,
                cwd: Path | None = None, threads_per_rank: int = 1, echo_prefix: str | None = None) -> list[str]:
    """Run ``python <args>`` as ``nprocs`` ranks; returns each rank's output (stdout and stderr).

    ``env`` is added to this process's environment; the repository goes first on PYTHONPATH and
    each rank runs ``threads_per_rank`` OpenMP threads. Rank 0's lines that start with
    ``echo_prefix`` are printed while it runs (a benchmark's progress).

    Raises :class:`RanksFailed` with the logs if any rank exits non-zero or the group exceeds
    ``timeout``: a rank that dies makes the others exit through the gloo timeout or our kill,
    never a hang.
    """
    port = free_port()
    procs, logs = [], []
    for rank in range(nprocs):
        penv = dict(os.environ)
        penv.update(env or {})
        penv.update(rank_env(rank, nprocs, port))
        penv.update({"OMP_NUM_THREADS": str(threads_per_rank),
                     "PYTHONPATH": f"{REPO}{os.pathsep}{penv.get('PYTHONPATH', '')}"})
        log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"ds_relora_rank{rank}_{port}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, *args], env=penv, stdout=log, stderr=subprocess.STDOUT,
                                      cwd=str(cwd or REPO)))
    deadline = time.time() + timeout
    failed, shown = None, 0
    try:
        while any(p.poll() is None for p in procs):
            shown = _echo_new(logs[0], shown, echo_prefix)
            if time.time() > deadline:
                failed = f"timeout after {timeout:g}s"
                break
            bad = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if bad:
                # Give the others a moment to notice, then stop them: no hangs.
                time.sleep(2)
                failed = f"rank {bad[0]} exited with {procs[bad[0]].returncode}"
                break
            time.sleep(0.2)
    finally:
        # Also when pytest-timeout or Ctrl-C interrupts us: never leave ranks behind.
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    _echo_new(logs[0], shown, echo_prefix)
    outs = []
    for log in logs:
        log.seek(0)
        outs.append(log.read())
        log.close()
        os.unlink(log.name)
    if failed is None and any(p.returncode != 0 for p in procs):
        failed = "a rank exited non-zero"
    if failed is not None:
        failed += f" (exit codes {[p.returncode for p in procs]})"
        raise RanksFailed(f"{failed}\n" + "\n".join(f"--- rank {i} ---\n{o[-6000:]}" for i, o in enumerate(outs)))
    return outs


def _echo_new(log, shown: int, prefix: str | None) -> int:
    """Print rank 0's new lines that start with ``prefix``; returns the new read offset."""
    if prefix is None:
        return shown
    log.flush()
    log.seek(shown)
    text = log.read()
    for line in text.splitlines():
        if line.startswith(prefix):
            print(line, flush=True)
    return shown + len(text.encode()) if text else shown


def results(outs: list[str], tag: str = RESULT_TAG) -> list[dict]:
    """Parse the ``RESULT {json}`` lines each rank printed."""
    parsed = []
    for out in outs:
        for line in out.splitlines():
            if line.startswith(tag):
                parsed.append(json.loads(line[len(tag):]))
    return parsed
