"""``ds-relora train`` stays the parent of the launcher it starts, so that it can say, in one
line, which rank failed first and why (:mod:`ds_relora.rank_exits`).

Signals sent to ``ds-relora train`` alone (``kill``, ``timeout``, a scheduler) are passed on to
the launcher, which is what received them when ``ds-relora train`` replaced itself by the
launcher; a terminal's Ctrl-C reaches the whole process group, the launcher included, by itself,
so SIGINT is not passed on twice. The exit code is the launcher's (128 + N when a signal N ended
it), 75 included, so a requeue still sees it.

SIGUSR1 and SIGTERM (a scheduler's "stop soon") are not passed on when there is a run folder:
DeepSpeed's launchers have no SIGUSR1 handler (it would kill them, the ranks running on as
orphans), answer SIGTERM by terminating the ranks and exiting 1, and over pdsh do not reach the
other nodes' ranks at all. Instead the first one writes a stop request into the run folder, which
every rank reads at its step boundary; the ranks checkpoint and leave, and the run ends with 75.
A second such signal is passed on (the sender insists). The launcher is started with SIGUSR1
ignored, so one that reaches it directly (``scancel --full``, a signal to the process group)
does not end it either; the ranks install their own handler. Signals within SAME_EVENT_S of the
first count as that one.

A stop signal that arrives while ``ds-relora train`` still checks the run (10-60 s before the
launcher starts: config, data, checkpoint choice) is held (:func:`hold_stop_signals`), not fatal:
SLURM's early warning would otherwise end the job with no checkpoint and no requeue. Once the
launcher runs, a held stop is acted on as if it had arrived then; a second one during the checks
(the sender insists) ends the command at once, before anything started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ds_relora import rank_exits

PASSED_ON = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
STOPPING = (signal.SIGTERM, signal.SIGUSR1)
REQUEUE_EXIT_CODE = 75  # train.job_limits.REQUEUE_EXIT_CODE, without importing torch here
SUPERVISED_ENV = "DS_RELORA_SUPERVISED"
# Stop signals this close to the first are one event arriving twice (scancel --full or a requeue
# signals every process of the job, and the batch script passes its own copy on), not a second,
# insisting one: train.job_limits.SAME_EVENT_S.
SAME_EVENT_S = 5.0
_held: list[tuple[int, float]] = []  # stop signals that arrived before the launcher started


def hold_stop_signals() -> None:
    """First thing ``ds-relora train`` does: hold SIGUSR1/SIGTERM until :func:`run_supervised`."""

    def held(signum, _frame):
        if _held and time.monotonic() - _held[0][1] >= SAME_EVENT_S:
            print(f"ds-relora train: {signal.Signals(signum).name} again before the launch: nothing started, stopping",
                  file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        if not _held:
            print(f"ds-relora train: {signal.Signals(signum).name} during the checks: the ranks will stop at their "
                  f"first step boundary, save a checkpoint and exit with {REQUEUE_EXIT_CODE}", file=sys.stderr, flush=True)
        _held.append((signum, time.monotonic()))

    for sig in STOPPING:
        signal.signal(sig, held)


def run_supervised(cmd: list[str], env: dict[str, str], run_dir: str | Path | None) -> int:
    # The ranks leave a planned stop with 0 when they know a supervisor turns it into 75.
    proc = subprocess.Popen(cmd, env={**env, SUPERVISED_ENV: "1"}, preexec_fn=_ignore_usr1)
    stops = []

    def pass_on(signum, _frame):
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    def stop(signum, frame):
        name = signal.Signals(signum).name
        if stops and time.monotonic() - stops[0] < SAME_EVENT_S:
            return None  # the same stop, by another path: SLURM signals the script and this process
        if stops or run_dir is None or not rank_exits.request_stop(run_dir, f"{name} to ds-relora train (pid {os.getpid()})"):
            return pass_on(signum, frame)
        stops.append(time.monotonic())
        print(f"ds-relora train: {name}: the ranks stop at the next step boundary, save a checkpoint and exit "
              f"with {REQUEUE_EXIT_CODE} (send it again to stop them now)", file=sys.stderr, flush=True)

    def interrupted(_signum, _frame):
        # The launcher got the same Ctrl-C from the terminal: wait for it to stop its ranks.
        if os.getpgid(proc.pid) != os.getpgrp():
            pass_on(signal.SIGINT, None)

    previous = {sig: signal.signal(sig, stop if sig in STOPPING else pass_on) for sig in PASSED_ON}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, interrupted)
    if _held:
        stop(_held.pop(0)[0], None)
        _held.clear()
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    code = 128 - code if code < 0 else code
    if stops:
        rank_exits.clear_stop(run_dir)  # read by every later run's ranks, a worker started by hand included
    if code == 0 and run_dir is not None and rank_exits.requeue_recorded(run_dir):
        code = REQUEUE_EXIT_CODE
    if code not in (0, REQUEUE_EXIT_CODE) and run_dir is not None:
        print(f"error: {rank_exits.summary(run_dir, code)}", file=sys.stderr, flush=True)
    return code


def _ignore_usr1() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
