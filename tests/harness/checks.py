"""What a test checks a run against: its metrics.jsonl, an invariance tolerance (recorded for
benchmarks/invariance/tolerances.py), a one-line error."""

from __future__ import annotations

import json
import os
from pathlib import Path


def within_rel(a: float, b: float, bound: float, what: str) -> bool:
    """``|a - b| <= bound * |b|``, recorded (see :func:`within`)."""
    return within(abs(a - b) / abs(b), bound, what)


def within_abs(a: float, b: float, bound: float, what: str) -> bool:
    """``|a - b| <= bound``, recorded (see :func:`within`)."""
    return within(abs(a - b), bound, what)


def within(observed: float, bound: float, what: str) -> bool:
    """``observed <= bound`` for an invariance tolerance named ``what``. With
    ``DS_RELORA_TOLERANCE_LOG`` set, every comparison appends ``{what, bound, observed}`` to that
    file, so benchmarks/invariance/tolerances.py reports each tolerance's worst case per CPU
    kernel set."""
    log = os.environ.get("DS_RELORA_TOLERANCE_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps({"what": what, "bound": bound, "observed": float(observed)}) + "\n")
    return observed <= bound


def read_metrics(run_dir: Path) -> tuple[dict[int, float], list[dict]]:
    """(step -> loss, events) from a run's metrics.jsonl."""
    losses, events = {}, []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["type"] == "step":
            losses[rec["step"]] = rec["loss"]
        else:
            events.append(rec)
    return losses, events


def one_line_error(exc_info, *words):
    msg = str(exc_info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg
