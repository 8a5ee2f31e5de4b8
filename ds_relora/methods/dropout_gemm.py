"""``dropout(x) @ A.T`` that keeps no dropped copy of ``x`` for backward.

Autograd's ``F.linear(F.dropout(x), A)`` saves, for every adapter, the dropped input and the
mask (bool on CUDA, the activation dtype on CPU), each as large as ``x``. That is what made a
ReLoRA layer with dropout hold more activation memory than the full-rank layer it replaces. Here
the forward draws the mask from a generator seeded by one integer, uses it and drops it; the
backward re-seeds the generator, redraws the same mask and rebuilds the dropped input for
``grad_A``. Saved: ``x`` (the tensor the full-rank layer saves for its weight gradient), ``A``
and the seed. Cost: one more mask draw and one x-sized multiply per backward.

The seed comes from the CPU default generator (no device synchronisation, and it is in every
checkpoint's RNG state); ``torch.utils.checkpoint`` restores that generator, so a recomputed
forward draws the same seed. Linears sharing an input (``shared_input.py``) pass one seed and
share the mask.
Under ``torch.compile`` (``train.compile``) this is plain dropout, left to the compiler.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_SEED_HIGH = 2 ** 62
_generators: dict[torch.device, torch.Generator] = {}


def draw_seed() -> int:
    """A mask seed from the CPU default generator (no device synchronisation)."""
    return int(torch.randint(_SEED_HIGH, (1,)).item())


def _generator(device: torch.device) -> torch.Generator:
    # One generator per device, re-seeded per mask; creating one per call costs more on CUDA.
    g = _generators.get(device)
    if g is None:
        g = _generators[device] = torch.Generator(device=device)
    return g


def _keep(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The 0/1 keep mask drawn from ``seed``, in ``x``'s dtype and shape."""
    return torch.empty_like(x).bernoulli_(1.0 - p, generator=_generator(x.device).manual_seed(seed))


def _dropped(keep: torch.Tensor, x: torch.Tensor, p: float) -> torch.Tensor:
    """``x * keep / (1 - p)``, written into ``keep``; the same operations in forward and backward,
    so the rebuilt copy is bit-identical to the one the forward used."""
    return keep.mul_(x).mul_(1.0 / (1.0 - p))


class _DropoutGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        u = F.linear(_dropped(_keep(x, p, seed), x, p), a)  # autocast, when on, casts as for any linear
        ctx.save_for_backward(x, a)
        ctx.p, ctx.seed, ctx.compute_dtype = p, seed, u.dtype
        return u

    @staticmethod
    def backward(ctx, grad_u: torch.Tensor):
        x, a = ctx.saved_tensors
        p, dt = ctx.p, ctx.compute_dtype
        g2 = grad_u.reshape(-1, grad_u.shape[-1]).to(dt)
        keep = _keep(x, p, ctx.seed)
        grad_x = grad_a = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ a.to(dt)).view(x.shape).to(x.dtype).mul_(keep).mul_(1.0 / (1.0 - p))
        if ctx.needs_input_grad[1]:
            x_drop = _dropped(keep, x, p).reshape(-1, x.shape[-1])
            grad_a = (g2.t() @ x_drop.to(dt)).to(a.dtype)
        return grad_x, grad_a, None, None


def dropout_gemm(x: torch.Tensor, a: torch.Tensor, p: float, training: bool, seed: int | None = None) -> torch.Tensor:
    """``F.linear(dropout(x, p), a)``, saving ``x`` instead of the dropped copy.

    ``seed``: the mask's seed (linears that share an input pass one seed); drawn when None.
    Outside training, or at ``p == 0``, this is ``F.linear(x, a)``."""
    if not training or p == 0.0:
        return F.linear(x, a)
    if torch.compiler.is_compiling():
        # A host read and a generator would break the graph. Compiled, the partitioner decides
        # what backward keeps: measured with inductor on CPU, a 1-byte mask per input.
        return F.linear(F.dropout(x, p, True), a)
    if seed is None:
        seed = draw_seed()
    return _DropoutGemm.apply(x, a, p, seed)
