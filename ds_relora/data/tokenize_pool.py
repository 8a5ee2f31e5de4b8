"""Ordered multi-process tokenization for ``prepare-data`` (``prepare.num_workers`` > 1).

The parent reads documents and packs them; workers only turn batches of texts into token
arrays, which come back in the order the batches were sent, so the packed output is the same
byte for byte as a one-process run.

This module lives outside ``ds_relora.data`` on purpose: importing that package imports torch
(seconds per spawned worker), a worker here needs only numpy and tokenizers. Workers are
started with 'spawn': the parent has already run the Rust tokenizer (BPE training uses its
thread pool), and a fork after that can deadlock, which is why HF tokenizers warns about it.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator

import numpy as np

from ds_relora.errors import DataError

# Batches sent ahead per worker: enough to keep every worker busy while the parent packs, few
# enough that memory stays bounded and a max_tokens stop reads little past the cut.
IN_FLIGHT_PER_WORKER = 2

Chunk = tuple[np.ndarray, np.ndarray]

_encode: Callable[[list[str]], list[list[int]]] | None = None
_eos = 0
_dtype = np.dtype("<u2")


# A tokenizer call needs ~100 bytes of working memory per input character (offsets, alignments
# and token strings for every byte), so one 20 MB document would peak near 3 GB. Documents longer
# than LONG_DOC_CHARS are encoded PIECE_CHARS at a time into a compact array instead; shorter
# ones (nearly all) go through the batched call unchanged.
LONG_DOC_CHARS = 1_000_000
PIECE_CHARS = 1 << 16


def pieces(text: str, size: int | None = None) -> Iterator[str]:
    """``text`` in consecutive pieces of at most ``size`` (default ``PIECE_CHARS``) characters.

    Each cut falls just before a space that has a non-space character on both sides: a byte-level
    pre-tokenizer (the trained BPE's, GPT-2's) starts a new word there anyway, so the pieces
    encode to exactly the ids of the whole text. A stretch of ``size // 2`` characters without
    such a space (a base64 blob) is cut hard; only the token at that cut can differ.
    """
    size = size or PIECE_CHARS
    start, end = 0, len(text)
    while end - start > size:
        lo, cut = start + size // 2, start + size
        while True:
            cut = text.rfind(" ", lo, cut)
            if cut < 0 or (not text[cut - 1].isspace() and not text[cut + 1].isspace()):
                break
        if cut < 0:
            cut = start + size
        yield text[start:cut]
        start = cut
    yield text[start:]


def encode_documents(encode: Callable[[list[str]], list[list[int]]], texts: list[str], eos: int, dtype: np.dtype) -> Chunk:
    """``flatten(encode(texts))``, with each document over ``LONG_DOC_CHARS`` encoded piece by piece."""
    long = [len(t) > LONG_DOC_CHARS for t in texts]
    if not any(long):
        return flatten(encode(texts), eos, dtype)
    short_ids = iter(encode([t for t, is_long in zip(texts, long) if not is_long]))
    ids = [_encode_long(encode, t, dtype) if is_long else next(short_ids) for t, is_long in zip(texts, long)]
    return flatten(ids, eos, dtype)


def _encode_long(encode: Callable[[list[str]], list[list[int]]], text: str, dtype: np.dtype) -> list[np.ndarray]:
    # Arrays of the token dtype (a Python list of ids takes ~36 bytes per token), kept as parts:
    # flatten copies them into its output once, with no concatenated copy in between.
    return [np.asarray(encode([piece])[0], dtype=dtype) for piece in pieces(text)]


def flatten(ids_per_doc: list, eos: int, dtype: np.dtype) -> Chunk:
    """``(flat, lengths)``: each document's ids followed by EOS, concatenated. A document is a
    list of ids, or a list of id arrays (a long document's pieces, ``_encode_long``).

    ``lengths[i]`` counts document ``i``'s tokens with its EOS; it is 0 for a document that
    tokenizes to nothing (no EOS either: the packer skips it).

    It consumes ``ids_per_doc``: each document's ids (each piece's) are released once copied, so
    the output's pages (touched as they are filled) replace them instead of adding to them.
    """
    sizes = [sum(map(len, ids)) if _is_pieces(ids) else len(ids) for ids in ids_per_doc]
    lengths = np.fromiter((n + 1 if n else 0 for n in sizes), dtype=np.int64, count=len(sizes))
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    for i, n in enumerate(sizes):
        ids, ids_per_doc[i] = ids_per_doc[i], None
        parts = ids if _is_pieces(ids) else [ids]
        del ids
        for j in range(len(parts) if n else 0):
            part, parts[j] = parts[j], None
            flat[pos:pos + len(part)] = part
            pos += len(part)
        if n:
            flat[pos] = eos
            pos += 1
    return flat, lengths


def _is_pieces(ids) -> bool:
    return len(ids) > 0 and isinstance(ids[0], np.ndarray)  # len: a document may be an id array too


def tokenizer_payload(tok) -> tuple[str, object]:
    """What a worker rebuilds the tokenizer from: the Rust backend's JSON when there is one
    (small, and no transformers import in the worker), else the pickled tokenizer."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return "backend-json", backend.to_str()
    return "pickle", pickle.dumps(tok)


