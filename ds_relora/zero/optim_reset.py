"""Partial reset of the adapters' Adam moments at every ReLoRA merge.

One joint mask prunes both moments. Pruning ``exp_avg`` and ``exp_avg_sq`` independently (as
the reference does) leaves entries with m != 0 and v = 0; right after a re-init B = 0, so A's
gradient is 0 and A's next update becomes lr * m / eps (measured: thousands of times the LR).

Masks are computed on the *whole* parameter (ZeRO fragments are gathered first), with an exact
count and a stable tie-break, so they do not depend on the ZeRO stage or the number of ranks.
Adam's step counter is left alone.
"""

from __future__ import annotations

import numpy as np
import torch

from ds_relora.errors import ConfigError
from ds_relora.zero.state import get_moment, set_moment

RESET_MODES = ("magnitude", "random", "full", "none")


def check_reset_args(mode: str, ratio: float) -> None:
    if mode not in RESET_MODES:
        raise ConfigError(f"relora.optimizer_reset='{mode}' is unknown: use one of {', '.join(RESET_MODES)}")
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(
            f"relora.prune_ratio={ratio} is outside [0, 1): use e.g. 0.99, or optimizer_reset=full to zero all moments"
        )


def pruned_count(mode: str, ratio: float, n: int) -> int:
    """How many of ``n`` entries ``keep_mask`` prunes (known without reading the mask back)."""
    return {"full": n, "none": 0}.get(mode, int(ratio * n))


def keep_mask(score: torch.Tensor, mode: str, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean mask of the entries to keep, on ``score``'s device; prunes exactly
    ``pruned_count(mode, ratio, numel)`` entries."""
    flat = score.reshape(-1)
    n = flat.numel()
    if mode == "full":
        return torch.zeros_like(score, dtype=torch.bool)
    if mode == "none":
        return torch.ones_like(score, dtype=torch.bool)
    n_prune = pruned_count(mode, ratio, n)
    if mode == "magnitude":
        # Stable sort: ties broken by position, never by how the tensor was split across ranks.
        order = torch.argsort(flat.abs(), stable=True)
    elif mode == "random":
        # Drawn from the CPU generator, then moved: the same permutation on every device and rank.
        order = torch.randperm(n, generator=generator).to(score.device)
    else:
        raise ConfigError(f"relora.optimizer_reset='{mode}' is unknown: use one of {', '.join(RESET_MODES)}")
    keep = torch.ones(n, dtype=torch.bool, device=score.device)
    keep[order[:n_prune]] = False
    return keep.reshape(score.shape)


def reset_generator(seed: int, step: int, index: int) -> torch.Generator:
    """A generator seeded from (seed, step, index): identical on every rank, new at every reset."""
    state = np.random.SeedSequence([seed, step, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@torch.no_grad()
def reset_moments(engine, param, mode: str, ratio: float, generator: torch.Generator | None = None) -> dict:
    """Prune ``param``'s Adam moments with one joint mask; collective on ZeRO 1/2/3.

    Returns ``{"numel", "pruned"}``, or an empty dict when the optimizer has no state yet.
    """
    if mode == "none":
        return {}
    exp_avg = get_moment(engine, param, "exp_avg")
    exp_avg_sq = get_moment(engine, param, "exp_avg_sq")
    if exp_avg is None or exp_avg_sq is None:
        return {}
    keep = keep_mask(exp_avg_sq, mode, ratio, generator)
    set_moment(engine, param, "exp_avg", exp_avg * keep.to(exp_avg.device))
    set_moment(engine, param, "exp_avg_sq", exp_avg_sq * keep)
    # Counted, not read back from the mask: no host sync per parameter.
    return {"numel": keep.numel(), "pruned": pruned_count(mode, ratio, keep.numel())}
