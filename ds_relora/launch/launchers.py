"""Turn the ``launch:`` config section into the command(s) that start the workers.

``ds-relora train`` calls :func:`build_launch`, prints :meth:`LaunchPlan.describe` for
``--dry-run`` or hands the plan to :func:`run_plan`. Every user mistake (hostfile, world size,
port, master address, missing executable) raises a one-line LaunchError before anything starts.
``python -m ds_relora.launch`` holds the helpers the shell launchers and srun tasks call.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from ds_relora.config import LaunchConfig, load_config
from ds_relora.errors import LaunchError
from ds_relora.launch.hosts import (
    _slurm_var,
    _write_hostfile_text,
    check_port,
    expand_nodelist,
    free_port,
    hostfile_text,
    parse_hostfile,
    slurm_port,
)
from ds_relora.launch.preflight import _port_busy, _resolves, check_master_reachable, detect_mpi_flavor
from ds_relora.launch.supervise import run_supervised
from ds_relora.quiet import verbose_requested
from ds_relora.run_folder import config_file

WORKER = "ds_relora.worker"
DEFAULT_PORT = LaunchConfig().master_port
# Fallback for `ds-relora` started from a venv that is not activated (its bin/ is not on PATH).
VENV_BIN = os.path.dirname(sys.executable)
INSTALL_HINT = {
    "deepspeed": "pip install deepspeed==0.19.8 in this environment",
    "pdsh": "apt-get install pdsh (or set launch.no_ssh=true and start each node yourself)",
    "mpirun": "install an MPI: apt-get install openmpi-bin, or pip install mpich",
    "srun": "run inside a SLURM allocation on a node with the SLURM client tools (srun) installed",
}
# Open MPI's mpirun does not forward the environment; these are passed with -x when set.
MPI_FORWARD = ("NCCL_", "UCX_", "FI_", "CUDA_DEVICE_MAX_CONNECTIONS", "PYTHONPATH", "OMP_NUM_THREADS", "HF_", "WANDB_", "TORCH_")
# pdsh forwards only NCCL*/PYTHON*/UCX*/MV2*/MLFLOW* and .deepspeed_env lines to other nodes.
PDSH_DROPPED = ("HF_", "WANDB_", "TORCH_", "TRANSFORMERS_", "OMP_NUM_THREADS", "CUDA_DEVICE_MAX_CONNECTIONS")
SHELL_SPECIAL = re.compile(r"[$`\"'\\;&|<>(){}*?!\n]")


@dataclasses.dataclass
class LaunchPlan:
    """What to start: ``commands`` run one after the other on this node, with ``env`` added."""

    launcher: str
    commands: list[list[str]]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    hostfile_text: str | None = None
    hostfile_path: str | None = None  # hostfile_text is written here by run_plan
    in_process: bool = False  # launcher=none: the caller runs the worker itself, with env set
    world_size: int = 1
    wait_for_master: tuple[str, int] | None = None  # no_ssh nodes > 0 check rank 0 first
    warnings: list[str] = dataclasses.field(default_factory=list)

    def describe(self) -> str:
        n = len(self.commands)
        lines = [f"# ds-relora launch plan: launcher={self.launcher}, world size {self.world_size}"]
        lines += [f"# WARNING: {w}" for w in self.warnings]
        if self.hostfile_text is not None:
            lines.append(f"# hostfile {self.hostfile_path} (written before launch):")
            lines += [f"#   {ln}" for ln in self.hostfile_text.splitlines()]
        if self.wait_for_master:
            lines.append("# first waits until master %s:%d accepts connections" % self.wait_for_master)
        if self.in_process:
            lines.append("# runs the worker inside this process; equivalent command:")
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.env.items()]
        lines += [shlex.join(c) for c in self.commands] if n else ["# (nothing to run)"]
        return "\n".join(lines)


# ---------------------------------------------------------------- environment checks (see also preflight)

def _single_node_port(c: _Ctx, always_free: bool = False) -> int:
    """The rendezvous port of a one-node run. Left at the default and busy (a second run or sweep on
    the same machine), any free port does: every rank of a one-node run is started from here and
    told the port; ``always_free`` (one rank in this process: nobody else needs to know it) takes
    one even when the default looks free, since two runs starting together would both see it free.
    A port the user chose is kept, and a busy one is an error."""
    port = c.l.master_port
    if port == DEFAULT_PORT and always_free:
        return free_port()
    if err := _port_busy(port):
        if port != DEFAULT_PORT:
            c.issues.append(err)
            return port
        return free_port()
    return port


def _which(name: str, env: Mapping[str, str]) -> str | None:
    found = shutil.which(name, path=env.get("PATH", os.defpath))
    if found:
        return name if shutil.which(name) == found else found
    return shutil.which(name, path=VENV_BIN)


# ---------------------------------------------------------------- command builders

class _Ctx:
    """Inputs of one build; environment problems collect in ``issues`` (raised when strict)."""

    def __init__(self, launch: LaunchConfig, worker_args: list[str], env: Mapping[str, str]):
        self.l, self.args, self.env, self.issues = launch, worker_args, env, []

    def exe(self, name: str) -> str:
        path = _which(name, self.env)
        if path is None:
            self.issues.append(f"'{name}' executable not found on PATH: {INSTALL_HINT[name]}")
        return path or name

    def pool(self, need: bool) -> dict[str, int] | None:
        l = self.l
        if not l.hostfile:
            if need:
                raise LaunchError(f"launch.launcher={l.launcher} with {l.num_nodes} node(s) needs launch.hostfile ('host slots=N' lines): write one with launchers/make_hostfile.sh, or use launcher=local on one node")
            return None
        pool = parse_hostfile(l.hostfile)
        if len(pool) != l.num_nodes:
            raise LaunchError(f"launch.num_nodes={l.num_nodes} but hostfile {l.hostfile} lists {len(pool)} hosts: set launch.num_nodes={len(pool)} or fix the hostfile")
        for host, slots in pool.items():
            if slots != l.num_gpus:
                raise LaunchError(f"hostfile {l.hostfile} gives {host} slots={slots} but launch.num_gpus={l.num_gpus} (world size {l.num_nodes * l.num_gpus}): make them equal")
        return pool

    def master(self, first_host: str) -> str:
        addr = self.l.master_addr or first_host
        if err := _resolves(addr):
            self.issues.append(err)
        return addr

    def pdsh_safe(self) -> None:
        for a in self.args + list(self.l.extra_args):
            if SHELL_SPECIAL.search(a):
                raise LaunchError(f"argument {a!r} contains shell characters that pdsh re-interprets on the other nodes: rename the path/value")
        listed = _deepspeed_env_names()
        dropped = sorted(k for k in self.env if k.startswith(PDSH_DROPPED) and k not in listed)
        if dropped:
            self.issues.append(f"not forwarded to other nodes by pdsh: {', '.join(dropped)}; put NAME=VALUE lines in ./.deepspeed_env")


def _deepspeed_env_names() -> set[str]:
    """Names DeepSpeed's runner exports to every node from ./.deepspeed_env and ~/.deepspeed_env."""
    names = set()
    for folder in (os.path.expanduser("~"), "."):
        try:
            lines = Path(folder, ".deepspeed_env").read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        names.update(ln.split("=", 1)[0].strip() for ln in lines if "=" in ln)
    return names


