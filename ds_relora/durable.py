"""Durable files: fsync of files and folders, atomic replace, whole-file hashing while writing.

Shared by every writer of run folders (checkpoints, tensor sets, exports); the checkpoint format
(:mod:`ds_relora.checkpoint.format`) decides *what* is written, this module only *how* it reaches
the disk intact.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

WHOLE_HASH = "xxh3_128"  # format 4's manifest key: the hash of every byte of the file
_READ_CHUNK = 8 << 20


def _fsync_path(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except FileNotFoundError:
        return  # another rank's temp file, renamed meanwhile: its writer syncs the result
    try:
        os.fsync(fd)
    except OSError:
        if not directory:  # some filesystems refuse fsync on a directory; file data must sync
            raise
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    _fsync_path(Path(path), directory=True)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (and ``folder`` itself), leaves first."""
    for dirpath, _, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync_path(Path(dirpath) / name)
        fsync_dir(Path(dirpath))


def public_mode(path: Path) -> None:
    """Give a file the mode an ordinary ``open()`` would (0666 minus the umask): safetensors
    creates 0600 files, unreadable for the rest of a shared cluster."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_atomic(path: Path, data: bytes | str) -> None:
    # A per-process temp name: several nodes may write the same file on a shared filesystem.
    tmp = path.with_name(f"{path.name}.tmp.{socket.gethostname()}.{os.getpid()}")
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _new_hash():
    # xxh3-128 (xxhash, a dependency of datasets): ~10x blake2b's speed, so hashing every byte
    # costs a save and a resume little next to the disk; 128 bits leave no realistic collision.
    import xxhash  # noqa: PLC0415  (optional dependency: imported only where it is used)

    return xxhash.xxh3_128()


class HashingFile:
    """A binary file object that hashes and counts every byte written through it: the save's
    whole-file hash without reading the file back. Deliberately has no ``fileno`` (so that
    ``torch.save`` writes through :meth:`write`, not around it)."""

    def __init__(self, raw):
        self.raw, self.hash, self.size = raw, _new_hash(), 0
        self.error: OSError | None = None  # torch.save reports a failed write as a RuntimeError

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.hash.update(view)
        self.size += view.nbytes
        done = 0
        try:
            while done < view.nbytes:  # a nearly full disk takes part of a write, then refuses
                n = self.raw.write(view[done:])
                if not n:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += n
        except OSError as exc:
            self.error = self.error or exc
            raise
        return done

    def flush(self) -> None:
        self.raw.flush()

    def record(self) -> dict:
        return {"size": self.size, WHOLE_HASH: self.hash.hexdigest()}


def whole_file_hash(path: Path) -> str:
    h = _new_hash()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_READ_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()
