"""``ds-relora train`` stays the parent of the launcher it starts, so that it can say, in one
line, which rank failed first and why (:mod:`ds_relora.rank_exits`).

Signals sent to ``ds-relora train`` alone (``kill``, ``timeout``, a scheduler) are passed on to
the launcher, which is what received them when ``ds-relora train`` replaced itself by the
launcher; a terminal's Ctrl-C reaches the whole process group, the launcher included, by itself,
so SIGINT is not passed on twice. The exit code is the launcher's (128 + N when a signal N ended
it), 75 included, so a requeue still sees it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from ds_relora import rank_exits

PASSED_ON = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
REQUEUE_EXIT_CODE = 75  # train.job_limits.REQUEUE_EXIT_CODE, without importing torch here


def run_supervised(cmd: list[str], env: dict[str, str], run_dir: str | Path | None) -> int:
    proc = subprocess.Popen(cmd, env=env)

    def pass_on(signum, _frame):
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    def interrupted(_signum, _frame):
        # The launcher got the same Ctrl-C from the terminal: wait for it to stop its ranks.
        if os.getpgid(proc.pid) != os.getpgrp():
            pass_on(signal.SIGINT, None)

    previous = {sig: signal.signal(sig, pass_on) for sig in PASSED_ON}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, interrupted)
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    code = 128 - code if code < 0 else code
    if code not in (0, REQUEUE_EXIT_CODE) and run_dir is not None:
        print(f"error: {rank_exits.summary(run_dir, code)}", file=sys.stderr, flush=True)
    return code
