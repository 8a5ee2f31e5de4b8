"""Packing tokenized documents into the prepared shards, with resume checkpoints and progress.

``pack`` reads ``(flat, lengths)`` chunks of tokenized documents (from this process or from
the ``tokenize_pool`` workers, in source order) and decides everything that makes the output
what it is: the split of each document (a hash of its index, ``is_validation``), the exact
``max_tokens`` cut, the newest document held back so that an empty split can still get one,
and the shard boundaries. Its whole state is what a resume checkpoint (``_progress.json``)
saves; :mod:`ds_relora.data.prepare` owns the folders around it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ds_relora.config import PrepareConfig
from ds_relora.data.dataset import SPLITS
from ds_relora.data.tokenize_pool import Chunk, encode_documents, encode_in_order
from ds_relora.data.tokenizer import encode_batch, id_bound, token_dtype
from ds_relora.errors import DataError
from ds_relora.faults import fault_point_local

Log = Callable[[str], None]

# Documents per tokenizer call: large enough for Rust-side parallelism, small enough for memory.
_BATCH_DOCS = 1024
_BATCH_CHARS = 8_000_000
_MASK64 = (1 << 64) - 1
# Seconds between resume checkpoints (each fsyncs the open shards: cheap at this interval).
CHECKPOINT_SECONDS = 60.0
# Seconds between progress lines when stderr is not a terminal (a log file gets lines, not a bar).
PROGRESS_SECONDS = 30.0
PROGRESS_FILE = "_progress.json"


def write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def no_documents(cfg: PrepareConfig) -> DataError:
    return DataError(
        f"no documents found in source {cfg.source!r} (field {cfg.text_field!r}): "
        "check prepare.source and prepare.text_field, blank texts are skipped"
    )


def is_validation(seed: int, index: int, val_fraction: float) -> bool:
    """Split of document ``index``: a hash of (seed, index), so it needs no document count."""
    x = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    # splitmix64 finalizer: consecutive indices map to independent-looking uniforms.
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return x / 2.0**64 < val_fraction


class _ShardWriter:
    """Appends token arrays to ``{split}_{k:05d}.bin`` files of at most ``shard_tokens`` tokens."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[str] = []
        self.tokens = 0
        self.documents = 0
        self._file = None
        self._in_shard = 0

    def write(self, ids: np.ndarray) -> None:
        self.documents += 1
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if self._file is None or self._in_shard == self.shard_tokens:
                self._open_next()
            chunk = ids[: self.shard_tokens - self._in_shard]
            self._file.write(chunk.data)  # the array's own buffer: a long document is not copied again
            self._in_shard += len(chunk)
            self.tokens += len(chunk)
            ids = ids[len(chunk):]

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self.shards.append(name)
        self._file = open(self.folder / name, "wb", buffering=1 << 20)
        self._in_shard = 0

    def sync(self) -> None:
        """Make everything written so far durable (before a checkpoint records it)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def state(self) -> dict:
        return {"shards": list(self.shards), "tokens": self.tokens, "documents": self.documents, "in_shard": self._in_shard}

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint: the last shard is cut back to the tokens it had then, and
        shards begun after it are removed."""
        self.shards, self.tokens, self.documents = list(state["shards"]), state["tokens"], state["documents"]
        self._in_shard = state["in_shard"]
        for path in self.folder.glob(f"{self.split}_*.bin"):
            if path.name not in self.shards:
                path.unlink()
        if self.shards:
            self._file = open(self.folder / self.shards[-1], "r+b", buffering=1 << 20)
            self._file.truncate(self._in_shard * self.dtype.itemsize)
            self._file.seek(0, os.SEEK_END)

    def close(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None


def _batches(docs: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in docs:
        batch.append(text)
        chars += len(text)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encoded_chunks(docs: Iterable[str], tok, eos: int, dtype: np.dtype, workers: int) -> Iterator[Chunk]:
    """``(flat, lengths)`` per batch of documents, in source order, from 1 or more processes."""
    if workers == 1:
        # A lambda, not encode_batch itself: the module attribute is looked up per call (tests replace it).
        return (encode_documents(lambda texts: encode_batch(tok, texts), batch, eos, dtype) for batch in _batches(docs))
    return encode_in_order(_batches(docs), tok, eos, dtype, workers)


class _Packer:
    """Per-document packing: the split of each document, the exact ``max_tokens`` cut, and the
    newest document held back so that, at the end, it can go to a split that is still empty.

    Its whole state (``state``/``restore``) is what a resume checkpoint saves.
    """

    def __init__(self, cfg: PrepareConfig, folder: Path, dtype: np.dtype):
        self.cfg, self.dtype = cfg, dtype
        self.writers = {s: _ShardWriter(folder, s, dtype, cfg.shard_tokens) for s in SPLITS}
        self.pending: tuple[np.ndarray, str] | None = None
        self.index = self.total = self.skipped = 0

    @property
    def done(self) -> bool:
        return self.cfg.max_tokens is not None and self.total >= self.cfg.max_tokens

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Pack one chunk; stops inside it once ``max_tokens`` is reached (see ``done``)."""
        cfg, end = self.cfg, 0
        for n in lengths.tolist():
            start, end = end, end + n
            split = "validation" if is_validation(cfg.seed, self.index, cfg.val_fraction) else "train"
            self.index += 1
            if n == 0:
                self.skipped += 1
                continue
            arr = flat[start:end]
            if cfg.max_tokens is not None:
                arr = arr[: cfg.max_tokens - self.total]
            self.total += len(arr)
            if self.pending is not None:
                self.writers[self.pending[1]].write(self.pending[0])
            self.pending = (arr, split)
            if self.done:
                return

    def finish(self) -> None:
        if self.pending is not None:
            self.writers[_last_split(self.pending[1], self.writers, self.cfg.val_fraction)].write(self.pending[0])
            self.pending = None

    def sync(self) -> None:
        for w in self.writers.values():
            w.sync()

    def close(self) -> None:
        for w in self.writers.values():
            w.close()

    def state(self) -> dict:
        pending = None
        if self.pending is not None:
            data = self.pending[0].astype(self.dtype, copy=False).tobytes()
            pending = {"split": self.pending[1], "tokens": base64.b64encode(data).decode("ascii")}
        return {"documents_read": self.index, "tokens": self.total, "skipped": self.skipped, "pending": pending,
                "writers": {s: w.state() for s, w in self.writers.items()}}

    def restore(self, state: dict) -> None:
        self.index, self.total, self.skipped = state["documents_read"], state["tokens"], state["skipped"]
        if state["pending"] is not None:
            arr = np.frombuffer(base64.b64decode(state["pending"]["tokens"]), dtype=self.dtype)
            self.pending = (arr, state["pending"]["split"])
        for s, w in self.writers.items():
            w.restore(state["writers"][s])


class _Checkpoints:
    """Writes the packer's state to ``_progress.json`` at most every ``CHECKPOINT_SECONDS``."""

    def __init__(self, folder: Path, fingerprint: str):
        self.folder, self.fingerprint = folder, fingerprint
        self.count = 0
        self.last = 0.0

    def write(self, packer: _Packer) -> None:
        packer.sync()  # the shards hold at least what the checkpoint says before it says so
        record = {"fingerprint": self.fingerprint, **packer.state()}
        tmp = self.folder / (PROGRESS_FILE + ".tmp")
        write_durable(tmp, json.dumps(record).encode())
        os.replace(tmp, self.folder / PROGRESS_FILE)
        self.last = time.perf_counter()
        fault_point_local("prepare", self.count)  # DS_RELORA_FAULT=prepare:N kills right after checkpoint N
        self.count += 1

    def maybe_write(self, packer: _Packer) -> None:
        if time.perf_counter() - self.last >= CHECKPOINT_SECONDS:
            self.write(packer)


class _Progress:
    """Documents, tokens and tokens/s on stderr: a tqdm bar on a terminal, else one line every
    ``PROGRESS_SECONDS`` (a log file gets a few lines, not a bar redrawn many times a second)."""

    def __init__(self, packer: _Packer, total_tokens: int | None):
        self.packer = packer
        self.first_tokens = packer.total  # a resumed run's rate counts only its own tokens
        self.started = self.last = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm  # noqa: PLC0415  (tqdm is needed only here)

            self.bar = tqdm(total=total_tokens, initial=packer.total, desc="prepare-data", unit="tok", unit_scale=True,
                            file=sys.stderr, mininterval=1.0, dynamic_ncols=True)

    def update(self) -> None:
        p = self.packer
        if self.bar is not None:
            self.bar.update(p.total - self.bar.n)
            return
        now = time.perf_counter()
        if now - self.last >= PROGRESS_SECONDS:
            self.last = now
            rate = (p.total - self.first_tokens) / (now - self.started)
            print(f"prepare-data: {p.index:,} documents, {p.total:,} tokens, {rate:,.0f} tokens/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def pack(docs: Iterable[str], tok, cfg: PrepareConfig, folder: Path, log: Log, checkpoint: dict | None,
          fingerprint: str) -> dict:
    vocab_size = id_bound(tok)
    dtype = token_dtype(vocab_size)
    eos = int(tok.eos_token_id)
    packer = _Packer(cfg, folder, dtype)
    if checkpoint is not None:
        packer.restore(checkpoint)
    checkpoints = _Checkpoints(folder, fingerprint)
    progress = _Progress(packer, cfg.max_tokens)
    try:
        checkpoints.write(packer)  # the first one saves the tokenizer's training time
        if not packer.done:
            with contextlib.closing(_encoded_chunks(docs, tok, eos, dtype, cfg.num_workers)) as chunks:
                for flat, lengths in chunks:
                    packer.add(flat, lengths)
                    progress.update()
                    if packer.done:
                        break
                    checkpoints.maybe_write(packer)
        packer.finish()
    finally:
        packer.close()
        progress.close()
    index, total = packer.index, packer.total
    if index == 0:
        raise no_documents(cfg)
    if total == 0:
        raise DataError(
            f"the {index} documents of {cfg.source!r} tokenize to zero tokens: "
            "check prepare.text_field and that the tokenizer fits the text"
        )
    if packer.skipped:
        log(f"skipped {packer.skipped} documents that tokenize to nothing")
    if cfg.max_tokens is not None and total < cfg.max_tokens:
        log(f"note: the corpus ran out at {total:,} tokens, before prepare.max_tokens={cfg.max_tokens:,}")
    writers = packer.writers
    return {
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "tokens": total,
        "num_tokens": {s: w.tokens for s, w in writers.items()},
        "shards": {s: w.shards for s, w in writers.items()},
        "num_documents": {s: w.documents for s, w in writers.items()},
    }


def _last_split(hashed: str, writers: dict, val_fraction: float) -> str:
    train, val = writers["train"].documents, writers["validation"].documents
    if train + val == 0:
        return "train"  # a single document must be trainable
    if val_fraction > 0 and val == 0:
        return "validation"
    if train == 0:
        return "train"
    return hashed
