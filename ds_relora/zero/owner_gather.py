"""Gather a tensor's pieces, held across the ranks, into one whole value on one owner rank.

What a save needs: each tensor whole on the one rank that writes it. DeepSpeed's full-value
getters (``safe_get_full_fp32_param``, ``safe_get_full_optimizer_state``) all-gather it onto
every rank instead, and gloo's ``all_gather_into_tensor`` adds a full-size temporary of its own
(measured: a 190 MiB output on 2 ranks peaked 287 MiB above the state before it), so every rank
held two full copies of each tensor that all but one of them dropped: at the 7B shape's
500 MiB embedding that was more than one decoder layer's fp32 weights above the model states.

Here the owner receives every rank's piece straight into the one full-size buffer it writes
from, and the other ranks send the pieces they hold (views of their own partitions: nothing is
allocated unless a piece has to move to the communication device or change dtype). Point to
point, so neither gloo's nor NCCL's collectives add a buffer; an element no rank sends is zero
(ZeRO-3's padding, a moment before the first step).

Collective over the default group: every rank calls it in the same order with the same
``owner``, ``numel`` and ``dtype``; each rank's pieces may differ in number (up to
:data:`MAX_PIECES`) and size, and may be none.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

MAX_PIECES = 4


def gather_to_owner(pieces: list[tuple[int, torch.Tensor]], numel: int, dtype: torch.dtype, owner: int,
                    device: torch.device | str) -> torch.Tensor | None:
    """The flat whole value (``numel`` elements of ``dtype`` on ``device``) on ``owner``, None on
    the other ranks. ``pieces``: this rank's ``(start, values)``, ``values`` any tensor whose
    flattened elements are ``[start, start + values.numel())`` of the whole; pieces of different
    ranks do not overlap."""
    pieces = [(start, t.reshape(-1)) for start, t in pieces if t.numel()]
    if len(pieces) > MAX_PIECES:
        raise ValueError(f"gather_to_owner takes at most {MAX_PIECES} pieces per rank, got {len(pieces)}")
    for start, t in pieces:
        if start < 0 or start + t.numel() > numel:
            raise ValueError(f"piece [{start}, {start + t.numel()}) lies outside a tensor of {numel} elements")
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank != owner:
        header = torch.zeros(1 + 2 * MAX_PIECES, dtype=torch.int64)
        header[0] = len(pieces)
        for k, (start, t) in enumerate(pieces):
            header[1 + 2 * k], header[2 + 2 * k] = start, t.numel()
        dist.send(header.to(device), dst=owner)
        for _, t in pieces:
            dist.send(t.to(device=device, dtype=dtype).contiguous(), dst=owner)
        return None
    whole = torch.zeros(numel, dtype=dtype, device=device)
    for start, t in pieces:
        whole[start: start + t.numel()].copy_(t)
    receives = []
    for src in range(world):
        if src == owner:
            continue
        header = torch.empty(1 + 2 * MAX_PIECES, dtype=torch.int64, device=device)
        dist.recv(header, src=src)
        header = header.tolist()
        for k in range(header[0]):
            start, count = header[1 + 2 * k], header[2 + 2 * k]
            receives.append(dist.irecv(whole[start: start + count], src=src))  # a 1-D slice: contiguous, received in place
    for work in receives:
        work.wait()
    return whole
