"""When a job stops early to be requeued: a wall-time budget, a number of steps per job, an
absolute stop step, or SIGUSR1/SIGTERM (what SLURM sends before a time limit).

The decision is taken at a step boundary and agreed by all ranks (a signal may reach only some
of them, clocks differ): one all-reduce of a small device tensor per step. The trainer then
checkpoints and exits with :data:`REQUEUE_EXIT_CODE`, which a batch script requeues on.
"""

from __future__ import annotations

import os
import signal
import time

from ds_relora import rank_exits
from ds_relora.config import parse_duration

# EX_TEMPFAIL (sysexits.h): "temporary failure, the user is invited to retry".
REQUEUE_EXIT_CODE = 75
STOP_SIGNALS = ("SIGUSR1", "SIGTERM")
# Larger code wins the all-reduce (MAX); names are what the log line and the metrics event say.
REASONS = {1: "train.stop_after_steps", 2: "train.max_steps_per_job", 3: "train.time_limit", 4: "a stop signal"}
# A stop request of `ds-relora train` (rank_exits.request_stop) is a file on the shared run folder:
# looked at no more often than this, so a slow network filesystem costs one stat a second, not one a step.
STOP_FILE_INTERVAL = 1.0
# A stop signal this soon after the first is the same event delivered twice (to the task by
# slurmstepd and again by srun or the batch script), not a second, insisting one.
SAME_EVENT_S = 5.0

class JobLimits:
    """Per-rank stop state; :meth:`agreed_code` is collective."""

    def __init__(self, train_cfg, start_step: int):
        self.start_step = start_step
        self.started = time.monotonic()
        self.time_limit = parse_duration(train_cfg.time_limit)
        self.max_steps = train_cfg.max_steps_per_job
        # Absolute stop step: applies only to a job that started before it, so a requeued job
        # with the same config does not train one step and stop again.
        stop = train_cfg.stop_after_steps
        self.stop_at = stop if stop is not None and start_step < stop else None
        self.signalled: str | None = None
        self._previous = {}
        self.run_dir = getattr(train_cfg, "run_dir", None)
        self._stop_checked = float("-inf")
        self.requested: str | None = None
        self._signalled_at = float("-inf")

    def install_signal_handlers(self) -> None:
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def restore_signal_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum, _frame) -> None:
        if self.signalled is not None:
            if time.monotonic() - self._signalled_at < SAME_EVENT_S:
                return  # the same stop by another path (SLURM signals the task, srun forwards it)
            # A second signal: the user (or the scheduler) insists; stop now the default way.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signalled = signal.Signals(signum).name
        self._signalled_at = time.monotonic()

    def _stop_requested(self) -> bool:
        # Kept apart from ``signalled``: the same scheduler signal may also reach this rank, and
        # that must not count as the second, insisting one.
        if self.requested is None and self.run_dir and time.monotonic() - self._stop_checked >= STOP_FILE_INTERVAL:
            self._stop_checked = time.monotonic()
            self.requested = rank_exits.stop_requested(self.run_dir)
        return self.requested is not None

    def local_code(self, step: int) -> int:
        if self.signalled or self._stop_requested():
            return 4
        if self.time_limit is not None and time.monotonic() - self.started >= self.time_limit:
            return 3
        if self.max_steps is not None and step - self.start_step >= self.max_steps:
            return 2
        if self.stop_at is not None and step >= self.stop_at:
            return 1
        return 0

    def agreed_code(self, step: int, device):
        """Collective: the largest stop code of any rank after this step, as a device tensor (read
        on the host together with the step's other scalars: one host sync per step)."""
        import torch  # noqa: PLC0415  (torch takes seconds to import; this module is on the CLI's start-up path)
        import torch.distributed as dist  # noqa: PLC0415  (torch takes seconds to import; this module is on the CLI's start-up path)

        # torch.full fills on the device from a kernel argument; torch.tensor([...], device=cuda)
        # would copy from pageable host memory, which waits for every queued kernel.
        code = torch.full((1,), self.local_code(step), dtype=torch.int32, device=device)
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        return code

    @staticmethod
    def reason(code: float | None) -> str | None:
        value = int(code or 0)
        return REASONS[value] if value else None
