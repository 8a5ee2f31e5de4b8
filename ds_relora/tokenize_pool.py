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

import itertools
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

from .errors import DataError

# Batches sent ahead per worker: enough to keep every worker busy while the parent packs, few
# enough that memory stays bounded and a max_tokens stop reads little past the cut.
IN_FLIGHT_PER_WORKER = 2

Chunk = tuple[np.ndarray, np.ndarray]

_encode: Callable[[list[str]], list[list[int]]] | None = None
_eos = 0
_dtype = np.dtype("<u2")


def flatten(ids_per_doc: list[list[int]], eos: int, dtype: np.dtype) -> Chunk:
    """``(flat, lengths)``: each document's ids followed by EOS, concatenated.

    ``lengths[i]`` counts document ``i``'s tokens with its EOS; it is 0 for a document that
    tokenizes to nothing (no EOS either: the packer skips it).
    """
    lengths = np.fromiter((len(ids) + 1 if len(ids) else 0 for ids in ids_per_doc), dtype=np.int64, count=len(ids_per_doc))
    with_eos = (itertools.chain(ids, (eos,)) for ids in ids_per_doc if len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(with_eos), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


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
        from tokenizers import Tokenizer

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
    return flatten(_encode(texts), _eos, _dtype)


def encode_in_order(batches: Iterable[list[str]], tok, eos: int, dtype: np.dtype, workers: int) -> Iterator[Chunk]:
    """``flatten`` of each batch, tokenized by ``workers`` processes, yielded in batch order.

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
