"""Gradient projectors shared by every projection method: GaLore's SVD projector (fp64 eigenvectors of
the Gram matrix, canonical signs) and the seeded random projector of APOLLO (``apollo-torch``'s
``random_projector.py``).

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
    signs = row_signs(vh if u.shape[0] >= vh.shape[1] else u.mT)
    return u * signs, vh * signs[:, None]


def row_signs(rows: torch.Tensor) -> torch.Tensor:
    """The sign (+-1, ``rows``' dtype) that makes each row's largest-magnitude entry positive."""
    top = rows.abs().argmax(dim=1, keepdim=True)
    return torch.where(rows.gather(1, top) < 0, -1.0, 1.0).to(rows.dtype).squeeze(1)


def gram(grad: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """The smaller side's Gram matrix of ``grad`` (m x n) in fp64: ``GᵀG`` (n x n) if m >= n, else
    ``G Gᵀ`` (m x m). Summed over ``chunk`` rows (or columns) at a time, so an fp32 G is never
    copied whole to fp64: the only full-size array is G itself."""
    tall = grad.shape[0] >= grad.shape[1]
    g = grad if tall else grad.mT  # rows of g: the long side
    side = g.shape[1]
    out = torch.zeros(side, side, dtype=torch.float64, device=grad.device)
    for start in range(0, g.shape[0], chunk):
        piece = g[start: start + chunk].to(torch.float64)
        out.addmm_(piece.mT, piece)
    return out


def projector_from_gram(gram_matrix: torch.Tensor, rank: int, tall: bool) -> torch.Tensor:
    """GaLore's projector from :func:`gram` of G: the top ``rank`` eigenvectors of the Gram
    matrix are G's top right (``tall``: rows, ``Vh[:r]``) or left (columns, ``U[:, :r]``) singular
    vectors, with :func:`canonical_signs`' rule, fp32."""
    _, vectors = torch.linalg.eigh(gram_matrix)  # ascending eigenvalues: the top r are the last r
    kept = vectors[:, -rank:].flip(1).mT  # the kept singular vectors as rows, largest first
    kept = kept * row_signs(kept)[:, None]
    return (kept if tall else kept.mT).float().contiguous()


def projector(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """GaLore's projector of gradient ``grad`` (m x n): ``Vh[:r]`` if m >= n else ``U[:, :r]``, fp32.

    Computed as the top eigenvectors of the smaller side's Gram matrix in float64 (:func:`gram`,
    :func:`projector_from_gram`), not by an SVD of G: the same subspace (eigenvalues are the
    squared singular values; fp64 keeps the top r's error at about 1e-16 of the largest
    eigenvalue, far below the fp32 result's rounding), about 4x fewer flops at 11008 x 4096, and
    a workspace of a few k x k arrays (k the smaller side) instead of G-sized copies: at the 7B
    shape 0.5 GiB instead of 1.3 GiB for the largest linear. The signs are canonical
    (:func:`canonical_signs`' rule): the same G gives the same projector bits on any number of
    ranks and any ZeRO stage, and a G that differs in its last fp32 bits (another CPU's kernels)
    gives a projector that differs in its last bits, not another basis (unless singular values r
    and r+1 coincide, where no method can choose). The reference packages run an fp32 SVD and
    keep LAPACK's signs; the oracle tests give their SVD the same sign rule."""
    return projector_from_gram(gram(grad), rank, grad.shape[0] >= grad.shape[1])


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
