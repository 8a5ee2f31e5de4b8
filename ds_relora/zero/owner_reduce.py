"""Reduce a whole tensor to one owner rank, run a function there, broadcast its (smaller) result.

What a projection method needs to compute a projector from a full-size gradient without every
rank holding every layer's full gradient: GaLore's SVD projector (and APOLLO/Fira's) is a
function of the gradient summed over all ranks, but only one rank has to see that sum. Compared
with an all-reduce followed by a computation on rank 0:

* ``dist.reduce`` leaves the sum on the owner alone (the other ranks' buffers are scratch and
  are freed right after), so a reduction moves the same bytes as an all-reduce's first half;
* callers pick the owner per tensor (:func:`owner_of`: round-robin over an index every rank
  enumerates in the same order), which spreads the computations (an SVD per layer) and their
  workspace over the ranks;
* the tensor is made by ``make`` *inside* this function, so this frame holds its only
  reference and drops it before the broadcast: a caller that processes one tensor at a time
  never has two of them alive (checked by ``tests/test_galore_math.py``'s alive-buffer count).

Collective: call it on every rank in the same order with the same ``owner``, ``shape`` and
``dtype``. Without an initialised process group it is ``fn(make())``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist


def owner_of(index: int, world: int) -> int:
    """Round-robin owner of the ``index``-th tensor every rank enumerates in the same order."""
    return index % world


def reduce_apply_broadcast(make: Callable[[], torch.Tensor], owner: int, fn: Callable[[torch.Tensor], torch.Tensor],
                           shape: tuple[int, ...], dtype: torch.dtype,
                           condense: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``fn(sum over ranks of make())`` computed on ``owner`` only, returned on every rank.

    ``make()`` builds this rank's summand (on the device the collectives run on); the sum is
    formed in ``make()``'s dtype (fp64 keeps it independent of the reduction order in practice).
    ``fn``'s result must have ``shape`` and ``dtype``; the other ranks receive it into an empty
    tensor of that shape on the summand's device.

    ``condense`` (optional) shrinks the sum before ``fn`` sees it, and the sum is freed in
    between: ``fn(condense(sum))`` with one full-size tensor alive only while ``condense`` runs
    (GaLore's projector: the sum G to its k x k Gram matrix, then the eigendecomposition)."""
    condense = condense or (lambda t: t)
    if not (dist.is_available() and dist.is_initialized()):
        return fn(condense(make())).to(dtype).contiguous()
    local = make()
    device = local.device
    dist.reduce(local, dst=owner)
    if dist.get_rank() == owner:
        local = condense(local)  # the only reference to the sum: freed here when condense shrinks it
        result = fn(local).to(dtype).contiguous()
    else:
        result = torch.empty(shape, dtype=dtype, device=device)
    del local  # the only reference: freed before the broadcast and the caller's next tensor
    dist.broadcast(result, src=owner)
    return result
