"""``python -m ds_relora.launch``: the per-node helper commands the launch scripts run on each node
(``dry-run`` of a config, ``slurm-exec``: one task's rank variables from SLURM's, ``slurm-node``:
one node's DeepSpeed launcher, started after rank 0's rendezvous is reachable)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from ds_relora.errors import LaunchError, UserError
from ds_relora.launch.hosts import _slurm_var, check_port, expand_nodelist, hostfile_text, slurm_env, write_hostfile
from ds_relora.launch.launchers import main_dry_run
from ds_relora.launch.preflight import check_master_reachable


def _exec_task(cmd: list[str], extra_env: dict[str, str]) -> None:
    if not cmd:
        raise LaunchError("no command after '--': write `python -m ds_relora.launch slurm-exec -- python -m ds_relora.worker ...`")
    os.execvpe(cmd[0], cmd, {**os.environ, **extra_env})


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds_relora.launch", description="launch helpers of ds_relora")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("dry-run", help="print the launch plan of a run config")
    p.add_argument("--config")
    p.add_argument("--set", action="append", nargs="+", default=[], metavar="KEY=VALUE")
    p = sub.add_parser("hostfile", help="print or write 'host slots=N' lines")
    p.add_argument("hosts", nargs="?", help="a,b or a SLURM nodelist like gpu[01-04]; default $SLURM_JOB_NODELIST")
    p.add_argument("--slots", type=int, required=True)
    p.add_argument("-o", "--output", help="file to write (default: print)")
    for name in ("check-master", "slurm-node", "slurm-exec"):
        p = sub.add_parser(name, help="fail fast when rank 0's port is unreachable" if name == "check-master" else "(runs in srun tasks)")
        if name != "slurm-exec":
            p.add_argument("--master-addr", required=True)
            p.add_argument("--master-port", type=int, required=True)
            p.add_argument("--wait", type=float, default=float(os.environ.get("DS_RELORA_MASTER_WAIT", "120")))
        if name != "check-master":
            p.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "dry-run":
            print(main_dry_run(a.config, [s for group in a.set for s in group]))
        elif a.cmd == "hostfile":
            hosts = expand_nodelist(a.hosts or _slurm_var(os.environ, "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
            print(write_hostfile(hosts, a.slots, a.output) if a.output else hostfile_text(hosts, a.slots), end="")
        elif a.cmd == "check-master":
            check_master_reachable(a.master_addr, check_port(a.master_port, "--master-port"), a.wait)
        else:
            cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
            if a.cmd == "slurm-exec":
                _exec_task(cmd, slurm_env(os.environ))
            node = _slurm_var(os.environ, "SLURM_NODEID")
            if node != "0":
                check_master_reachable(a.master_addr, a.master_port, a.wait)
            # DeepSpeed's launchers have no SIGUSR1 handler: SLURM's USR1 to the job's tasks
            # (--signal=USR1@N, scancel --signal=USR1) would end them and orphan the ranks, which
            # install their own handler (an ignored signal stays ignored across exec).
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
            _exec_task([node if x == "$SLURM_NODEID" else x for x in cmd], {})
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0

