"""Fires merge-and-reinit from the LR scheduler's own step count.

DeepSpeed does not step the scheduler on a step it skipped for overflow, while its global step
counter still advances; driving resets from the scheduler keeps every reset at the bottom of its
LR saw-tooth. No state of its own: after a checkpoint load, :meth:`sync_with_scheduler` reads
the restored scheduler (the epoch read at construction is the fresh engine's, before the load:
a first step skipped after a resume would otherwise replay the merge the checkpoint already holds).
"""

from __future__ import annotations

from ds_relora.faults import fault_point
from ds_relora.methods.merging import merge_and_reinit


class ReLoRAController:
    def __init__(self, engine, modules, *, merge_at, offset: int, seed: int,
                 optimizer_reset: str, prune_ratio: float, after_merge=None):
        self.engine = engine
        self.modules = modules
        self.merge_at = set(merge_at)
        self.offset = offset
        self.seed = seed
        self.optimizer_reset = optimizer_reset
        self.prune_ratio = prune_ratio
        self.after_merge = after_merge
        self.sync_with_scheduler()

    def sync_with_scheduler(self) -> None:
        """Call after ``engine.load_checkpoint``: the updates already taken are not merge candidates."""
        self.seen_epoch = self.engine.lr_scheduler.last_epoch

    def last_update_step(self) -> int:
        """Global index of the latest optimizer update (its LR was schedule(index))."""
        return self.offset + self.engine.lr_scheduler.last_epoch - 1

    def after_step(self) -> dict | None:
        """Call after every ``engine.step()``; merges when the update just taken was at a merge point."""
        epoch = self.engine.lr_scheduler.last_epoch
        if epoch == self.seen_epoch:
            return None
        self.seen_epoch = epoch
        step = self.last_update_step()
        if step not in self.merge_at:
            return None
        fault_point("merge", step + 1)  # numbered like the step record of the update just taken
        stats = merge_and_reinit(self.engine, self.modules, seed=self.seed, step=step,
                                 optimizer_reset=self.optimizer_reset, prune_ratio=self.prune_ratio,
                                 after_merge=self.after_merge)
        return {"event": "merge", "step": step, **stats}
