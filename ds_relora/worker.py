"""One training rank: ``python -m ds_relora.worker --config run_dir/config.yaml``.

Started by the ``deepspeed`` launcher, ``mpirun`` (ranks found through mpi4py), ``srun`` or
torchrun; ``ds-relora train`` builds those commands. A leading ``--local_rank=N`` (added by the
deepspeed launcher) is accepted and ignored: LOCAL_RANK comes from the environment.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import os
import socket
import subprocess
import sys
import threading

from ds_relora.config import load_config
from ds_relora.disk import disk_error, is_disk_error
from ds_relora.errors import LaunchError, UserError
from ds_relora.quiet import quiet_worker
from ds_relora.rank_exits import record, record_requeue, register, requeue_recorded
from ds_relora.run_lock import hold_in_workers, mark_released

# How the process group is started on a GPU, and why pure NCCL: every collective ds_relora
# issues runs on ``engine.device`` tensors (tests/test_device.py audits that), DeepSpeed's own
# collectives do too (offload included: shards are copied to the GPU before they are gathered),
# and a second gloo backend would only hide a host-side collective (a stall per step) while
# adding a second network dependency on clusters (gloo picks its own interface, one more socket
# set per DeepSpeed sub-group). DS_RELORA_DIST_BACKEND overrides it, e.g. "cuda:nccl,cpu:gloo".
GPU_BACKEND = "nccl"
CPU_BACKEND = "gloo"
# Launchers that set no LOCAL_RANK before DeepSpeed's MPI discovery: OpenMPI, MPICH/hydra, srun.
LOCAL_RANK_VARS = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")


def local_rank_from_env(env=None) -> int:
    """This process's index on its node, from the first launcher variable that is set."""
    env = os.environ if env is None else env
    for name in LOCAL_RANK_VARS:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise LaunchError(f"{name}={value!r} is not an integer: fix the launcher environment") from None
    return 0


def dist_backend(cuda: bool, env=None) -> str:
    """The torch.distributed backend string: NCCL on GPUs, gloo on CPU, or the override."""
    env = os.environ if env is None else env
    return env.get("DS_RELORA_DIST_BACKEND") or (GPU_BACKEND if cuda else CPU_BACKEND)


def select_cuda_device(local_rank: int) -> None:
    """Bind this process to GPU ``local_rank`` (before NCCL starts: its communicator and every
    ``torch.cuda`` default then use this GPU, not GPU 0)."""
    import torch  # noqa: PLC0415  (torch takes seconds to import; this module is on the CLI's start-up path)

    count = torch.cuda.device_count()
    if local_rank >= count:
        raise LaunchError(
            f"local rank {local_rank} has no GPU: this node shows {count} GPU(s); start at most {count} "
            "processes per node (launch.num_gpus) or fix CUDA_VISIBLE_DEVICES"
        )
    torch.cuda.set_device(local_rank)


def return_freed_host_memory(threshold: int = 1 << 20) -> bool:
    """Make glibc give large freed blocks back to the system. After a large free glibc raises its
    mmap threshold (up to 32 MiB), so the multi-MiB transients of a rank (ZeRO-3 gathers, one
    parameter at a time at build, save and switch) then come from the heap and stay resident as
    fragments: measured +35 % peak RSS per rank on 2 CPU ranks under ZeRO-3
    (benchmarks/lifecycle/run.py), no change in step time. A fixed threshold maps every block of
    ``threshold`` bytes or more on its own and unmaps it on free. False where there is no glibc."""

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, threshold)) and bool(libc.mallopt(m_trim_threshold, threshold))
    except (OSError, AttributeError):
        return False


# Set by mpirun (MPICH/Hydra, Intel MPI; Open MPI; PMIx launchers) in every rank.
MPI_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
MPI_LOCAL_VARS = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK")
REACH_TIMEOUT = 3.0  # seconds per address a rank tries to connect to rank 0's probe


