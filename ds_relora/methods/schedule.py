"""The jagged cosine LR schedule of ReLoRA, as a picklable ``LambdaLR`` multiplier.

One global cosine from the end of the first warm-up to ``total_steps`` (floor
``min_lr_ratio``). At every restart point the LR drops to 0 and ramps linearly over
``restart_warmup_steps`` to the value the global cosine has at the end of that ramp. Restart
points are ``cycle_start + k * restart_every`` for k >= 1, plus ``cycle_start`` itself when it is
> 0 (the switch from a full-rank warm start to ReLoRA brings a fresh optimizer).

The multiplier is indexed by the *global* step ``offset + i`` where ``i`` is the scheduler's own
step count, so a scheduler built for the ReLoRA phase of a warm-started run continues the run's
global schedule.
"""

from __future__ import annotations

import math

from ds_relora.errors import ConfigError


class JaggedCosine:
    def __init__(
        self,
        total_steps: int,
        warmup_steps: int,
        min_lr_ratio: float = 0.1,
        restart_every: int | None = None,
        restart_warmup_steps: int = 0,
        cycle_start: int = 0,
        offset: int = 0,
    ):
        if total_steps < 1:
            raise ConfigError(f"train.total_steps={total_steps} must be at least 1")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio={min_lr_ratio} must be in [0, 1]")
        if warmup_steps < 0 or warmup_steps >= total_steps:
            raise ConfigError(
                f"optim.warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}): lower optim.warmup_steps"
            )
        if restart_every is not None:
            if restart_every < 1:
                raise ConfigError(f"relora.reset_every={restart_every} must be at least 1")
            if restart_warmup_steps >= restart_every:
                raise ConfigError(
                    f"relora.restart_warmup_steps={restart_warmup_steps} must be shorter than the cycle "
                    f"relora.reset_every={restart_every}: lower restart_warmup_steps or lengthen the cycle"
                )
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.restart_every = restart_every
        self.restart_warmup_steps = restart_warmup_steps
        self.cycle_start = cycle_start
        self.offset = offset

    def cosine(self, t: float) -> float:
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(max((t - self.warmup_steps) / span, 0.0), 1.0)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def last_restart(self, t: int) -> int | None:
        """The latest restart point <= t, or None."""
        if self.restart_every is None or self.restart_warmup_steps <= 0 or t < self.cycle_start:
            return None
        k = (t - self.cycle_start) // self.restart_every
        if k == 0 and self.cycle_start == 0:
            return None
        return self.cycle_start + k * self.restart_every

    def multiplier(self, t: int) -> float:
        if t < self.warmup_steps:
            return t / max(1, self.warmup_steps)
        restart = self.last_restart(t)
        if restart is not None and t - restart < self.restart_warmup_steps:
            target = self.cosine(restart + self.restart_warmup_steps)
            return (t - restart) / self.restart_warmup_steps * target
        return self.cosine(t)

    def __call__(self, i: int) -> float:
        return self.multiplier(self.offset + i)


def merge_points(total_steps: int, reset_every: int, cycle_start: int = 0) -> list[int]:
    """Global steps after whose optimizer update ReLoRA merges and re-initialises."""
    return list(range(cycle_start + reset_every, total_steps, reset_every))


def make_scheduler(optimizer, schedule: JaggedCosine):
    import torch  # noqa: PLC0415  (torch takes seconds to import; this module is on the CLI's start-up path)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