def _local(c: _Ctx) -> LaunchPlan:
    l = c.l
    if l.num_nodes != 1 or l.hostfile:
        raise LaunchError(f"launch.launcher=local runs on one node (got num_nodes={l.num_nodes}, hostfile={l.hostfile}): use launcher=deepspeed, slurm or mpi for several nodes")
    # DeepSpeed drops CUDA_VISIBLE_DEVICES when --num_gpus is given and re-numbers from GPU 0.
    visible = [d for d in c.env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if visible and len(visible) != l.num_gpus:
        raise LaunchError(f"launch.num_gpus={l.num_gpus} but CUDA_VISIBLE_DEVICES exposes {len(visible)} GPUs: set launch.num_gpus={len(visible)} or unset CUDA_VISIBLE_DEVICES")
    port = _single_node_port(c)
    gpus = [] if visible else ["--num_gpus", str(l.num_gpus)]
    cmd = [c.exe("deepspeed"), *gpus, "--master_port", str(port), *launcher_quiet(l.extra_args, c.env), *l.extra_args,
           "--module", WORKER, *c.args]
    return LaunchPlan("local", [cmd], world_size=l.num_gpus)


def launcher_quiet(extra_args: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """``--log_level error`` for the single-node deepspeed launcher unless the user chose a level.

    At its default level it prints ~10 INFO lines (world info, rank mapping, "Setting
    CUDA_VISIBLE_DEVICES", spawned commands), a "no hostfile" warning that is expected on one
    node, and an "exits successfully" line per rank; ``ds-relora train`` has validated all of
    that already. Failures stay visible: the launcher reports a dying rank at ERROR, and each
    rank's own output is not touched.
    """
    chosen = any(a in ("-q", "--quiet", "--log_level") or a.startswith("--log_level=") for a in extra_args)
    return [] if chosen or verbose_requested(env) else ["--log_level", "error"]


def _deepspeed(c: _Ctx) -> LaunchPlan:
    l, pool = c.l, c.pool(need=True)
    hosts = list(pool)
    if l.no_ssh and not 0 <= l.node_rank < len(hosts):
        raise LaunchError(f"launch.node_rank={l.node_rank} is out of range for {len(hosts)} hosts in {l.hostfile}: use 0..{len(hosts) - 1}")
    addr = c.master(hosts[0])
    cmd = [c.exe("deepspeed"), "--hostfile", os.path.abspath(l.hostfile), "--master_addr", addr, "--master_port", str(l.master_port)]
    if l.no_ssh:
        cmd += ["--no_ssh", "--node_rank", str(l.node_rank)]
    else:
        c.exe("pdsh")
        c.pdsh_safe()
    cmd += ["--launcher", "pdsh", *l.extra_args, "--module", WORKER, *c.args]
    wait = (addr, l.master_port) if l.no_ssh and l.node_rank > 0 else None
    return LaunchPlan("deepspeed", [cmd], world_size=sum(pool.values()), wait_for_master=wait)


def _allocation(c: _Ctx) -> tuple[str, list[str]] | None:
    """(job id, hosts) of the SLURM allocation this runs in, None outside one; a node count that
    differs from launch.num_nodes is an error."""
    env = c.env
    if not (env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")) or not (env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")):
        return None
    hosts = expand_nodelist(_slurm_var(env, "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
    if len(hosts) != c.l.num_nodes:
        raise LaunchError(f"launch.num_nodes={c.l.num_nodes} but the SLURM allocation has {len(hosts)} nodes ({','.join(hosts)}): pass --set launch.num_nodes={len(hosts)}")
    return _slurm_var(env, "SLURM_JOB_ID", "SLURM_JOBID"), hosts


def _mpi(c: _Ctx) -> LaunchPlan:
    l = c.l
    # Inside a SLURM job without a hostfile (the sbatch script's MODE=mpi) the hosts are the
    # allocation's, and the default port is swapped for one derived from the job id, as launcher=slurm does.
    alloc = _allocation(c) if l.num_nodes > 1 and not l.hostfile else None
    pool = dict.fromkeys(alloc[1], l.num_gpus) if alloc else c.pool(need=l.num_nodes > 1)
    hostfile = os.path.abspath(f"hostfile.slurm-{alloc[0]}") if alloc else os.path.abspath(l.hostfile) if l.hostfile else None
    port = l.master_port
    if alloc and port == DEFAULT_PORT:
        port = check_port(c.env.get("MASTER_PORT") or slurm_port(alloc[0]), "MASTER_PORT")
    mpirun = c.exe("mpirun")
    flavor = l.mpi_flavor
    if flavor == "auto":
        flavor = detect_mpi_flavor(mpirun, c.env) if _which("mpirun", c.env) else "openmpi"
    world = l.num_nodes * l.num_gpus
    pinned = {"MASTER_PORT": str(port)}
    if l.master_addr:
        pinned["MASTER_ADDR"] = c.master(l.master_addr)
    cmd = [mpirun, "-np", str(world)]
    text = hostfile_text(list(pool), l.num_gpus) if alloc and flavor == "openmpi" else None
    if flavor == "openmpi":
        cmd += ["--hostfile", hostfile] if pool else []
        cmd += ["--map-by", f"ppr:{l.num_gpus}:node", "--bind-to", "none"]
        cmd += [x for k, v in pinned.items() for x in ("-x", f"{k}={v}")]
        cmd += [x for k in sorted(c.env) if k.startswith(MPI_FORWARD) and k not in pinned for x in ("-x", k)]
    else:  # Hydra forwards the whole environment by default
        cmd += ["-ppn", str(l.num_gpus)] + (["-hosts", ",".join(pool)] if pool else [])
        cmd += [x for k, v in pinned.items() for x in ("-genv", k, v)]
    cmd += [*l.extra_args, sys.executable, "-u", "-m", WORKER, *c.args]
    return LaunchPlan(f"mpi ({flavor})", [cmd], world_size=world, hostfile_text=text, hostfile_path=hostfile if text else None)


def _slurm(c: _Ctx) -> LaunchPlan:
    l, env = c.l, c.env
    if not (env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")) or not (env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")):
        raise LaunchError("launch.launcher=slurm needs a SLURM allocation (SLURM_JOB_ID/SLURM_JOB_NODELIST unset): submit launchers/slurm_deepspeed.sbatch or run inside salloc")
    job, hosts = _allocation(c)
    on_node = re.match(r"\d+", env.get("SLURM_GPUS_ON_NODE", ""))
    if on_node and int(on_node.group()) < l.num_gpus:
        raise LaunchError(f"launch.num_gpus={l.num_gpus} but SLURM gives {on_node.group()} GPUs per node: request --gpus-per-node={l.num_gpus} or lower launch.num_gpus")
    # The default port is swapped for one derived from the job id: jobs may share nodes.
    port = l.master_port if l.master_port != DEFAULT_PORT else check_port(env.get("MASTER_PORT") or slurm_port(job), "MASTER_PORT")
    addr, world, n, worker = c.master(hosts[0]), l.num_nodes * l.num_gpus, str(l.num_nodes), ["--module", WORKER, *c.args]
    helper = [sys.executable, "-m", "ds_relora.launch"]
    if not (l.hostfile or l.no_ssh):  # one srun task per rank; slurm-exec maps SLURM_* to RANK etc.
        cmd = [c.exe("srun"), "--nodes", n, "--ntasks", str(world), "--ntasks-per-node", str(l.num_gpus), "--kill-on-bad-exit=1",
               *l.extra_args, *helper, "slurm-exec", "--", sys.executable, "-u", "-m", WORKER, *c.args]
        return LaunchPlan("slurm", [cmd], env={"MASTER_ADDR": addr, "MASTER_PORT": str(port)}, world_size=world)
    path = os.path.abspath(l.hostfile or f"hostfile.slurm-{job}")
    ds = [c.exe("deepspeed"), "--hostfile", path, "--master_addr", addr, "--master_port", str(port)]
    if l.no_ssh:  # one srun task per node, each runs `deepspeed --no_ssh --node_rank $SLURM_NODEID`
        wrap = [*helper, "slurm-node", "--master-addr", addr, "--master-port", str(port), "--"]
        cmd = [c.exe("srun"), "--nodes", n, "--ntasks", n, "--ntasks-per-node", "1", "--kill-on-bad-exit=1", *l.extra_args,
               *wrap, *ds, "--no_ssh", "--node_rank", "$SLURM_NODEID", *worker]
    else:  # one deepspeed launcher on the batch host reaches the other nodes over pdsh/ssh
        c.exe("pdsh")
        c.pdsh_safe()
        cmd = [*ds, "--launcher", "pdsh", *l.extra_args, *worker]
    return LaunchPlan("slurm", [cmd], hostfile_text=hostfile_text(hosts, l.num_gpus), hostfile_path=path, world_size=world)


def _none(c: _Ctx) -> LaunchPlan:
    l = c.l
    if l.num_nodes != 1 or l.num_gpus != 1:
        raise LaunchError(f"launch.launcher=none runs one rank in this process but asks for {l.num_nodes} node(s) x {l.num_gpus} GPU(s): set num_nodes=1 and num_gpus=1, or use launcher=local")
    port = _single_node_port(c, always_free=True)
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return LaunchPlan("none", [[sys.executable, "-m", WORKER, *c.args]], env=env, in_process=True)


def build_launch(launch: LaunchConfig, worker_args: list[str], env: Mapping[str, str] = os.environ, *, strict: bool = True) -> LaunchPlan:
    """Validate ``launch`` and build the plan; with ``strict=False`` (dry runs) environment
    problems (missing executables, unresolvable master, busy port) become plan warnings."""
    check_port(launch.master_port)
    if launch.num_gpus < 1 or launch.num_nodes < 1:
        raise LaunchError(f"launch.num_gpus={launch.num_gpus} or launch.num_nodes={launch.num_nodes} is below 1: set ranks per node and node count to >= 1")
    ctx = _Ctx(launch, [str(a) for a in worker_args], env)
    plan = {"local": _local, "deepspeed": _deepspeed, "mpi": _mpi, "slurm": _slurm, "none": _none}[launch.launcher](ctx)
    if ctx.issues and strict:
        raise LaunchError(ctx.issues[0])
    plan.warnings = ctx.issues
    return plan


def run_plan(plan: LaunchPlan, run_dir: str | Path | None = None) -> int:
    """Write the hostfile, wait for the master if asked, then run the commands; the last (the
    launcher) under :func:`ds_relora.launch.supervise.run_supervised`, which names the rank that failed
    first from ``run_dir``'s exit records."""

    if plan.in_process:
        raise ValueError("launcher=none plans run in the caller's process; set plan.env and call the worker")
    if plan.hostfile_text is not None and plan.hostfile_path:
        _write_hostfile_text(plan.hostfile_path, plan.hostfile_text)
    if plan.wait_for_master:
        check_master_reachable(*plan.wait_for_master, timeout=float(os.environ.get("DS_RELORA_MASTER_WAIT", "120")))
    env = {**os.environ, **plan.env}
    for cmd in plan.commands[:-1]:
        if (rc := subprocess.call(cmd, env=env)) != 0:
            return rc
    return run_supervised(plan.commands[-1], env, run_dir)


def main_dry_run(config: str | None, overrides: Sequence[str] = (), env: Mapping[str, str] = os.environ,
                 worker_args: Sequence[str] | None = None) -> str:
    """The text ``--dry-run`` prints: the resolved plan for ``config`` with ``--set`` overrides."""

    cfg = load_config(config, list(overrides))
    # Same worker argument as `ds-relora train`, which writes the resolved config there.
    args = list(worker_args) if worker_args is not None else ["--config", str(config_file(cfg.train.run_dir))]
    return build_launch(cfg.launch, args, env, strict=False).describe()
