"""Peak memory per phase of a run (init, training, each save, the warm-start switch), per rank.

Host: the process's resident-set high-water mark (``VmHWM``), reset at each phase start through
``/proc/self/clear_refs`` (Linux; where that is refused the peaks are since the process start and
the event says so). Device: ``torch.cuda.max_memory_allocated``, reset the same way. A phase ends
at a point every rank passes together (they are all collective), where the figures of all ranks
are gathered into one ``memory`` event of the metrics log.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch
import torch.distributed as dist

from ds_relora.device import comm_device


def _status_bytes(key: str) -> int | None:
    """A ``VmHWM``/``VmRSS``-style line of ``/proc/self/status`` in bytes (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_peak_bytes() -> int:
    peak = _status_bytes("VmHWM")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak


def host_resident_bytes() -> int:
    return _status_bytes("VmRSS") or 0


def _reset_host_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PhaseMemory:
    def __init__(self):
        self.phase: str | None = None
        self.resettable = True

    def start(self, phase: str) -> None:
        self.phase = phase
        self.start_bytes = host_resident_bytes()
        self.resettable = _reset_host_peak() and self.resettable
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def finish(self) -> dict | None:
        """Collective: the ending phase's peaks of every rank (MiB), or None when none started."""
        if self.phase is None:
            return None
        device_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        mine = torch.tensor([host_peak_bytes(), device_peak, self.start_bytes], dtype=torch.float64, device=comm_device())
        every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        mib = [[round(float(v) / 2**20, 1) for v in t.tolist()] for t in every]
        out = {"phase": self.phase, "host_peak_mib": [m[0] for m in mib], "host_start_mib": [m[2] for m in mib],
               "since_phase_start": self.resettable}
        if torch.cuda.is_available():
            out["device_peak_mib"] = [m[1] for m in mib]
        self.phase = None
        return out
