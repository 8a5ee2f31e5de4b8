"""``ds-relora train``'s side of a planned stop, with a stand-in launcher (no ranks, seconds):
SIGUSR1/SIGTERM become a stop request in the run folder instead of reaching the launcher, the
launcher starts with SIGUSR1 ignored, a recorded planned stop with exit 0 comes back as 75, and
a second signal (not the same one arriving twice) is passed on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ds_relora.launch.supervise import SAME_EVENT_S
from harness import REPO

# The stand-in launcher: reports whether SIGUSR1 is ignored in it, then acts like ranks that
# stop at the request (rank 0 records the planned stop and every rank leaves with 0).
LAUNCHER = r"""
import os, signal, sys, time
from pathlib import Path
from ds_relora import rank_exits
run = Path(sys.argv[1])
ign = int([l for l in open("/proc/self/status") if l.startswith("SigIgn:")][0].split()[1], 16)
(run / "usr1-ignored").write_text(str(bool(ign & (1 << (signal.SIGUSR1 - 1)))))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
(run / "ready").touch()
while rank_exits.stop_requested(run) is None:
    time.sleep(0.05)
if sys.argv[2] == "stop":
    rank_exits.record_requeue(run, 5, "stopped to be requeued")
    sys.exit(0)
while True:  # ignores the request: the second signal must reach it
    time.sleep(0.05)
"""


def _supervise(run: Path, mode: str) -> subprocess.Popen:
    code = ("import os, sys; from ds_relora.launch.supervise import run_supervised; "
            f"sys.exit(run_supervised([sys.executable, '-c', {LAUNCHER!r}, {str(run)!r}, {mode!r}], dict(os.environ), {str(run)!r}))")
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ready(run: Path, parent: subprocess.Popen) -> None:
    deadline = time.time() + 60
    while not (run / "ready").exists():
        assert parent.poll() is None and time.time() < deadline, parent.communicate()
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_stop_signal_becomes_a_request_and_the_recorded_stop_exits_75(tmp_path, sig):
    parent = _supervise(tmp_path, "stop")
    try:
        _ready(tmp_path, parent)
        parent.send_signal(sig)
        out, err = parent.communicate(timeout=60)
    finally:
        parent.kill()
    assert parent.returncode == 75, err
    assert (tmp_path / "usr1-ignored").read_text() == "True"
    assert f"ds-relora train: {signal.Signals(sig).name}: the ranks stop at the next step boundary" in err, err
    assert not (tmp_path / ".ds-relora-exits" / "stop").exists(), "the request outlived the run"
    assert "error:" not in err, err


def test_a_second_signal_is_passed_on_to_the_launcher(tmp_path):
    parent = _supervise(tmp_path, "ignore")
    try:
        _ready(tmp_path, parent)
        parent.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        parent.send_signal(signal.SIGUSR1)  # the same stop by another path (the batch script's copy)
        time.sleep(0.5)
        assert parent.poll() is None, "the first stop signals reached the launcher"
        time.sleep(SAME_EVENT_S)
        parent.send_signal(signal.SIGTERM)
        out, err = parent.communicate(timeout=60)
    finally:
        parent.kill()
    assert parent.returncode == 143, err