def _init_worker(payload: tuple[str, object], eos: int, dtype: str, parent: int) -> None:
    global _encode, _eos, _dtype
    # The parent handles Ctrl-C and stops the pool; a worker traceback per process would bury it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One worker is one core: num_workers, not Rust threads per worker, sets the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _exit_with_parent(parent)
    kind, data = payload
    if kind == "backend-json":
        from tokenizers import Tokenizer  # noqa: PLC0415  (tokenizers is needed only when text is tokenized)

        backend = Tokenizer.from_str(data)
        # The same call as ds_relora.data.tokenizer.encode_batch makes on the parent's backend.
        fast = getattr(backend, "encode_batch_fast", backend.encode_batch)
        _encode = lambda texts: [enc.ids for enc in fast(texts, add_special_tokens=False)]  # noqa: E731
    else:
        tok = pickle.loads(data)
        _encode = lambda texts: tok(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    _eos, _dtype = eos, np.dtype(dtype)


def _exit_with_parent(parent: int) -> None:
    """Exit when the parent is gone: a SIGKILLed prepare-data would otherwise leave its workers
    waiting forever on a queue that they themselves hold open. ``parent`` is the pid the parent
    sent (not our getppid() at start: the parent may already have died while we were starting)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _encode_chunk(texts: list[str]) -> Chunk:
    return encode_documents(_encode, texts, _eos, _dtype)


def encode_in_order(batches: Iterable[list[str]], tok, eos: int, dtype: np.dtype, workers: int) -> Iterator[Chunk]:
    """``encode_documents`` of each batch, tokenized by ``workers`` processes, yielded in batch order.

    Closing the generator early (max_tokens reached, an interrupt) cancels what is queued and
    lets the workers exit after their current batch.
    """
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(tokenizer_payload(tok), eos, dtype.str, os.getpid()))
    in_flight: deque[Future] = deque()
    finished = False
    try:
        for batch in batches:
            in_flight.append(pool.submit(_encode_chunk, batch))
            if len(in_flight) >= IN_FLIGHT_PER_WORKER * workers:
                yield _result(in_flight.popleft(), workers)
        while in_flight:
            yield _result(in_flight.popleft(), workers)
        finished = True
    finally:
        pool.shutdown(wait=finished, cancel_futures=True)


def _result(future: Future, workers: int) -> Chunk:
    try:
        return future.result()
    except BrokenProcessPool as exc:
        raise DataError(
            f"a tokenizer worker process died ({exc}), most likely out of memory: "
            f"lower prepare.num_workers (now {workers}) and re-run, which continues from the last checkpoint"
        ) from None
