"""``prepare_data``: corpus -> tokenizer -> packed token shards + ``meta.json``.

Output layout (``format_version`` 1)::

    out_dir/tokenizer/            save_pretrained() of the tokenizer
    out_dir/train_00000.bin ...   flat little-endian token stream, EOS after every document
    out_dir/validation_00000.bin
    out_dir/meta.json             written last

Everything is built in the hidden sibling folder ``.<out_dir>.partial`` and moved into place
with ``os.replace``: a folder named ``out_dir`` with a ``meta.json`` is always complete.

Parallel: with ``prepare.num_workers`` > 1 the tokenizer is still trained here, in one process;
then worker processes tokenize batches of documents while this process reads the source and
packs the returned tokens in source order (``ds_relora.tokenize_pool``). Split choice, the
``max_tokens`` cut and shard boundaries are all decided here, so the output is byte-identical
to ``num_workers: 1``; settings that only change how the work is done (``EXECUTION_FIELDS``)
are left out of ``meta.json`` for the same reason. Slicing one source over several nodes is
not offered: one node's cores already tokenize faster than a streamed source is read.

Resume: while packing, a checkpoint (``_progress.json``: documents read, tokens and shard
sizes per split, the held-back document, a fingerprint of the settings and source files) is
written into the partial folder every ``CHECKPOINT_SECONDS``, right after the shard files are
fsynced. A run that is killed (SIGKILL, SIGTERM, node loss) or interrupted (Ctrl-C) keeps that
folder, and the same command run again truncates the shards to the checkpoint, skips the
documents already read (a streamed source is re-read, not re-tokenized) and continues with the
saved tokenizer; the result is the same bytes as an uninterrupted run. Different settings or
changed source files start over. A run that fails with an error removes the folder: the same
command would fail the same way. A lock on the folder keeps two runs from sharing it.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..config import PrepareConfig
from ..config_base import to_dict
from ..errors import ConfigError, DataError
from ..faults import fault_point_local
from ..tokenize_pool import Chunk, encode_in_order, flatten
from .corpus import open_documents, resolve_local_files, stdlib_files
from .dataset import FORMAT_VERSION, SPLITS
from .tokenizer import MIN_BPE_VOCAB, encode_batch, id_bound, load_pretrained_tokenizer, token_dtype, train_bpe

Log = Callable[[str], None]

# Upper bound of the text the BPE is trained on; the rest of the corpus is only tokenized.
BPE_SAMPLE_CHARS = 100_000_000
# Documents per tokenizer call: large enough for Rust-side parallelism, small enough for memory.
_BATCH_DOCS = 1024
_BATCH_CHARS = 8_000_000
_MASK64 = (1 << 64) - 1
# PrepareConfig fields that change how the data is prepared, never what: not in meta.json nor
# in the resume fingerprint, so outputs of any num_workers compare equal and resume each other.
EXECUTION_FIELDS = ("num_workers",)
# Seconds between resume checkpoints (each fsyncs the open shards: cheap at this interval).
CHECKPOINT_SECONDS = 60.0
# Seconds between progress lines when stderr is not a terminal (a log file gets lines, not a bar).
PROGRESS_SECONDS = 30.0
PROGRESS_FILE = "_progress.json"
BPE_SPOOL = "_bpe_sample.bin"


def prepare_data(cfg: PrepareConfig, out_dir: str | Path, *, log: Log = print, overwrite: bool = False,
                 stats: dict | None = None) -> Path:
    """Tokenize and pack ``cfg.source`` into ``out_dir``; a previous output there is replaced only
    with ``overwrite`` (a run resumed on that folder would otherwise continue on other data).

    A partial output left by an interrupted run with the same settings is continued. ``stats``,
    when given, receives the phase timings (``tokenizer_seconds``, ``pack_seconds``) and counts.
    """
    started = time.perf_counter()
    _check_config(cfg, log)
    out_dir = Path(out_dir).expanduser().absolute()
    _check_out_dir(out_dir, overwrite)
    # Resolved before any folder is made: a bad source fails first and leaves nothing behind.
    docs: Iterator[str] = open_documents(cfg.source, text_field=cfg.text_field, split=cfg.split, log=log, exclude=out_dir)
    if cfg.max_documents is not None:
        docs = itertools.islice(docs, cfg.max_documents)
    fingerprint = _fingerprint(cfg, out_dir)
    _note_leftovers(out_dir, log)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    part = partial_dir(out_dir)
    part.mkdir(exist_ok=True)
    stats = {} if stats is None else stats
    with _locked(part, out_dir):
        checkpoint = _load_checkpoint(part, fingerprint, log)
        if checkpoint is None:
            _empty_folder(part)
        try:
            meta = _build(docs, cfg, part, checkpoint, fingerprint, log, stats)
            _swap_into_place(part, out_dir)
        except Exception:  # an error: the same command would fail again, nothing worth keeping
            shutil.rmtree(part, ignore_errors=True)
            raise
        except BaseException:  # Ctrl-C, SystemExit: keep the checkpointed work for a re-run
            if (part / PROGRESS_FILE).is_file():
                log(f"interrupted: partial output kept in {part}; run the same command again to continue")
            else:
                shutil.rmtree(part, ignore_errors=True)
            raise
    n = meta["num_tokens"]
    d = meta["num_documents"]
    rate = stats["packed_tokens"] / max(stats["pack_seconds"], 1e-9)
    log(
        f"prepared {n['train']:,} train + {n['validation']:,} validation tokens "
        f"({d['train']} + {d['validation']} documents, {meta['dtype']}) in {time.perf_counter() - started:.1f}s "
        f"({rate:,.0f} tokens/s tokenizing with {cfg.num_workers} process{'es' if cfg.num_workers > 1 else ''}) -> {out_dir}"
    )
    return out_dir


def partial_dir(out_dir: Path) -> Path:
    """The hidden sibling folder ``out_dir`` is built in (and resumed from)."""
    return out_dir.parent / f".{out_dir.name}.partial"


def recorded_settings(cfg: PrepareConfig) -> dict:
    """``cfg`` as meta.json records it: what determines the data, not how it was computed."""
    return {k: v for k, v in to_dict(cfg).items() if k not in EXECUTION_FIELDS}


def _build(docs: Iterator[str], cfg: PrepareConfig, part: Path, checkpoint: dict | None, fingerprint: str,
           log: Log, stats: dict) -> dict:
    """Fill ``part`` with tokenizer, shards and meta.json (last); return the meta."""
    t0 = time.perf_counter()
    if checkpoint is None:
        tok, docs = _make_tokenizer(docs, cfg, part, log)
        tok.save_pretrained(str(part / "tokenizer"))
    else:
        tok = _saved_tokenizer(cfg, part)
        (part / BPE_SPOOL).unlink(missing_ok=True)  # the source is re-read instead of the spool
        docs = itertools.islice(docs, checkpoint["documents_read"], None)
        log(f"resuming {part}: {checkpoint['documents_read']:,} documents ({checkpoint['tokens']:,} tokens) "
            "were packed before the interruption")
    stats["tokenizer_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    packed = _pack(docs, tok, cfg, part, log, checkpoint, fingerprint)
    stats["pack_seconds"] = time.perf_counter() - t0
    stats["packed_tokens"] = packed["tokens"] - (checkpoint["tokens"] if checkpoint else 0)
    stats["num_tokens"] = packed["num_tokens"]
    (part / BPE_SPOOL).unlink(missing_ok=True)
    (part / PROGRESS_FILE).unlink()
    meta = {
        "format_version": FORMAT_VERSION,
        "dtype": packed["dtype"],
        "vocab_size": packed["vocab_size"],
        "eos_token_id": int(tok.eos_token_id),
        "num_tokens": packed["num_tokens"],
        "shards": packed["shards"],
        "num_documents": packed["num_documents"],
        "source": cfg.source,
        "tokenizer": "tokenizer",
        "prepare": recorded_settings(cfg),
    }
    _write_durable(part / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
    return meta


def _make_tokenizer(docs: Iterator[str], cfg: PrepareConfig, part: Path, log: Log):
    if cfg.tokenizer:
        tok = load_pretrained_tokenizer(cfg.tokenizer)
        log(f"tokenizer: {cfg.tokenizer} ({len(tok)} tokens)")
        return tok, docs
    t0 = time.perf_counter()
    tok, docs = _train_on_prefix(docs, cfg, part / BPE_SPOOL)
    log(f"tokenizer: trained a byte-level BPE of {len(tok)} tokens in {time.perf_counter() - t0:.1f}s")
    return tok, docs


def _saved_tokenizer(cfg: PrepareConfig, part: Path):
    """The tokenizer of an interrupted run: a pretrained one is loaded again by name (as the
    first run did); a trained BPE from its saved copy (training it again would take minutes)."""
    if cfg.tokenizer:
        return load_pretrained_tokenizer(cfg.tokenizer)
    return load_pretrained_tokenizer(str(part / "tokenizer"))


def _check_config(cfg: PrepareConfig, log: Log) -> None:
    cfg.validate()  # the range checks next to the fields (again: the object may have been edited)
    if not cfg.tokenizer and cfg.vocab_size < MIN_BPE_VOCAB:
        raise ConfigError(f"prepare.vocab_size={cfg.vocab_size} is too small for a byte-level BPE: set it to at least {MIN_BPE_VOCAB}")
    cores = os.cpu_count() or 1
    if cfg.num_workers > cores:
        log(f"note: prepare.num_workers={cfg.num_workers} is more than the {cores} CPU cores here; the extra processes only share them")


def _fingerprint(cfg: PrepareConfig, out_dir: Path) -> str:
    """Hash of what decides the output: the settings and, for local sources, each file's path,
    size and mtime (a checkpoint of an edited corpus must not be continued)."""
    if cfg.source.strip() == "stdlib":
        files = stdlib_files()
    elif cfg.source.strip().startswith("hf:"):
        files = []  # a hub dataset is named by its settings; its revision is not known here
    else:
        files = resolve_local_files(cfg.source.strip(), out_dir)
    stamps = [(str(p), st.st_size, st.st_mtime_ns) for p in files for st in [p.stat()]]
    blob = json.dumps({"format_version": FORMAT_VERSION, "prepare": recorded_settings(cfg), "files": stamps}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@contextlib.contextmanager
def _locked(part: Path, out_dir: Path) -> Iterator[None]:
    """An exclusive lock on the partial folder; the kernel drops it when the process dies, so a
    killed run never leaves a stale lock behind."""
    fd = os.open(part, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(
                f"another prepare-data is writing {out_dir} (its partial folder {part} is locked): "
                "wait for it to finish, or stop it and run this command again to continue its work"
            ) from None
        except OSError:
            pass  # a filesystem without flock (some NFS mounts): run unlocked, as before locks existed
        yield
    finally:
        os.close(fd)


def _load_checkpoint(part: Path, fingerprint: str, log: Log) -> dict | None:
    """The checkpoint to continue from, or None to start over."""
    try:
        checkpoint = json.loads((part / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        if any(part.iterdir()):
            log(f"note: {part} holds no usable checkpoint of an interrupted prepare-data: starting over")
        return None
    if checkpoint.get("fingerprint") != fingerprint:
        log(f"note: {part} is an interrupted prepare-data of other settings or source files: starting over")
        return None
    return checkpoint


def _empty_folder(folder: Path) -> None:
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _is_prepared(folder: Path) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "format_version" in meta and "shards" in meta


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"output path {out_dir} is a file: choose a folder path for the prepared data")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not _is_prepared(out_dir):
        raise DataError(f"output folder {out_dir} is not empty and is not a previous prepare-data output: choose another folder or empty it")
    if not overwrite:
        raise DataError(
            f"output folder {out_dir} already holds prepared data (runs may train on it): pass --overwrite to replace it, "
            "or choose another folder with --out / data.path"
        )


def _note_leftovers(out_dir: Path, log: Log) -> None:
    if not out_dir.parent.is_dir():
        return
    stale = sorted(out_dir.parent.glob(f".{out_dir.name}.tmp-*")) + sorted(out_dir.parent.glob(f".{out_dir.name}.old-*"))
    # Not deleted: another prepare-data may still be writing there; only the user knows.
    for path in stale:
        log(f"note: {path} is left over from an interrupted prepare-data; delete it once no run is using it")


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        # rename() cannot replace a non-empty folder: move the previous output aside first.
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _train_on_prefix(docs: Iterator[str], cfg: PrepareConfig, spool_path: Path):
    """Train the BPE on a prefix of ``docs``; return it and an iterator over all documents again.

    The prefix is spooled to disk while the trainer reads it, so a streamed (hub) source is read
    only once: packing replays the spool, then continues with the same source iterator.
    """
    budget = BPE_SAMPLE_CHARS
    if cfg.max_tokens is not None:
        # Beyond ~8 characters per wanted token the sample would mostly be text that is never packed.
        budget = min(budget, 8 * cfg.max_tokens)
    count = 0
    with open(spool_path, "wb", buffering=1 << 20) as spool:
        def sample() -> Iterator[str]:
            nonlocal count
            chars = 0
            for text in docs:
                data = text.encode("utf-8")
                spool.write(len(data).to_bytes(8, "little"))
                spool.write(data)
                count += 1
                chars += len(text)
                yield text
                if chars >= budget:
                    return

        tok = train_bpe(sample(), cfg.vocab_size)
    if count == 0:
        raise _no_documents(cfg)
    return tok, itertools.chain(_replay(spool_path), docs)


def _replay(spool_path: Path) -> Iterator[str]:
    with open(spool_path, "rb", buffering=1 << 20) as f:
        while header := f.read(8):
            yield f.read(int.from_bytes(header, "little")).decode("utf-8")


def _no_documents(cfg: PrepareConfig) -> DataError:
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
            self._file.write(chunk.tobytes())
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
        return (flatten(encode_batch(tok, batch), eos, dtype) for batch in _batches(docs))
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
        _write_durable(tmp, json.dumps(record).encode())
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
            from tqdm import tqdm

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


def _pack(docs: Iterable[str], tok, cfg: PrepareConfig, folder: Path, log: Log, checkpoint: dict | None,
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
        raise _no_documents(cfg)
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
