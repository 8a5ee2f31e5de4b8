"""Disk errors as one line: the path, what is needed and the fix.

A full disk, an exceeded quota, a read-only mount or a folder without write permission surfaces
deep inside ``torch.save``, safetensors or a copy as an ``OSError`` and a traceback; the user
needs the path, the space a write needs next to what is free there, and what to change.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
from pathlib import Path

from ds_relora.display import human_bytes
from ds_relora.errors import UserError

NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}
DISK_ERRNOS = NO_SPACE | NOT_WRITABLE


class DiskError(UserError):
    """A write refused by the filesystem (no space, quota, read-only, permission)."""


def is_disk_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_ERRNOS


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int | None:
    """Bytes this user may still write on the filesystem of ``path`` (or of its nearest existing parent)."""
    try:
        return shutil.disk_usage(_existing(Path(path))).free
    except OSError:
        return None


def disk_error(exc: OSError, path: str | Path | None = None, *, needed: int | None = None,
               setting: str = "the output folder") -> DiskError:
    """The one-line DiskError for ``exc``; ``needed`` is what the whole write takes, ``setting``
    the option that moves it elsewhere."""
    # A copy names its source first and its destination second: the destination is what failed.
    path = Path(exc.filename2 or exc.filename or path or ".")
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if exc.errno in NO_SPACE:
        free = free_bytes(path)
        room = []
        if needed is not None:
            room.append(f"needs about {human_bytes(needed)}")
        if free is not None:
            room.append(f"{human_bytes(free)} free there")
        what = f" ({', '.join(room)})" if room else ""
        fix = f"free space (or raise the quota) there, or point {setting} at a disk with room"
    else:
        what = f" (on host {socket.gethostname()})"
        fix = f"make it writable for this user, or point {setting} at a writable folder"
    return DiskError(f"cannot write {path}: {reason}{what}: {fix}")


def check_writable(folder: str | Path, setting: str) -> None:
    """Create and delete a file in ``folder`` (or the nearest existing parent it would be made
    in): catches read-only mounts and permissions (``os.access`` does not, for root)."""
    where = _existing(Path(folder))
    probe = where / f".ds-relora-write-test.{socket.gethostname()}.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"x")
    except OSError as exc:
        if is_disk_error(exc):
            raise disk_error(exc, setting=setting) from None
        raise
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def check_free_space(folder: str | Path, needed: int, setting: str, what: str = "a checkpoint") -> str | None:
    """DiskError when ``folder``'s filesystem has less free space than ``needed``; a one-line
    warning (returned) when it has less than twice that (a save keeps the previous one until
    the new one is complete)."""
    free = free_bytes(folder)
    if free is None or needed <= 0:
        return None
    if free < needed:
        raise DiskError(f"{folder} has {human_bytes(free)} free but {what} needs about {human_bytes(needed)}: free "
                        f"space there, or point {setting} at a disk with room")
    if free < 2 * needed:
        return (f"warning: {folder} has {human_bytes(free)} free, less than two checkpoints ({human_bytes(2 * needed)}; "
                f"one is about {human_bytes(needed)}): a save after the first may fail; free space or set train.keep_last")
    return None
