"""Why the ranks of a run ended: one record per failed rank, one summary line for the launcher.

When a rank dies, every other rank fails in its next collective, and DeepSpeed's launcher names
whichever command it looked at last. So a failing rank writes ``run_dir/.ds-relora-exits/rank-R.json``
(rank, host, pid, time, its error in one line, and whether it failed by itself or only because a
peer was gone) and ``ds-relora train``, which supervises the launcher, prints one line naming the
rank that failed first and why. A rank killed outright (SIGKILL, out of memory) writes nothing; the
summary then says that no rank recorded a cause. This module owns the record format and is its
only reader.

The same folder carries the two messages of a planned stop: ``stop`` (``ds-relora train`` got
SIGUSR1/SIGTERM and asks the ranks to stop at the next step boundary; a file on the shared run
folder reaches ranks on every node, which a signal to the launcher does not) and ``requeue`` (rank
0 saved and the run stopped to be requeued; the ranks then leave with 0, so no launcher reports
the planned stop as a failure, and ``ds-relora train`` turns it back into exit code 75).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from ds_relora.run_folder import EXITS as FOLDER  # the records' folder, owned by run_folder


def _folder(run_dir: str | Path) -> Path:
    return Path(run_dir) / FOLDER


def clear(run_dir: str | Path) -> None:
    """Before a launch (under the run-folder lock): records of an earlier run would name its ranks."""
    shutil.rmtree(_folder(run_dir), ignore_errors=True)


def record(run_dir: str | Path, rank: int, reason: str, *, peer: bool) -> None:
    """Rank ``rank`` is failing with ``reason`` (``peer``: only because another rank is gone).
    Never raises: a rank on its way out must not fail again on a full or read-only disk."""
    _write(run_dir, f"rank-{rank}.json", {**_whoami(rank), "reason": one_line(reason), "peer": peer})


def one_line(text: object, limit: int = 1500) -> str:
    """``text`` on one line; past ``limit`` characters its middle gives way, not its end, where
    our errors put the fix ("...: set X" / "use Y")."""
    line = " ".join(str(text).split())
    if len(line) <= limit:
        return line
    tail = limit // 3
    return f"{line[:limit - tail - 5]} ... {line[-tail:]}"


def register(run_dir: str | Path, rank: int) -> None:
    """Rank ``rank`` runs here (host, pid): names the node of a rank that later dies without a
    record (a lost node, kill -9). Never raises."""
    _write(run_dir, f"started-{rank}.json", _whoami(rank))


def _whoami(rank: int) -> dict:
    return {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}


def _write(run_dir: str | Path, name: str, info: dict) -> None:
    """One record, replaced whole (a reader never sees half of it); a full or read-only disk is
    ignored: a rank on its way out must not fail again."""
    try:
        folder = _folder(run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.tmp"
        tmp.write_text(json.dumps(info))
        os.replace(tmp, folder / name)
    except OSError:
        pass


def _read_all(run_dir: str | Path, pattern: str) -> list[dict]:
    """Every record matching ``pattern``; one cut short by a dying rank is skipped."""
    out = []
    for path in sorted(_folder(run_dir).glob(pattern)):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return out


def started(run_dir: str | Path) -> list[dict]:
    return sorted(_read_all(run_dir, "started-*.json"), key=lambda r: r["rank"])


def read(run_dir: str | Path) -> list[dict]:
    return _read_all(run_dir, "rank-*.json")


def summary(run_dir: str | Path, code: int) -> str:
    """The launcher's one line for a run whose launcher exited with ``code`` (not 0 or 75)."""
    records = read(run_dir)
    first = min((r for r in records if not r.get("peer")), key=lambda r: r["time"], default=None)
    end = f"the launcher exited with code {code}"
    if first is not None:
        return (f"rank {first['rank']} (host {first['host']}, pid {first['pid']}) failed first: {first['reason']}; "
                f"{end}")
    if records:
        stopped = ", ".join(str(r["rank"]) for r in sorted(records, key=lambda r: r["rank"]))
        said = {r["rank"] for r in records}
        silent = [r for r in started(run_dir) if r["rank"] not in said]
        hosts = sorted({r["host"] for r in silent})
        who = (f"rank(s) {', '.join(str(r['rank']) for r in silent)} on {', '.join(hosts)} died without saying why"
               if silent else "a rank died without saying why")
        # No rank of that host is left to say anything: more likely the node than one process.
        if len(hosts) == 1 and not any(r["host"] == hosts[0] for r in records):
            cause = f"node {hosts[0]} lost, or its ranks killed by the out-of-memory killer or kill -9"
        else:
            cause = "killed by a signal: out of memory, kill -9, a lost node?"
        return f"{who} ({cause}); rank(s) {stopped} stopped because a peer was gone; {end}"
    return f"no rank recorded an error ({end}): see the output above"


STOP = "stop"
REQUEUE = "requeue"


def request_stop(run_dir: str | Path, why: str) -> bool:
    """Ask every rank to stop at its next step boundary (read by train.job_limits). False when
    the folder is not writable (the caller then falls back to passing the signal on)."""
    try:
        folder = _folder(run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{STOP}.{os.getpid()}.tmp"
        tmp.write_text(one_line(why))
        os.replace(tmp, folder / STOP)
        return True
    except OSError:
        return False


def stop_requested(run_dir: str | Path) -> str | None:
    try:
        return (_folder(run_dir) / STOP).read_text() or "stop requested"
    except OSError:
        return None


def clear_stop(run_dir: str | Path) -> None:
    try:
        (_folder(run_dir) / STOP).unlink()
    except OSError:
        pass


def record_requeue(run_dir: str | Path, step: int, reason: str) -> None:
    """Rank 0, after the stop checkpoint of step ``step`` is complete. Never raises."""
    _write(run_dir, REQUEUE, {"step": step, "reason": reason, "host": socket.gethostname(), "time": time.time()})


def requeue_recorded(run_dir: str | Path) -> dict | None:
    try:
        return json.loads((_folder(run_dir) / REQUEUE).read_text())
    except (OSError, ValueError):
        return None
