"""Safetensors files written one tensor at a time, and Hugging Face sharded sets read one tensor
at a time.

A ds_relora checkpoint's weights are written by the ranks that hold them, parameter by
parameter, as they are gathered: no process ever holds a whole model. The layout is Hugging
Face's sharded one (``<prefix>-0000k-of-0000n.safetensors`` + ``<prefix>.safetensors.index.json``
with ``weight_map``), so ``transformers`` reads it as it is. :class:`TensorSet` reads that layout,
a single ``<prefix>.safetensors`` or any one named file, lazily (memory-mapped, per tensor).
"""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ds_relora.durable import HashingFile, public_mode, write_atomic
from ds_relora.errors import CheckpointError

_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def shard_name(prefix: str, index: int, count: int) -> str:
    return f"{prefix}-{index + 1:05d}-of-{count:05d}.safetensors"


def index_name(prefix: str) -> str:
    return f"{prefix}.safetensors.index.json"


def nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


class StreamingWriter:
    """One safetensors file whose tensors (names, dtypes, shapes declared up front) are written in
    that order, each as soon as it exists; the header is written first. The file appears under its
    name only once complete (``close``: fsync, then rename). Every byte is hashed as it is written;
    ``close`` puts the file's size and hash in ``digests`` under its name (for the manifest)."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict | None = None,
                 digests: dict | None = None):
        self.path = Path(path)
        self.digests = digests
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.order = [name for name, _, _ in entries]
        self.spec = {name: (dtype, tuple(int(d) for d in shape)) for name, dtype, shape in entries}
        header, offset = {}, 0
        for name, dtype, shape in entries:
            size = nbytes(shape, dtype)
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(self.spec[name][1]), "data_offsets": [offset, offset + size]}
            offset += size
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
        self.total = offset
        self.next = 0
        self.rows = 0  # rows of the next tensor written so far (one written in row pieces)
        self.file = open(self.tmp, "wb")
        self.out = HashingFile(self.file)
        self.out.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write tensor ``name``, whole or as its next rows (a row-blocked weight is written one
        block at a time: ``row_blocks``); the next name is due once all its rows are written."""
        if self.next >= len(self.order) or self.order[self.next] != name:
            expected = self.order[self.next] if self.next < len(self.order) else "nothing"
            raise RuntimeError(f"{self.path.name}: wrote {name}, expected {expected}")
        dtype, shape = self.spec[name]
        t = tensor.detach().to("cpu", dtype).contiguous()
        whole = tuple(t.shape) == shape and not self.rows
        piece = t.dim() == len(shape) >= 1 and tuple(t.shape[1:]) == shape[1:] and 0 < self.rows + t.shape[0] <= shape[0]
        if not (whole or piece):
            raise RuntimeError(f"{self.path.name}: {name} has shape {tuple(t.shape)}, declared {shape}")
        if t.numel():
            self.out.write(t.reshape(-1).view(torch.uint8).numpy())
        self.rows = 0 if whole else self.rows + t.shape[0]
        if self.rows == (shape[0] if shape else 0) or whole:
            self.rows = 0
            self.next += 1

    def close(self) -> None:
        if self.next != len(self.order):
            raise RuntimeError(f"{self.path.name}: {len(self.order) - self.next} tensors were never written")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

        public_mode(self.tmp)
        os.replace(self.tmp, self.path)
        if self.digests is not None:
            self.digests[self.path.name] = self.out.record()

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:  # flushing the buffer fails again on a full disk; the file goes anyway
            pass
        self.tmp.unlink(missing_ok=True)


class BackgroundWriter:
    """Feeds tensors to :class:`StreamingWriter` s (by key) from one background thread through a
    queue of ``depth`` tensors, so a rank's disk writes (and their hashing and fsync) overlap the
    gathers of the next tensors. Peak extra host memory: ``depth`` queued tensors plus the one
    being written, and at most ``max_bytes`` of them with the gathered one when the caller
    :meth:`reserve` s before each gather. The first error in the thread stops the writing (the writers' temp files are
    removed; the rest of the queue is dropped) and is returned by :meth:`finish`; ``put`` never
    blocks the caller on a failed writer, so a rank keeps taking part in collective gathers."""

    def __init__(self, writers: dict[str, StreamingWriter], depth: int = 1, max_bytes: int | None = None):
        self.writers = writers
        self.error: BaseException | None = None
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.max_bytes = max_bytes
        self.pending = 0  # bytes queued or being written
        self.drained = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self.thread.start()

    def reserve(self, nbytes: int) -> None:
        """Wait until a tensor of ``nbytes`` fits next to what is queued and being written within
        ``max_bytes`` (or nothing is pending): call it before making the tensor, so a rank's
        save holds at most ``max_bytes`` of tensors (one alone may be larger)."""
        if self.max_bytes is None:
            return
        with self.drained:
            self.drained.wait_for(lambda: self.pending == 0 or self.pending + nbytes <= self.max_bytes
                                  or self.error is not None)

    def put(self, key: str, name: str, tensor: torch.Tensor) -> None:
        if self.error is None:
            with self.drained:
                self.pending += tensor.numel() * tensor.element_size()
            self.queue.put((key, name, tensor))

    def _written(self, tensor: torch.Tensor) -> None:
        with self.drained:
            self.pending -= tensor.numel() * tensor.element_size()
            self.drained.notify_all()

    def _abort(self) -> None:
        for w in self.writers.values():
            if not w.file.closed:
                w.abort()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                break
            if self.error is not None:
                continue  # drained: the caller may have queued more before it saw the error
            key, name, tensor = item
            try:
                self.writers[key].write(name, tensor)
            except BaseException as exc:  # handed to the caller's thread by finish
                self.error = exc
                self._abort()
            self._written(tensor)
            del item, tensor
        if self.error is None:
            try:
                for w in self.writers.values():
                    w.close()  # fsync, rename, digest: in this thread too
            except BaseException as exc:  # handed to the caller's thread by finish
                self.error = exc
                self._abort()

    def finish(self, abort: bool = False) -> BaseException | None:
        """Write what is queued and close every file (``abort``: remove them instead); the
        thread's first error, or None."""
        if abort and self.error is None:
            self.error = RuntimeError("aborted")
        self.queue.put(None)
        self.thread.join()
        if abort:
            self._abort()
            return None
        return self.error


