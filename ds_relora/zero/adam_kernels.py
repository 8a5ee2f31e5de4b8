"""The elementwise kernels of the projected optimizer (``projected_adam.py``): HF's old AdamW
moment update (eps inside the square root's sum, bias correction folded into the step size) and
the row/column norms its scaling ratios and limiter use."""

from __future__ import annotations

import math

import torch

# Elements a plain step updates at a time (16 MiB fp32): its temporaries are this size, not the
# partition's (every op is elementwise, so the pieces compute what the whole would).
PLAIN_CHUNK = 1 << 22


def adam_direction(st: dict, g: torch.Tensor, group: dict) -> tuple[torch.Tensor, float]:
    """One HF-AdamW moment update of ``st`` with gradient ``g`` (a matrix's R): Adam's direction
    ``m / (sqrt(v) + eps)`` and the bias-corrected step size."""
    if "exp_avg" not in st:
        st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(g), torch.zeros_like(g)
    st["step"] += 1
    return _moments_direction(st["exp_avg"], st["exp_avg_sq"], g, group), _step_size(group, st["step"])


def _moments_direction(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, g: torch.Tensor, group: dict) -> torch.Tensor:
    beta1, beta2 = group["betas"]
    exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(group["eps"])
    return exp_avg / denom


def adam_step_runs(st: dict, runs: list[tuple[torch.Tensor, torch.Tensor]], group: dict) -> None:
    """One HF-AdamW step (decoupled weight decay after it) of the plain elements of a partition,
    given as ``(param view, grad view)`` runs (1-D), whose moments ``st`` keeps as one
    concatenated run: :data:`PLAIN_CHUNK` elements at a time, so nothing the size of the
    partition is made (a partition of row blocks has one run per block)."""
    total = sum(p.numel() for p, _ in runs)
    if "exp_avg" not in st:
        st["exp_avg"] = torch.zeros(total, dtype=runs[0][1].dtype, device=runs[0][1].device)
        st["exp_avg_sq"] = torch.zeros_like(st["exp_avg"])
    st["step"] += 1
    step_size, decay = _step_size(group, st["step"]), group["lr"] * group["weight_decay"]
    at = 0
    for param, grad in runs:
        for start in range(0, param.numel(), PLAIN_CHUNK):
            n = min(PLAIN_CHUNK, param.numel() - start)
            p = param.narrow(0, start, n)
            direction = _moments_direction(st["exp_avg"].narrow(0, at + start, n), st["exp_avg_sq"].narrow(0, at + start, n),
                                           grad.narrow(0, start, n), group)
            p.add_(direction, alpha=-step_size)
            if group["weight_decay"] > 0.0:
                p.add_(p, alpha=-decay)
        at += param.numel()


def channel_norms(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The 2-norms of a row-major matrix's rows (dim 1) or columns (dim 0). Over columns, torch's
    CPU ``vector_norm`` strides through memory (190 ms for 2048 x 5461, one thread); summing
    squares 64 rows at a time reads it in order (9 ms) with a 64-row temporary."""
    if dim == 1:
        return torch.linalg.vector_norm(x, dim=1)
    acc = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    for i in range(0, x.shape[0], 64):
        acc += x[i:i + 64].square().sum(0)
    return acc.sqrt()


def _step_size(group: dict, step: int) -> float:
    beta1, beta2 = group["betas"]
    return group["lr"] * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)
