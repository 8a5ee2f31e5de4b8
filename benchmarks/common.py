"""Helpers shared by the benchmarks: machine description, local multi-rank launch, comms
logger summaries, peak RSS and markdown tables.

The benchmarks are scripts, not tests: they print their figures (and a ``RESULT {json}`` line
per rank when they run distributed) so that docs/results.md can quote them verbatim.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT_TAG = "RESULT "
# A private JIT-extension cache: DeepSpeed compiles its CPU shm op on first use, and a compile
# killed elsewhere on a shared machine leaves a lock that makes every later start wait forever.
EXT_DIR = os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/ds_relora_bench_torch_ext")


def bench_env(**extra: str) -> dict:
    """Environment for a benchmark subprocess: repo on the path, private extension cache."""
    env = dict(os.environ)
    env.update({"PYTHONPATH": f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}", "TORCH_EXTENSIONS_DIR": EXT_DIR})
    env.update(extra)
    return env


def machine_info() -> str:
    """One line naming the CPU (lscpu model name), core count and library versions."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    versions = []
    for name in ("torch", "deepspeed", "transformers"):
        try:
            mod = __import__(name)
            versions.append(f"{name} {mod.__version__}")
        except Exception:  # a missing library only shortens the line
            pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    except Exception:
        pass
    return f"{model}, {os.cpu_count()} cores{gpu}; {', '.join(versions)}"


def load_average() -> str:
    """The 1/5/15-minute load average: the CPU is shared, so timings are only read with it."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(script: Path, args: list[str], nprocs: int, *, timeout: float = 3600,
                 threads_per_rank: int = 1, env: dict | None = None) -> list[dict]:
    """Run ``python script args`` as ``nprocs`` gloo ranks on this machine (torch.distributed env
    vars, no launcher: its start-up costs seconds and adds nothing here).

    Streams rank 0's output through, returns every ``RESULT {json}`` line of every rank, and
    kills the group if one rank fails or the timeout passes (no hung benchmarks).
    """
    port = free_port()
    procs, logs = [], []
    for rank in range(nprocs):
        penv = bench_env(**(env or {}))
        penv.update({
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nprocs), "LOCAL_SIZE": str(nprocs),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(threads_per_rank),
        })
        log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"ds_relora_bench_rank{rank}_{port}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=penv, stdout=log,
                                      stderr=subprocess.STDOUT, cwd=str(REPO)))
    deadline = time.time() + timeout
    failed, shown = None, 0
    while any(p.poll() is None for p in procs):
        shown = _echo_new(logs[0], shown)
        if time.time() > deadline:
            failed = f"timeout after {timeout:.0f}s"
            break
        bad = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
        if bad:
            time.sleep(2)
            failed = f"rank {bad[0]} exited with {procs[bad[0]].returncode}"
            break
        time.sleep(0.5)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    _echo_new(logs[0], shown)
    outs = []
    for log in logs:
        log.seek(0)
        outs.append(log.read())
        log.close()
        os.unlink(log.name)
    if failed is None and any(p.returncode != 0 for p in procs):
        failed = "a rank exited non-zero"
    if failed:
        tails = "\n".join(f"--- rank {i} ---\n{o[-4000:]}" for i, o in enumerate(outs))
        raise RuntimeError(f"{failed}\n{tails}")
    found = []
    for out in outs:
        found += [json.loads(line[len(RESULT_TAG):]) for line in out.splitlines() if line.startswith(RESULT_TAG)]
    return found


def _echo_new(log, shown: int) -> int:
    """Print rank 0's new non-RESULT lines (progress), return the new read offset."""
    log.flush()
    log.seek(shown)
    text = log.read()
    for line in text.splitlines():
        if line.startswith("[bench]"):
            print(line, flush=True)
    return shown + len(text.encode()) if text else shown


def emit(record: dict) -> None:
    print(RESULT_TAG + json.dumps(record), flush=True)


def say(message: str) -> None:
    """Progress line from a rank; the launcher echoes rank 0's."""
    print(f"[bench] {message}", flush=True)


def init_distributed() -> tuple[int, int]:
    """gloo (CPU) or nccl (GPU) process group for a worker started by ``launch_ranks``; quiet libraries."""
    import logging

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
    backend = "gloo"
    if torch.cuda.is_available():
        backend = "nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return dist.get_rank(), dist.get_world_size()


# ----------------------------------------------------------------------------- comms logger
def comms_reset() -> None:
    import deepspeed.comm as dscomm

    dscomm.comms_logger.comms_dict.clear()


def comms_bytes() -> dict[str, dict]:
    """``{record name: {"count", "bytes"}}`` from DeepSpeed's comms logger on this rank.

    ``bytes`` is the logger's msg_size (the op's tensor argument: the full buffer for
    all_reduce / reduce_scatter, the per-rank shard for all_gather_into_tensor) times the count;
    with ``debug`` the record name carries the calling function.
    """
    import deepspeed.comm as dscomm

    out = {}
    for name, sizes in dscomm.comms_logger.comms_dict.items():
        count = sum(v[0] for v in sizes.values())
        total = sum(size * v[0] for size, v in sizes.items())
        out[name] = {"count": count, "bytes": total}
    return out


def comms_config(enabled: bool = True) -> dict:
    return {"enabled": enabled, "prof_all": True, "prof_ops": [], "verbose": False, "debug": True}


# ----------------------------------------------------------------------------- formatting
def md_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
