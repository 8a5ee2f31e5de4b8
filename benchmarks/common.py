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
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the rank runner lives with the tests' harness
from harness.ranks import RESULT_TAG, RanksFailed, results, run_workers  # noqa: E402
from ds_relora.display import human_bytes  # noqa: E402, F401  (the benchmarks print sizes like the CLI)

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


def launch_ranks(script: Path, args: list[str], nprocs: int, *, timeout: float = 3600,
                 threads_per_rank: int = 1, env: dict | None = None) -> list[dict]:
    """Run ``python script args`` as ``nprocs`` gloo ranks on this machine (torch.distributed env
    vars, no launcher: its start-up costs seconds and adds nothing here) through the tests' rank
    runner (tests/harness/ranks.py), with the private extension cache.

    Streams rank 0's ``[bench]`` lines through, returns every ``RESULT {json}`` line of every rank,
    and kills the group if one rank fails or the timeout passes (no hung benchmarks): a
    RuntimeError with each rank's log tail.
    """
    try:
        outs = run_workers([str(script), *args], nprocs, timeout=timeout, threads_per_rank=threads_per_rank,
                           env={"TORCH_EXTENSIONS_DIR": EXT_DIR, **(env or {})}, echo_prefix="[bench]")
    except RanksFailed as exc:
        raise RuntimeError(str(exc)) from None
    return results(outs, RESULT_TAG)


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


