"""One writer per run folder: an advisory ``flock`` on ``run_dir/.ds-relora.lock``.

Two runs on one run folder overwrite each other's checkpoints and interleave metrics.jsonl.
``ds-relora train`` takes the lock before it writes anything and keeps it for the run's life
(it stays the launcher's parent until the launcher exits); the workers it
starts get the lock's id on their command line (``--run-lock``) and run under it. A worker
started by hand (srun, torchrun) has no id and takes the lock itself on rank 0.

The file names its holder (host, pid, since). The kernel drops a flock when its holder dies, so
a lock left by a crashed run is taken over at once, with a one-line notice.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

from ds_relora.errors import UserError
from ds_relora.run_folder import LOCK as LOCK_NAME  # the lock file's name, owned by run_folder

# Filesystems without flock (some Lustre/NFS mounts): the run goes on without the guard.
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunLockError(UserError):
    """The run folder is locked by another live run."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _read(path: Path) -> dict | None:
    try:
        info = json.loads(Path(path).read_text() or "null")
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def describe(info: dict | None) -> str:
    if not info:
        return "a process that did not say which"
    since = info.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pid {info.get('pid')} on host {info.get('host')} since {when}"


def _try_flock(fd: int) -> bool | None:
    """True: locked; False: another holder; None: this filesystem cannot lock."""

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in _NO_LOCKING:
            return None
        raise


class RunLock:
    """The lock of one run folder, held until :meth:`release` or the process ends."""

    def __init__(self, fd: int, path: Path, info: dict):
        self.fd, self.path, self.info = fd, path, info

    @property
    def token(self) -> str:
        return self.info["id"]

    def release(self) -> None:
        """Mark the run ended (no stale-lock notice for the next run) and unlock."""
        if self.fd < 0:
            return
        try:
            _write(self.fd, {**self.info, "released": time.time()})
        except OSError:
            pass
        os.close(self.fd)  # closing the last descriptor drops the flock
        self.fd = -1


def _write(fd: int, info: dict) -> None:
    data = json.dumps(info).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def acquire(run_dir: str | Path, token: str | None = None, log: Callable[[str], None] = _stderr) -> RunLock | None:
    """Take ``run_dir``'s lock; None when it is held under ``token`` (the parent that started
    this worker) or the filesystem cannot lock. RunLockError (one line, naming the holder) when
    another run holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    got = _try_flock(fd)
    previous = _read(path)
    if got is None:
        os.close(fd)
        log(f"warning: {run_dir} is on a filesystem without flock: a second run on it would not be stopped")
        return None
    if not got:
        os.close(fd)
        if token and previous and previous.get("id") == token:
            return None
        raise RunLockError(f"{run_dir} is in use by another run ({describe(previous)}): wait for it to end or stop "
                           "it, or give this run another train.run_dir")
    if previous and not previous.get("released") and previous.get("id") != token:
        log(f"note: taking over the lock of {run_dir} left by {describe(previous)}, which no longer holds it "
            "(it ended without releasing it)")
    info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "id": uuid.uuid4().hex}
    try:
        _write(fd, info)
    except OSError:
        os.close(fd)
        raise
    return RunLock(fd, path, info)


def state(run_dir: str | Path) -> str:
    """``--dry-run``'s line: who holds ``run_dir``'s lock (without taking it)."""
    path = Path(run_dir) / LOCK_NAME
    if not path.is_file():
        return "free"
    previous = _read(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        return f"unknown ({exc.strerror})"
    try:
        got = _try_flock(fd)
    finally:
        os.close(fd)
    if got is None:
        return "not enforced (this filesystem has no flock)"
    if not got:
        return f"held by {describe(previous)}: this run would stop with an error"
    if previous and not previous.get("released"):
        return f"stale (left by {describe(previous)}, no longer held): this run would take it over"
    return "free"


def mark_released(run_dir: str | Path, token: str) -> None:
    """A worker that ran under its parent's lock ends cleanly: say so in the file, so the next
    run takes the lock silently once the launcher has exited."""
    path = Path(run_dir) / LOCK_NAME
    info = _read(path)
    if info and info.get("id") == token:
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return
        try:
            _write(fd, {**info, "released": time.time()})
        except OSError:
            pass
        finally:
            os.close(fd)


def hold_in_workers(run_dir: str | Path, token: str | None) -> RunLock | None:
    """Collective: rank 0 takes the lock (or finds it held under ``token``); every rank raises
    rank 0's RunLockError, so no rank starts on a folder another run writes."""
    import torch.distributed as dist  # noqa: PLC0415  (torch takes seconds to import; this module is on the CLI's start-up path)

    lock, error = None, [None]
    if dist.get_rank() == 0:
        try:
            lock = acquire(run_dir, token)
        except UserError as exc:
            error = [str(exc)]
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise RunLockError(error[0])
    return lock
