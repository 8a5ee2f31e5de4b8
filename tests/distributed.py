"""Start N local worker processes (gloo on CPU) with torch.distributed env vars and a hang timeout."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(args: list[str], nprocs: int, *, timeout: float = 300, env: dict | None = None,
                cwd: Path | None = None) -> list[str]:
    """Run ``python <args>`` as ``nprocs`` ranks; returns each rank's stdout.

    Fails (AssertionError with the logs) if any rank exits non-zero or the group exceeds ``timeout``:
    a rank that dies makes the others exit through the gloo timeout or our kill, never a hang.
    """
    port = free_port()
    procs = []
    logs = []
    for rank in range(nprocs):
        penv = dict(os.environ)
        penv.update(env or {})
        penv.update({
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nprocs),
            "LOCAL_SIZE": str(nprocs), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{penv.get('PYTHONPATH', '')}",
        })
        log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"ds_relora_rank{rank}_{port}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, *args], env=penv, stdout=log, stderr=subprocess.STDOUT,
                                      cwd=str(cwd or REPO)))
    deadline = time.time() + timeout
    failed = None
    try:
        while any(p.poll() is None for p in procs):
            if time.time() > deadline:
                failed = f"timeout after {timeout}s"
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
    assert failed is None, f"{failed}\n" + "\n".join(f"--- rank {i} ---\n{o[-6000:]}" for i, o in enumerate(outs))
    return outs


def results(outs: list[str], tag: str = "RESULT ") -> list[dict]:
    """Parse the ``RESULT {json}`` lines each rank printed."""
    parsed = []
    for out in outs:
        for line in out.splitlines():
            if line.startswith(tag):
                parsed.append(json.loads(line[len(tag):]))
    return parsed
