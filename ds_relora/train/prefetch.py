"""This rank's micro-batches, read one optimizer step ahead and copied without blocking.

Reading a step's samples (memory-mapped shards, ``torch.stack``) on the main thread leaves the
GPU idle, and ``batch.to(cuda)`` from pageable memory is a synchronous copy: it waits for every
kernel already queued. Here a worker thread reads (and, on CUDA, pins) the next step's
micro-batches while the current step runs; the main thread issues their host-to-device copies
with ``non_blocking=True`` on its current stream, so they are ordered before the forwards that
read them and the host never waits. The pinned buffers are not reused before their copy ends
(torch's caching host allocator records the copy on its stream).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch


class StepPrefetcher:
    """``next_step(device)``: this step's micro-batches on ``device``; the iterator's state
    (what a checkpoint saves) counts only the steps handed out, never the one being read."""

    def __init__(self, iterator):
        self.iterator = iterator
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ds_relora-batches")
        self._pending: tuple[int, bool, Future] | None = None

    def _read(self, consumed: int, pin: bool) -> list[torch.Tensor]:
        batches = self.iterator.batches_at(consumed)
        return [b.pin_memory() for b in batches] if pin else batches

    def next_step(self, device: torch.device) -> list[torch.Tensor]:
        device = torch.device(device)
        pin = device.type == "cuda"
        consumed = self.iterator.consumed_samples
        pending, self._pending = self._pending, None
        if pending is not None and pending[:2] == (consumed, pin):
            host = pending[2].result()
        else:  # first step, or the iterator was moved (a resume): read this one now
            if pending is not None:  # never two reads of the iterator's caches at once
                pending[2].cancel()
                wait([pending[2]])
            host = self._read(consumed, pin)
        self.iterator.advance()
        batches = [b.to(device, non_blocking=True) for b in host]
        self._pending = (self.iterator.consumed_samples, pin,
                         self._pool.submit(self._read, self.iterator.consumed_samples, pin))
        return batches

    def close(self) -> None:
        """Drop the read in flight (the run ended or stopped: that step is never trained)."""
        if self._pending is not None:
            self._pending[2].cancel()
            self._pending = None
        self._pool.shutdown(wait=True, cancel_futures=True)
