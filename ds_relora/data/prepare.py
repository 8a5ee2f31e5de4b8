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
packs the returned tokens in source order (``ds_relora.data.tokenize_pool``, ``packing``). Split choice, the
``max_tokens`` cut and shard boundaries are all decided in this process, so the output is byte-identical
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

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

from ds_relora.config import PrepareConfig
from ds_relora.config_base import to_dict
from ds_relora.data import tokenize_pool
from ds_relora.data.corpus import open_documents, resolve_local_files, stdlib_files
from ds_relora.data.dataset import FORMAT_VERSION
from ds_relora.data.packing import PROGRESS_FILE, no_documents, pack, write_durable
from ds_relora.data.tokenizer import MIN_BPE_VOCAB, load_pretrained_tokenizer, train_bpe
from ds_relora.errors import ConfigError, DataError

Log = Callable[[str], None]

# Upper bound of the text the BPE is trained on; the rest of the corpus is only tokenized.
BPE_SAMPLE_CHARS = 100_000_000
# PrepareConfig fields that change how the data is prepared, never what: not in meta.json nor
# in the resume fingerprint, so outputs of any num_workers compare equal and resume each other.
EXECUTION_FIELDS = ("num_workers",)
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
    packed = pack(docs, tok, cfg, part, log, checkpoint, fingerprint)
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
    write_durable(part / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
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
                count += 1
                chars += len(text)
                if len(text) <= tokenize_pool.LONG_DOC_CHARS:
                    data = text.encode("utf-8")
                    spool.write(len(data).to_bytes(8, "little"))
                    spool.write(data)
                    yield text
                else:
                    # Piece by piece, like packing: the trainer's memory per call grows with the
                    # text, and the word counts are the same (pieces are cut between words).
                    yield from _spool_long(spool, text)
                if chars >= budget:
                    return

        tok = train_bpe(sample(), cfg.vocab_size)
    if count == 0:
        raise no_documents(cfg)
    return tok, itertools.chain(_replay(spool_path), docs)


def _spool_long(spool, text: str) -> Iterator[str]:
    """Write one long document to the spool without a whole-text UTF-8 copy; yield its pieces."""
    header = spool.tell()
    spool.write(bytes(8))
    size = 0
    for piece in tokenize_pool.pieces(text):
        data = piece.encode("utf-8")
        spool.write(data)
        size += len(data)
        yield piece
    spool.seek(header)
    spool.write(size.to_bytes(8, "little"))
    spool.seek(0, os.SEEK_END)


def _replay(spool_path: Path) -> Iterator[str]:
    with open(spool_path, "rb", buffering=1 << 20) as f:
        while header := f.read(8):
            yield f.read(int.from_bytes(header, "little")).decode("utf-8")
