"""Fault injection for the reliability tests, in one place.

``DS_RELORA_FAULT=<point>:<step>`` (e.g. ``save:16``, ``merge:16``, ``signal:5``, ``error:5``)
makes rank ``DS_RELORA_FAULT_RANK`` (default 1) act at that point of that global step: ``save``
and ``merge`` kill the process with SIGKILL (a node crash), ``signal`` sends it SIGUSR1 (what
SLURM sends before a time limit), ``error`` raises an exception (a bug or a bad batch in one rank;
the step loop's point, like ``signal``), ``hold`` waits there until the file named by
``DS_RELORA_FAULT_RELEASE`` exists (a run that is certainly still running while a test acts). Unset, :func:`fault_point` is a dictionary lookup.

One-process commands have no rank: :func:`fault_point_local` (``prepare:<n>``, after
prepare-data's n-th checkpoint) kills the calling process itself.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def fault_point(point: str, step: int) -> None:
    spec = os.environ.get("DS_RELORA_FAULT")
    if not spec or spec != f"{point}:{step}":
        return
    import torch.distributed as dist  # noqa: PLC0415  (torch takes seconds to import; this module is on the CLI's start-up path)

    if dist.get_rank() != int(os.environ.get("DS_RELORA_FAULT_RANK", "1")):
        return
    if point == "hold":
        release, deadline = Path(os.environ["DS_RELORA_FAULT_RELEASE"]), time.time() + 600
        while not release.exists() and time.time() < deadline:
            time.sleep(0.05)
        return
    if point == "error":
        raise ValueError(f"injected fault at step {step} (DS_RELORA_FAULT={spec})")
    os.kill(os.getpid(), signal.SIGUSR1 if point == "signal" else signal.SIGKILL)


def fault_point_local(point: str, step: int) -> None:
    """:func:`fault_point` for a process outside any process group: SIGKILL, no rank check."""
    if os.environ.get("DS_RELORA_FAULT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