def owners_by_bytes(sizes: list[int], parts: int) -> list[int]:
    """Split a sequence of tensors (their byte sizes, in order) into at most ``parts`` contiguous
    runs of about equal bytes: the owner index of each tensor (non-decreasing)."""
    total = max(1, sum(sizes))
    owners, before = [], 0
    for size in sizes:
        owners.append(min(parts - 1, (before + size // 2) * parts // total))
        before += size
    return owners


def write_index(folder: Path, prefix: str, weight_map: dict[str, str], total_size: int) -> None:

    write_atomic(Path(folder) / index_name(prefix),
                 json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2))


_FROM_CODE = {code: dtype for dtype, code in _DTYPES.items()}


class _File:
    """One safetensors file read with ``pread`` (no memory map: a rank's resident set then holds
    only the bytes it asked for, not the file's page cache)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        size = os.fstat(self.fd).st_size
        head = os.pread(self.fd, 8, 0)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated: pick another checkpoint")
        (length,) = struct.unpack("<Q", head)
        try:
            header = json.loads(os.pread(self.fd, length, 8))
        except ValueError:
            raise CheckpointError(f"{path} has a damaged header: pick another checkpoint") from None
        header.pop("__metadata__", None)
        self.base = 8 + length
        self.entries = {}
        for name, e in header.items():
            begin, end = e["data_offsets"]
            if self.base + end > size:
                raise CheckpointError(f"{path} is truncated ({name} ends past the file): pick another checkpoint")
            self.entries[name] = (_FROM_CODE[e["dtype"]], tuple(e["shape"]), begin, end)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor (all of it by default)."""
        dtype, shape, begin, end = self.entries[name]
        item = torch.empty((), dtype=dtype).element_size()
        count = (end - begin) // item
        stop = count if stop is None else min(stop, count)
        start = min(start, stop)
        buf = bytearray((stop - start) * item)
        view, offset = memoryview(buf), self.base + begin + start * item
        while view:
            n = os.preadv(self.fd, [view], offset)
            if n <= 0:
                raise CheckpointError(f"{self.path} is truncated: pick another checkpoint")
            view, offset = view[n:], offset + n
        flat = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        return flat.reshape(shape) if (start, stop) == (0, count) else flat

    def close(self) -> None:
        os.close(self.fd)


class TensorSet:
    """The tensors of a sharded set (``<prefix>.safetensors.index.json``), a single
    ``<prefix>.safetensors``, or one named file (``legacy``), read per tensor (or per flat range
    of one: a ZeRO-3 rank reads only its shard's bytes)."""

    def __init__(self, folder: str | Path, prefix: str, legacy: str | None = None):
        self.folder = Path(folder)
        index = self.folder / index_name(prefix)
        single = self.folder / f"{prefix}.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is damaged ({type(exc).__name__}): pick another checkpoint") from None
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            weight_map, files = None, [single.name]
        elif legacy and (self.folder / legacy).is_file():
            weight_map, files = None, [legacy]
        else:
            raise CheckpointError(f"{self.folder} holds neither {index.name} nor {single.name}"
                                  + (f" nor {legacy}" if legacy else "") +
                                  ": point at a complete checkpoints/step-N folder or an exported model folder")
        missing = [f for f in files if not (self.folder / f).is_file()]
        if missing:
            raise CheckpointError(f"{self.folder} lacks the shard {missing[0]} named by {index.name}: the checkpoint is "
                                  "incomplete; copy the missing file or pick another step-N folder")
        self._files = {f: _File(self.folder / f) for f in files}
        self._where = {}
        for f, handle in self._files.items():
            for key in handle.entries:
                self._where[key] = f
        if weight_map is not None:
            absent = [k for k, f in weight_map.items() if self._where.get(k) != f]
            if absent:
                raise CheckpointError(f"{self.folder}/{weight_map[absent[0]]} has no tensor {absent[0]} although "
                                      f"{index.name} says so: the shard is damaged; pick another step-N folder")
        self.files = files

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._files[self._where[name]].entries[name][1]

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(name)
        return self._files[self._where[name]].read(name)

    __getitem__ = get

    def get_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor ``name`` (fewer at its end), 1-D
        also when the range is the whole tensor (one ZeRO-3 rank's shard)."""
        return self._files[self._where[name]].read(name, start, stop).reshape(-1)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._where:
            yield name, self.get(name)

    def load_all(self) -> dict[str, torch.Tensor]:
        return dict(self.items())

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
