"""Gradient projectors shared by every projection method: GaLore's SVD projector (fp64, canonical
signs) and the seeded random projector of APOLLO (``apollo-torch``'s ``random_projector.py``).

They sit below ``methods/`` because the ZeRO-exact projected optimizer (``projected_adam.py``)
computes them on whatever rank owns a matrix; the methods only choose which one."""

from __future__ import annotations

import math

import torch

# apollo-torch's ADV_DEFAULT: how many int64 draws a seed advances by (the new seed is the last).
SEED_ADVANCE = 0xF


def canonical_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, vh)`` of an SVD with each singular pair's sign fixed: the singular vector on the
    smaller side (a row of ``vh`` when m >= n, else a column of ``u``: the one GaLore keeps) gets
    its largest-magnitude entry positive; its partner is flipped with it, so ``u S vh`` is kept.

    Why: an SVD's signs are arbitrary, and LAPACK's choice follows the last bits of the input
    and the kernel that ran. GaLore keeps C's Adam moments across projector updates, so a flipped
    vector turns the kept momentum of that row against its gradient: two runs whose gradients
    differ in the 8th digit (another world size, another CPU) then follow two trajectories. The
    largest entry's sign changes only where two entries tie in magnitude, which the 8th digit
    does not reach in practice."""
    basis = vh if u.shape[0] >= vh.shape[1] else u.mT
    top = basis.abs().argmax(dim=1, keepdim=True)
    signs = torch.where(basis.gather(1, top) < 0, -1.0, 1.0).to(basis.dtype).squeeze(1)
    return u * signs, vh * signs[:, None]


def projector(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """GaLore's projector of gradient ``grad`` (m x n): ``Vh[:r]`` if m >= n else ``U[:, :r]``, fp32.

    The SVD runs in float64 and the signs are canonical (:func:`canonical_signs`): the same G
    gives the same projector bits on any number of ranks and any ZeRO stage, and a G that differs
    in its last fp32 bits (another CPU's kernels) gives a projector that differs in its last
    bits, not another basis (unless singular values r and r+1 coincide, where no method can
    choose). The reference packages run the SVD in fp32 and keep LAPACK's signs; the oracle
    tests give their SVD the same rule."""
    u, _, vh = torch.linalg.svd(grad.double(), full_matrices=False)
    # canonical_signs' rule applied to the kept factor only (a sign flip is exact, so the bits are
    # those of canonical_signs(u, vh)'s): no sign-fixed copy of the whole U and Vh at 7B sizes.
    basis = vh if grad.shape[0] >= grad.shape[1] else u.mT
    top = basis[:rank].abs().argmax(dim=1, keepdim=True)
    signs = torch.where(basis[:rank].gather(1, top) < 0, -1.0, 1.0).to(basis.dtype)
    kept = basis[:rank] * signs  # the kept singular vectors as rows, sign-fixed
    return (kept if basis is vh else kept.mT).float().contiguous()


def next_seed(seed: int) -> int:
    """apollo-torch's ``next_seed``: the last of ``SEED_ADVANCE`` int64 draws of a CPU generator
    seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, torch.iinfo(torch.int64).max, (SEED_ADVANCE,), generator=generator).tolist()[-1]


def random_projector(shape: tuple[int, int], rank: int, seed: int) -> torch.Tensor:
    """APOLLO's random projector: ``randn(shape, seed) / sqrt(rank)`` in fp32, drawn on the CPU.

    apollo-torch draws on the gradient's device; a CUDA generator gives other numbers than a CPU
    one, so drawing on the CPU always makes the projector a function of the seed alone (the same
    on every device, rank and ZeRO stage). On CPU it equals apollo-torch's bits."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32) / math.sqrt(rank)
