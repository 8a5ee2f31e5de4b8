"""How an export folds a method's trained part into ``W``: fp64, a block of rows at a time.

A whole-matrix fp64 fold of one 7B MLP weight is an m x n fp64 product plus an fp64 copy of W:
1.3 GB above the export's own tensors. Blocks of rows of about ``FOLD_ELEMENTS`` elements keep
it to 2 MiB fp64 blocks, and each output element is the same fp64 sum, rounded once to W's
dtype.
"""

from __future__ import annotations

from typing import Callable

import torch

FOLD_ELEMENTS = 1 << 18


def fold_rows(weight: torch.Tensor, delta_rows: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """``weight + ΔW`` in fp64, rounded once to ``weight``'s dtype; ``delta_rows(r0, r1)`` gives
    rows ``r0:r1`` of ΔW in fp64."""
    out = torch.empty_like(weight)
    step = max(1, FOLD_ELEMENTS // max(1, weight[0].numel()))
    for r0 in range(0, weight.shape[0], step):
        r1 = min(r0 + step, weight.shape[0])
        block = delta_rows(r0, r1)
        block += weight[r0:r1]  # in place, in fp64: W's rows are never copied to fp64
        out[r0:r1] = block
    return out
