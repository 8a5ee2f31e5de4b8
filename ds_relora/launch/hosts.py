"""Hostfiles and SLURM nodelists: reading, writing and expanding them, SLURM's rank variables, and
the rendezvous port (checked, derived from a job id, or any free one).

Used by :mod:`ds_relora.launch.launchers` (plans and ``python -m ds_relora.launch`` helpers) and the shell
launchers; every malformed input is a one-line LaunchError.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

from ds_relora.config import LaunchConfig
from ds_relora.errors import LaunchError

DEFAULT_PORT = LaunchConfig().master_port

def parse_hostfile(path: str | os.PathLike) -> dict[str, int]:
    """``{host: slots}`` in file order from an MPI-style hostfile (``host slots=N`` lines)."""
    p = Path(path)
    if not p.is_file():
        raise LaunchError(f"hostfile {p} does not exist: write it (launchers/make_hostfile.sh) or fix launch.hostfile")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise LaunchError(f"hostfile {p} is unreadable ({exc.__class__.__name__}): fix its permissions or path") from None
    pool: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots=(\d+)(\s+\w+=\S+)*", line)
        if not m or int(m.group(2)) < 1:
            raise LaunchError(f"hostfile {p} line {lineno} {raw.strip()!r} is malformed: write 'hostname slots=N' with N >= 1")
        if m.group(1) in pool:
            raise LaunchError(f"hostfile {p} lists host {m.group(1)} twice (line {lineno}): keep one line per host")
        pool[m.group(1)] = int(m.group(2))
    if not pool:
        raise LaunchError(f"hostfile {p} lists no hosts: add one 'hostname slots=N' line per node")
    return pool


def hostfile_text(hosts: Sequence[str], slots: int) -> str:
    if not hosts:
        raise LaunchError("no hosts given for the hostfile: pass --hosts, --nodelist or run inside a SLURM job")
    if len(set(hosts)) != len(hosts):
        raise LaunchError(f"host list {','.join(hosts)} has duplicates: list each node once")
    if slots < 1:
        raise LaunchError(f"slots={slots} per host is invalid: use the number of GPUs per node (>= 1)")
    return "".join(f"{h} slots={slots}\n" for h in hosts)


def write_hostfile(hosts: Sequence[str], slots: int, path: str | os.PathLike) -> str:
    """Write ``host slots=N`` lines to ``path`` and return the text."""
    text = hostfile_text(hosts, slots)
    _write_hostfile_text(path, text)
    return text


def _write_hostfile_text(path: str | os.PathLike, text: str) -> None:
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    except OSError as exc:
        raise LaunchError(f"cannot write hostfile {p} ({exc.strerror}): choose a writable path on a shared filesystem") from None


_ITEM = r"[^,\[\]]*(?:\[[^\[\]]+\][^,\[\]]*)*"


def _expand_item(item: str, expr: str) -> list[str]:
    m = re.match(r"([^\[]*)\[([^\]]*)\](.*)", item)
    if not m:
        return [item]
    prefix, body, rest = m.groups()
    values = []
    for rng in body.split(","):
        lo, _, hi = rng.partition("-")
        if not lo.isdigit() or not (hi or lo).isdigit() or int(hi or lo) < int(lo):
            raise LaunchError(f"nodelist {expr!r} has a bad range [{body}]: write ranges as [01-03,07]")
        values += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi or lo) + 1)]
    return [prefix + v + t for v in values for t in _expand_item(rest, expr)]


def expand_nodelist(expr: str) -> list[str]:
    """Expand a SLURM nodelist such as ``gpu[01-03,07],cpu5`` (our own parser, no scontrol)."""
    expr = expr.strip()
    if not re.fullmatch(f"{_ITEM}(?:,{_ITEM})*", expr) or "" in (items := re.findall(f"(?:^|,)({_ITEM})", expr)):
        raise LaunchError(f"nodelist {expr!r} is malformed (empty entry or unbalanced brackets): use SLURM's host[01-03,07],other form")
    return [h for item in items for h in _expand_item(item, expr)]


# ---------------------------------------------------------------- SLURM

def slurm_port(job_id: str) -> int:
    """Rendezvous port from the job id, so two jobs sharing a node rarely collide (15000-29999)."""
    digits = re.sub(r"\D", "", job_id)
    return 15000 + int(digits or "0") % 15000


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel picks it): the rendezvous port of a
    one-node run, a one-rank check or a test's ranks. Another process may take it before ours
    binds it, so callers that can retry should."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_var(env: Mapping[str, str], *names: str) -> str:
    for n in names:
        if env.get(n):
            return env[n]
    raise LaunchError(f"{names[0]} is not set: run this under srun inside a SLURM allocation (sbatch or salloc)")


def slurm_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT of this srun task from SLURM's variables."""
    out = {"RANK": _slurm_var(env, "SLURM_PROCID"), "LOCAL_RANK": _slurm_var(env, "SLURM_LOCALID"),
           "WORLD_SIZE": _slurm_var(env, "SLURM_NTASKS", "SLURM_NPROCS")}
    for k, v in out.items():
        if not v.isdigit():
            raise LaunchError(f"SLURM gives {k}={v!r}, not a number: run this under srun, not directly in the batch script")
    out["LOCAL_RANK"] = _task_device(env, int(out["LOCAL_RANK"]))
    hosts = expand_nodelist(_slurm_var(env, "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
    job = _slurm_var(env, "SLURM_JOB_ID", "SLURM_JOBID")
    out["MASTER_ADDR"] = env.get("MASTER_ADDR") or hosts[0]
    out["MASTER_PORT"] = str(check_port(env.get("MASTER_PORT") or slurm_port(job), "MASTER_PORT"))
    return out


def _task_device(env: Mapping[str, str], local_id: int) -> str:
    """LOCAL_RANK for an srun task: the worker and DeepSpeed use GPU ``LOCAL_RANK`` of the GPUs
    the task sees. With per-task binding (--gpus-per-task=1, --gpu-bind) every task sees just its
    own GPU, as device 0, while SLURM_LOCALID still counts the tasks of the node."""
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not visible or local_id < len(visible):
        return str(local_id)
    if len(visible) == 1:
        return "0"
    raise LaunchError(f"this srun task (SLURM_LOCALID={local_id}) sees {len(visible)} GPUs (CUDA_VISIBLE_DEVICES="
                      f"{','.join(visible)}) but ds_relora runs one rank per GPU: use --gpus-per-task=1, or "
                      "--gpus-per-node without per-task binding")


def check_port(port: int | str, what: str = "launch.master_port") -> int:
    try:
        value = int(port)
    except (TypeError, ValueError):
        value = -1
    if not 1024 <= value <= 65535:
        raise LaunchError(f"{what}={port} is not a usable port: choose an unprivileged TCP port in 1024-65535 (default {DEFAULT_PORT})")
    return value
