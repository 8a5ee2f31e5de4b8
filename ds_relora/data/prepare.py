"""``prepare_data``: corpus -> tokenizer -> packed token shards + ``meta.json``.

Output layout (``format_version`` 1)::

    out_dir/tokenizer/            save_pretrained() of the tokenizer
    out_dir/train_00000.bin ...   flat little-endian token stream, EOS after every document
    out_dir/validation_00000.bin
    out_dir/meta.json             written last

Everything is built in a hidden sibling folder and moved into place with ``os.replace``: a
folder named ``out_dir`` with a ``meta.json`` is always complete.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..config import PrepareConfig
from ..config_base import to_dict
from ..errors import ConfigError, DataError
from .corpus import open_documents
from .dataset import FORMAT_VERSION, SPLITS
from .tokenizer import MIN_BPE_VOCAB, encode_batch, id_bound, load_pretrained_tokenizer, token_dtype, train_bpe

Log = Callable[[str], None]

# Upper bound of the text the BPE is trained on; the rest of the corpus is only tokenized.
BPE_SAMPLE_CHARS = 100_000_000
# Documents per tokenizer call: large enough for Rust-side parallelism, small enough for memory.
_BATCH_DOCS = 1024
_BATCH_CHARS = 8_000_000
_MASK64 = (1 << 64) - 1


def prepare_data(cfg: PrepareConfig, out_dir: str | Path, *, log: Log = print, overwrite: bool = False) -> Path:
    """Tokenize and pack ``cfg.source`` into ``out_dir``; a previous output there is replaced only
    with ``overwrite`` (a run resumed on that folder would otherwise continue on other data)."""
    started = time.perf_counter()
    _check_config(cfg)
    out_dir = Path(out_dir).expanduser().absolute()
    _check_out_dir(out_dir, overwrite)
    docs: Iterator[str] = open_documents(cfg.source, text_field=cfg.text_field, split=cfg.split, log=log, exclude=out_dir)
    if cfg.max_documents is not None:
        docs = itertools.islice(docs, cfg.max_documents)
    _note_leftovers(out_dir, log)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if cfg.tokenizer:
            tok = load_pretrained_tokenizer(cfg.tokenizer)
            log(f"tokenizer: {cfg.tokenizer} ({len(tok)} tokens)")
        else:
            t0 = time.perf_counter()
            tok, docs = _train_on_prefix(docs, cfg, tmp / "_bpe_sample.bin")
            log(f"tokenizer: trained a byte-level BPE of {len(tok)} tokens in {time.perf_counter() - t0:.1f}s")
        tok.save_pretrained(str(tmp / "tokenizer"))
        stats = _pack(docs, tok, cfg, tmp, log)
        (tmp / "_bpe_sample.bin").unlink(missing_ok=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "dtype": stats["dtype"],
            "vocab_size": stats["vocab_size"],
            "eos_token_id": int(tok.eos_token_id),
            "num_tokens": stats["num_tokens"],
            "shards": stats["shards"],
            "num_documents": stats["num_documents"],
            "source": cfg.source,
            "tokenizer": "tokenizer",
            "prepare": to_dict(cfg),
        }
        _write_durable(tmp / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n = meta["num_tokens"]
    d = meta["num_documents"]
    log(
        f"prepared {n['train']:,} train + {n['validation']:,} validation tokens "
        f"({d['train']} + {d['validation']} documents, {meta['dtype']}) in {time.perf_counter() - started:.1f}s -> {out_dir}"
    )
    return out_dir


def _check_config(cfg: PrepareConfig) -> None:
    cfg.validate()  # the range checks next to the fields (again: the object may have been edited)
    if not cfg.tokenizer and cfg.vocab_size < MIN_BPE_VOCAB:
        raise ConfigError(f"prepare.vocab_size={cfg.vocab_size} is too small for a byte-level BPE: set it to at least {MIN_BPE_VOCAB}")


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

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
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


def _pack(docs: Iterable[str], tok, cfg: PrepareConfig, folder: Path, log: Log) -> dict:
    vocab_size = id_bound(tok)
    dtype = token_dtype(vocab_size)
    eos = int(tok.eos_token_id)
    writers = {s: _ShardWriter(folder, s, dtype, cfg.shard_tokens) for s in SPLITS}
    # The newest document waits here so that, at the end, it can go to a split that is still empty.
    pending: tuple[np.ndarray, str] | None = None
    index = total = skipped = 0
    last_log = time.perf_counter()
    done = False
    try:
        for batch in _batches(docs):
            for ids in encode_batch(tok, batch):
                split = "validation" if is_validation(cfg.seed, index, cfg.val_fraction) else "train"
                index += 1
                if not ids:
                    skipped += 1
                    continue
                arr = np.empty(len(ids) + 1, dtype=np.int64)
                arr[:-1] = ids
                arr[-1] = eos
                if cfg.max_tokens is not None:
                    arr = arr[: cfg.max_tokens - total]
                total += len(arr)
                if pending is not None:
                    writers[pending[1]].write(pending[0])
                pending = (arr, split)
                if cfg.max_tokens is not None and total >= cfg.max_tokens:
                    done = True
                    break
            if done:
                break
            if time.perf_counter() - last_log > 30:
                last_log = time.perf_counter()
                log(f"  {index:,} documents, {total:,} tokens")
        if pending is not None:
            writers[_last_split(pending[1], writers, cfg.val_fraction)].write(pending[0])
    finally:
        for w in writers.values():
            w.close()
    if index == 0:
        raise _no_documents(cfg)
    if total == 0:
        raise DataError(
            f"the {index} documents of {cfg.source!r} tokenize to zero tokens: "
            "check prepare.text_field and that the tokenizer fits the text"
        )
    if skipped:
        log(f"skipped {skipped} documents that tokenize to nothing")
    if cfg.max_tokens is not None and total < cfg.max_tokens:
        log(f"note: the corpus ran out at {total:,} tokens, before prepare.max_tokens={cfg.max_tokens:,}")
    return {
        "dtype": dtype.name,
        "vocab_size": vocab_size,
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