def host_addresses() -> list[str]:
    """This node's IPv4 addresses in ``hostname -I`` order (what DeepSpeed's runner picks from)."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        out = []
    return [a for a in out if ":" not in a] or [socket.gethostbyname(socket.gethostname())]


def _accept_all(sock) -> None:
    try:
        while True:
            sock.accept()[0].close()
    except OSError:  # closed by mpi_discovery
        pass


def mpi_discovery(port: int) -> None:
    """RANK, LOCAL_RANK, WORLD_SIZE and MASTER_ADDR of an mpirun rank, before DeepSpeed's own MPI
    discovery would run: that one overwrites MASTER_ADDR (launch.master_addr, passed with -x/-genv)
    with the first address of rank 0's ``hostname -I``, which on a node with several networks may
    be one the other nodes cannot reach (the rendezvous then hangs for the whole timeout). Without
    a MASTER_ADDR, rank 0 offers all its addresses and every rank says which it reaches (a TCP
    connect to a probe socket of rank 0, seconds per address); the first one every rank reaches is
    used, and if there is none every rank stops with one line naming the addresses tried."""
    from mpi4py import MPI  # noqa: PLC0415  (optional dependency: only mpirun ranks get here)

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    local = next((os.environ[k] for k in MPI_LOCAL_VARS if os.environ.get(k, "").isdigit()), None)
    if local is None:  # as DeepSpeed does: ranks on the same host, counted in rank order
        names = comm.allgather(MPI.Get_processor_name())
        local = str(sum(n == names[rank] for n in names[:rank]))
    addr = os.environ.get("MASTER_ADDR")
    if not addr:
        probe = None
        if rank == 0:
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probe.bind(("0.0.0.0", 0))
            probe.listen(128)
            # Accepted and closed at once: a full backlog would look like an unreachable address.
            threading.Thread(target=_accept_all, args=(probe,), daemon=True).start()
        offer = comm.bcast((socket.gethostname(), host_addresses(), probe.getsockname()[1]) if rank == 0 else None, root=0)
        host0, candidates, probe_port = offer
        reached = []
        for cand in candidates:
            try:
                with socket.create_connection((cand, probe_port), timeout=REACH_TIMEOUT):
                    reached.append(cand)
            except OSError:
                pass
        everyone = comm.allgather((socket.gethostname(), reached))
        if probe is not None:
            try:
                probe.shutdown(socket.SHUT_RDWR)  # wakes the accept thread
            except OSError:
                pass
            probe.close()
        common = [c for c in candidates if all(c in r for _h, r in everyone)]
        if not common:
            # Every rank raises; only rank 0 says it (worker.main prints for RANK 0).
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
            missing = "; ".join(f"{h} reaches {', '.join(r) or 'none'}" for h, r in everyone if set(r) != set(candidates))
            raise LaunchError(f"no address of rank 0's node {host0} ({', '.join(candidates)}) is reachable from every node "
                              f"({missing}): set launch.master_addr to an address on a network all nodes share")
        addr = common[0]
        if rank == 0 and addr != candidates[0]:
            skipped = ", ".join(c for c in candidates if c not in common)
            print(f"mpirun: rank 0's node {host0} has addresses {', '.join(candidates)}; {skipped} not reachable from every "
                  f"node: rendezvous on {addr} (set launch.master_addr to choose)", file=sys.stderr, flush=True)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=local, MASTER_ADDR=addr, MASTER_PORT=str(port))


def init_distributed() -> None:
    return_freed_host_memory()
    import deepspeed  # noqa: PLC0415  (deepspeed takes seconds to import and patches torch; only code that builds an engine needs it)
    import torch  # noqa: PLC0415  (torch takes seconds to import; this module is on the CLI's start-up path)
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415  (deepspeed takes seconds to import and patches torch; only code that builds an engine needs it)

    cuda = get_accelerator().device_name() == "cuda" and torch.cuda.is_available()
    if get_accelerator().device_name() == "cpu":
        # On CPU DeepSpeed JIT-loads a shared-memory op (used only by inference_all_reduce) at init,
        # behind a lock file in ~/.cache/torch_extensions: a rank killed while holding it makes every
        # later start wait forever. Training needs only gloo.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if cuda:
        select_cuda_device(local_rank_from_env())
    timeout = datetime.timedelta(seconds=float(os.environ.get("DS_RELORA_DIST_TIMEOUT", "600")))
    # Under mpirun, DeepSpeed's MPI discovery sets MASTER_PORT from this argument, not the env.
    port = int(os.environ.get("MASTER_PORT", "29500"))
    if "RANK" not in os.environ and any(k in os.environ for k in MPI_RANK_VARS):
        mpi_discovery(port)
    try:
        deepspeed.init_distributed(dist_backend=dist_backend(cuda), auto_mpi_discovery=True, verbose=False,
                                   timeout=timeout, distributed_port=port)
    except RuntimeError as exc:  # torch's DistNetworkError
        if "EADDRINUSE" not in str(exc):
            raise
        # Free at `ds-relora train`'s check, taken since (another run starting at the same time).
        port = os.environ.get("MASTER_PORT", port)
        raise LaunchError(f"master port {port} was taken by another process while the ranks started (EADDRINUSE): "
                          "pick another with --set launch.master_port=N, or leave it at the default to get a free one") from None
    if cuda and int(os.environ.get("LOCAL_RANK", "0")) != torch.cuda.current_device():
        # MPI discovery found a different local rank than the launcher variables said.
        select_cuda_device(int(os.environ["LOCAL_RANK"]))


def shutdown_distributed() -> None:
    """Leave together: a rank whose peer has already exited can abort in the process group's
    native threads at interpreter exit ("terminate called without an active exception", -6),
    so every rank of a finished run waits for the others and then closes the group before the
    process exits (``python -m ds_relora.worker``; ``main`` itself leaves the group open for
    callers that go on using it)."""
    import torch.distributed as dist  # noqa: PLC0415  (torch takes seconds to import; this module is on the CLI's start-up path)

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# How a collective fails on the survivors when a peer process is gone (gloo over TCP, NCCL).
PEER_DIED = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
             "NCCL communicator was aborted")


def peer_died_line(exc: BaseException) -> str | None:
    """One line for a survivor's console when ``exc`` only says another rank died: that rank's own
    output (and the launcher's) holds the cause, so N-1 copies of the collective's traceback do not
    help. None for any other error."""
    text = str(exc)
    reason = next((r for r in PEER_DIED if r in text), None)
    if reason is None:
        return None
    import torch.distributed as dist  # noqa: PLC0415  (torch takes seconds to import; this module is on the CLI's start-up path)

    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    # With two ranks the dead one is known; beyond that the transport error does not name it.
    who = f"rank {1 - rank}" if world == 2 else "another rank"
    backend = "gloo" if "gloo" in text else "nccl" if "NCCL" in text else "process group"
    return f"rank {rank}: stopping: {who} died ({backend}: {reason.lower()}); see that rank's output for the cause"


def _record_exit(cfg, exc: BaseException, *, peer: bool) -> None:
    """This rank's cause of failure for the launcher's summary line (ds_relora.rank_exits)."""
    if cfg is None:
        return

    rank = int(os.environ.get("RANK", "0"))
    record(cfg.train.run_dir, rank, f"{type(exc).__name__}: {exc}", peer=peer)


# Run folder of a planned stop under a supervisor (set by main, read at exit).
_PLANNED_STOP: list = []
SUPERVISED_ENV = "DS_RELORA_SUPERVISED"  # ds_relora.launch.supervise.SUPERVISED_ENV


def exit_code_for_launcher(code: int) -> int:
    """0 for a planned stop that rank 0 recorded for ``ds-relora train``: every launcher between
    (DeepSpeed's, srun --kill-on-bad-exit, mpirun) reports a non-zero rank as a failure and tears
    the others down; ``ds-relora train`` gives the run its 75 from the record. Called after the
    ranks left together, so rank 0's record is visible; without it (a failed write) the rank keeps 75."""
    from ds_relora.train.job_limits import REQUEUE_EXIT_CODE  # noqa: PLC0415  (the train package loads torch: not needed before a run)

    if code == REQUEUE_EXIT_CODE and _PLANNED_STOP and requeue_recorded(_PLANNED_STOP[0]):
        return 0
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ds_relora.worker")
    parser.add_argument("--config", required=True, help="resolved run config (written by ds-relora train)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    # The id of the run-folder lock held by the `ds-relora train` that started this worker;
    # without it (a worker started by hand) rank 0 takes the lock itself.
    parser.add_argument("--run-lock", default=None, help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args(argv)

    lock = cfg = None
    try:
        cfg = load_config(args.config)

        quiet_worker()
        init_distributed()
        register(cfg.train.run_dir, int(os.environ.get("RANK", "0")))
        from ds_relora.train.trainer import Trainer  # noqa: PLC0415  (keeps this module's import light (no torch) for the CLI's start-up)

        lock = hold_in_workers(cfg.train.run_dir, args.run_lock)
        # exit_code 75 (train.job_limits.REQUEUE_EXIT_CODE): stopped early to be requeued.
        result = Trainer(cfg).run()
        code = result.get("exit_code", 0)
        # Started by `ds-relora train` (its env, or its lock id where pdsh drops the env): rank 0
        # records the planned stop, which `ds-relora train` turns into 75 (ds_relora.launch.supervise).
        if result.get("stopped") and (args.run_lock or os.environ.get(SUPERVISED_ENV) == "1"):
            _PLANNED_STOP.append(cfg.train.run_dir)
            if os.environ.get("RANK", "0") == "0":
                record_requeue(cfg.train.run_dir, result["step"], "stopped to be requeued")
        if args.run_lock and os.environ.get("RANK", "0") == "0":
            mark_released(cfg.train.run_dir, args.run_lock)
        return code
    except UserError as exc:
        _record_exit(cfg, exc, peer=False)
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        _record_exit(cfg, exc, peer=False)
        if not is_disk_error(exc):
            raise
        print(f"error: {disk_error(exc, setting='train.run_dir')}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        line = peer_died_line(exc)
        _record_exit(cfg, exc, peer=line is not None)
        if line is None:
            raise
        print(line, file=sys.stderr, flush=True)
        return 1
    except BaseException as exc:
        if not isinstance(exc, (SystemExit, KeyboardInterrupt)):
            _record_exit(cfg, exc, peer=False)
        raise
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    from ds_relora.train.job_limits import REQUEUE_EXIT_CODE

    code = main()
    if code in (0, REQUEUE_EXIT_CODE):  # every rank finished (or stopped) at the same step
        shutdown_distributed()
    sys.exit(exit_code_for_launcher(code))
