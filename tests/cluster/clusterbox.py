"""The cluster in a box (tests/cluster/box/): network-namespace nodes with their own hostname, two
networks, sshd, pdsh, munge and SLURM. Brought up once per test session, torn down at the end,
after a failure, and at interpreter exit (atexit), whatever happened.

Network rule: nothing is added to the host's network namespace; the nodes reach only loopback and
each other (no default route), see box/up.sh.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent / "box"
BINARIES = ("ip", "unshare", "nsenter", "setpriv", "ssh-keygen", "sshd", "ssh", "pdsh", "munged", "slurmctld", "slurmd",
            "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
PACKAGES = "apt-get install -y openssh-server openssh-client pdsh munge slurm-wlm slurmctld slurmd slurm-client mpich"
NODES = 2


def missing_reason() -> str | None:
    """Why the box cannot come up here (one line), or None."""
    if sys.platform != "linux":
        return "the cluster box needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the cluster box needs root (network namespaces, mounts, sshd)"
    path = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
    missing = [b for b in BINARIES if shutil.which(b, path=path) is None]
    if missing:
        return f"cluster box: {', '.join(missing)} not installed ({PACKAGES})"
    probe = f"dsr-probe-{os.getpid()}"
    made = not os.path.isdir("/run/netns")
    try:
        r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=20)
        if r.returncode != 0:
            return f"cluster box: cannot create a network namespace here ({r.stderr.strip() or r.returncode})"
        r = subprocess.run(["ip", "netns", "exec", probe, "unshare", "--uts", "--mount", "true"], capture_output=True,
                           text=True, timeout=20)
        if r.returncode != 0:
            return f"cluster box: no UTS/mount namespaces here ({r.stderr.strip() or r.returncode})"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=20)
        if made:
            subprocess.run(["umount", "/run/netns"], capture_output=True, timeout=20)
            shutil.rmtree("/run/netns", ignore_errors=True)
    return None


class Box:
    def __init__(self, nodes: int = NODES):
        self.nodes = nodes
        # Under /tmp: /tmp is the box's shared filesystem (the nodes see the host's /tmp).
        self.dir = Path(tempfile.mkdtemp(prefix="dsr-box-", dir="/tmp"))
        self.prefix = f"dsr{os.getpid() % 100000}"
        self._down = False

    def up(self) -> None:
        env = {**os.environ, "PREFIX": self.prefix, "PYPREFIX": os.path.realpath(sys.base_prefix),
               "PATH": f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"}
        atexit.register(self.down)
        started = time.time()
        r = subprocess.run(["bash", str(HERE / "up.sh"), str(self.dir), str(self.nodes)], env=env, capture_output=True,
                           text=True, timeout=120)
        self.up_seconds = time.time() - started
        if r.returncode != 0:
            raise RuntimeError(f"cluster box did not come up: {(r.stderr or r.stdout).strip()[-2000:]}")

    def down(self) -> None:
        if self._down:
            return
        self._down = True
        subprocess.run(["bash", str(HERE / "down.sh"), str(self.dir)], capture_output=True, timeout=120)

    def revive(self, node: str, timeout: float = 60) -> None:
        """Start ``node`` again after all its processes were killed (its network namespace stays)."""
        (self.dir / "run" / f"ready.{node}").unlink(missing_ok=True)
        env = {**os.environ, "PYPREFIX": os.path.realpath(sys.base_prefix), "PATH": f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"}
        log = open(self.dir / "log" / f"{node}.init.log", "a")
        holder = subprocess.Popen(["ip", "netns", "exec", f"{self.prefix}-{node}", "unshare", "--uts", "--mount",
                                   "--propagation", "private", "bash", str(HERE / "node-init.sh"), node, str(self.dir)],
                                  env=env, stdout=log, stderr=log, start_new_session=True)
        (self.dir / "run" / f"holder.{node}").write_text(str(holder.pid))
        deadline = time.time() + timeout
        while not (self.dir / "run" / f"ready.{node}").exists():
            if time.time() > deadline or holder.poll() is not None:
                raise RuntimeError(f"{node} did not come back: {self.log(f'{node}.init.log')[-1500:]}")
            time.sleep(0.1)
        self.wait_idle()

    def wait_idle(self, timeout: float = 90) -> None:
        """Until SLURM shows every node idle again: a node whose slurmd was unreachable for a
        while (a test that cut its network, a revived node) is DOWN until it registers again."""
        deadline = time.time() + timeout
        while True:
            states = self.run("node1", "sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split("\n")
            states = [ln.split() for ln in states if ln.strip()]
            if len(states) == self.nodes and all(st == "idle" for _n, st in states):
                return
            if time.time() > deadline:
                raise AssertionError(f"SLURM nodes not idle after {timeout:.0f} s: {states}")
            for name, st in states:
                if st.startswith(("down", "drain")):
                    self.run("node1", "scontrol", "update", f"nodename={name}", "state=resume", check=False)
            time.sleep(1)

    def cmd(self, node: str, *argv: str) -> list[str]:
        return ["bash", str(HERE / "on"), str(self.dir), node, *argv]

    def run(self, node: str, *argv: str, env: dict | None = None, timeout: float = 60, check: bool = True):
        r = subprocess.run(self.cmd(node, *argv), env=env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"on {node}: {' '.join(argv)} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r

    def sh(self, node: str, script: str, **kw):
        return self.run(node, "bash", "-c", script, **kw)

    def log(self, name: str) -> str:
        try:
            return (self.dir / "log" / name).read_text()[-4000:]
        except OSError:
            return ""
