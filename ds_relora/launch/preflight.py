"""Checks a launch makes before any rank starts, each failing with one line: the master address
resolves, the port is free, rank 0's rendezvous is reachable from this node (seconds, not the
process-group timeout), and which MPI ``mpirun`` belongs to."""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import time
from collections.abc import Mapping

from ds_relora.errors import LaunchError


def _resolves(addr: str) -> str | None:
    try:
        socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)
        return None
    except (socket.gaierror, UnicodeError) as exc:
        return f"master address {addr!r} does not resolve from this node ({exc}): set launch.master_addr to rank 0's IP or resolvable name"


def _port_busy(port: int) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
            return None
        except OSError:
            return f"master port {port} is already in use on this node: pick another with --set launch.master_port=N"


def check_master_reachable(addr: str, port: int, timeout: float = 60.0) -> None:
    """Return once ``addr:port`` accepts a TCP connection; raise LaunchError after ``timeout`` s.

    A refused connection is retried (rank 0 may still be importing torch); an unreachable
    network fails at once, so a node behind a firewall stops in seconds instead of hanging in
    the rendezvous for the whole process-group timeout.
    """
    if err := _resolves(addr):
        raise LaunchError(err)
    deadline, last = time.monotonic() + timeout, "timed out"
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((addr, port), timeout=max(0.2, min(left, 3.0))):
                return
        except OSError as exc:
            last = os.strerror(exc.errno) if exc.errno else "timed out"
            fatal = exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH)
        if fatal or time.monotonic() >= deadline:
            raise LaunchError(f"cannot reach master {addr}:{port} from this node ({last}): check --master_addr/firewall")
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def detect_mpi_flavor(mpirun: str = "mpirun", env: Mapping[str, str] = os.environ) -> str:
    """'openmpi' or 'mpich' (Hydra: MPICH, Intel MPI, MVAPICH) from ``mpirun --version``."""
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=20, env=dict(env)).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise LaunchError(f"`{mpirun} --version` failed ({exc}): set launch.mpi_flavor to openmpi or mpich") from None
    if re.search(r"Open MPI|OpenRTE|Open RTE|PRRTE", out):
        return "openmpi"
    if re.search(r"HYDRA|MPICH|Intel\(R\) MPI|MVAPICH", out, re.I):
        return "mpich"
    raise LaunchError(f"cannot tell which MPI `{mpirun} --version` belongs to: set launch.mpi_flavor to openmpi or mpich")
