"""mpirun (MPICH/Hydra, over ssh) across 2 box nodes where the first network (eth0, the first
address of ``hostname -I``) does not connect the nodes: node2's eth0 is unplugged from its
bridge. Only the second network (eth1, names ``nodeN-data``) joins them.

DeepSpeed's MPI discovery replaced MASTER_ADDR with rank 0's first ``hostname -I`` address, so
the rendezvous hung until the process-group timeout. Now launch.master_addr is the address used
(seen in node2's sockets), and without it the ranks find an address every node reaches within
seconds and say which they skipped. When no address of rank 0's node is reachable from every
node, every rank stops within seconds and one line names the addresses tried and what each node
reached (rank 0's node is made to offer only its management address, the one node2 cannot reach,
while MPI's own traffic uses the data network: tests/workers/mpi_narrowed_worker.py).

The three runs train at the same time (each its own port; node2's sockets are told apart by the
processes of each run).
"""

from __future__ import annotations

import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from harness import REPO
from harness.checks import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from box_procs import VENV_BIN, Proc, processes_mentioning, rank_env  # noqa: E402
from runs import BOX_PATH, NODE_ENV, STEPS, last_step, run_config  # noqa: E402

pytestmark = pytest.mark.distributed
RUN_TIMEOUT = 240
# Bounds the failure before the fix (a hung rendezvous) to two minutes instead of ten.
DIST_TIMEOUT = "120"
HOLD = 3


@pytest.fixture(scope="module")
def split_box(box):
    """node2's mgmt link leaves the bridge for this module: eth0 of node1 is unreachable from node2
    (SLURM, which runs on eth0, loses node2 meanwhile)."""
    sw = f"{box.prefix}-sw"
    import subprocess

    subprocess.run(["ip", "-n", sw, "link", "set", "n2a", "nomaster"], check=True)
    try:
        r = box.run("node2", "bash", "-c", "timeout 3 bash -c '</dev/tcp/10.200.0.11/22' && echo reached || echo unreachable",
                    check=False)
        assert "unreachable" in r.stdout, "node1's eth0 is still reachable from node2"
        yield box
    finally:
        subprocess.run(["ip", "-n", sw, "link", "set", "n2a", "master", "br0"], check=False)
        # SLURM's own traffic runs on eth0: slurmctld marked node2 DOWN meanwhile.
        box.wait_idle()


def _mpirun_train(box, data: Path, root: Path, name: str, master_addr: str | None, port: int):
    hostfile = root / f"{name}.hosts"
    hostfile.write_text("node1-data slots=1\nnode2-data slots=1\n")
    launch = {"launcher": "mpi", "mpi_flavor": "mpich", "num_nodes": 2, "num_gpus": 1, "hostfile": str(hostfile),
              "extra_args": ["-iface", "eth1"], "master_port": port}
    if master_addr:
        launch["master_addr"] = master_addr
    cfg, run_dir = run_config(data, root, name, launch)
    release = root / f"release-{name}"
    env = rank_env({**NODE_ENV, "HOME": "/root", "PATH": f"{VENV_BIN}:{BOX_PATH}", "DS_RELORA_DIST_TIMEOUT": DIST_TIMEOUT,
                    # gloo binds to the address its hostname resolves to (eth0 here) unless told
                    "GLOO_SOCKET_IFNAME": "eth1",
                    "DS_RELORA_FAULT": f"hold:{HOLD}", "DS_RELORA_FAULT_RANK": "0", "DS_RELORA_FAULT_RELEASE": str(release)})
    started = time.time()
    proc = Proc(box.cmd("node1", str(VENV_BIN / "ds-relora"), "train", "--config", str(cfg)), env, root / "logs" / name)
    sockets = ""
    try:
        deadline = time.time() + RUN_TIMEOUT
        while last_step(run_dir) < HOLD - 1 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.3)
        if proc.poll() is None and last_step(run_dir) >= HOLD - 1:
            # Rank 1 (node2) is in the step's all-reduce: its connections to rank 0 are open.
            ours = {ln.split(":")[0] for ln in processes_mentioning(str(run_dir))}  # its config, its run folder
            sockets = "\n".join(ln for ln in box.run("node2", "ss", "-tnp", check=False).stdout.splitlines()
                                 if any(f"pid={pid}," in ln for pid in ours))
        release.touch()
        code = proc.wait(max(1.0, deadline - time.time()))
    finally:
        release.touch()  # a rank left holding would keep its node busy for the next test
        proc.kill()
    return {"code": code, "proc": proc, "run_dir": run_dir, "sockets": sockets, "seconds": time.time() - started}


def _python_peers(sockets: str) -> set[str]:
    """Remote addresses of node2's established TCP connections held by python processes of the run (the rank)."""
    return {m.group(1) for ln in sockets.splitlines() if "ESTAB" in ln and "python" in ln
            for m in [re.search(r"\s(\d+\.\d+\.\d+\.\d+):\d+\s+users:", ln)] if m}


def _unreachable(box, data: Path, root: Path):
    cfg, run_dir = run_config(data, root, "unreachable", {"launcher": "mpi", "num_nodes": 2, "num_gpus": 1})
    env = rank_env({**NODE_ENV, "HOME": "/root", "PATH": f"{VENV_BIN}:{BOX_PATH}", "DS_RELORA_DIST_TIMEOUT": DIST_TIMEOUT,
                    "GLOO_SOCKET_IFNAME": "eth1"})
    cmd = [str(VENV_BIN / "mpirun"), "-np", "2", "-ppn", "1", "-hosts", "node1-data,node2-data", "-iface", "eth1",
           "-genv", "MASTER_PORT", "29712", sys.executable, "-u", str(REPO / "tests" / "workers" / "mpi_narrowed_worker.py"),
           "10.200.0.11", "--config", str(cfg)]
    started = time.time()
    proc = Proc(box.cmd("node1", *cmd), env, root / "logs" / "unreachable")
    try:
        code = proc.wait(RUN_TIMEOUT)
    finally:
        proc.kill()
    return {"code": code, "proc": proc, "run_dir": run_dir, "seconds": time.time() - started}


@pytest.fixture(scope="module")
def mpi_runs(split_box, cluster_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("mpirun")
    with ThreadPoolExecutor(3) as pool:
        runs = {"pinned": pool.submit(_mpirun_train, split_box, cluster_data, root, "pinned", "10.200.0.211", 29711),
                "discovered": pool.submit(_mpirun_train, split_box, cluster_data, root, "discovered", None, 29713),
                "unreachable": pool.submit(_unreachable, split_box, cluster_data, root)}
    return runs


def test_mpirun_uses_launch_master_addr_for_the_rendezvous(mpi_runs, reference):
    run = mpi_runs["pinned"].result()
    assert run["code"] == 0, run["proc"].log()
    peers = _python_peers(run["sockets"])
    assert "10.200.0.211" in peers and "10.200.0.11" not in peers, run["sockets"]
    losses = read_metrics(run["run_dir"])[0]
    assert [losses[s] for s in range(1, STEPS + 1)] == [reference[s] for s in range(1, STEPS + 1)]


def test_mpirun_without_master_addr_skips_the_unreachable_address_in_seconds(mpi_runs, reference):
    run = mpi_runs["discovered"].result()
    out = run["proc"].stdout + run["proc"].stderr
    assert run["code"] == 0, run["proc"].log()
    line = [ln for ln in out.splitlines() if ln.startswith("mpirun: rank 0's node")]
    assert len(line) == 1 and "10.200.0.11, 10.200.0.211" in line[0] and "rendezvous on 10.200.0.211" in line[0], out[-4000:]
    assert run["seconds"] < float(DIST_TIMEOUT), "the rendezvous waited for the process-group timeout"
    losses = read_metrics(run["run_dir"])[0]
    assert [losses[s] for s in range(1, STEPS + 1)] == [reference[s] for s in range(1, STEPS + 1)]


def test_mpirun_with_no_address_every_node_reaches_stops_in_seconds_with_one_line(mpi_runs):
    run = mpi_runs["unreachable"].result()
    proc, took = run["proc"], run["seconds"]
    out = proc.stdout + proc.stderr
    assert run["code"] != 0, proc.log()
    lines = [ln for ln in out.splitlines() if "no address of rank 0's node" in ln]
    assert lines == ["error: no address of rank 0's node node1 (10.200.0.11) is reachable from every node "
                     "(node2 reaches none): set launch.master_addr to an address on a network all nodes share"], proc.log()
    assert took < float(DIST_TIMEOUT), f"took {took:.0f} s: the ranks waited for the process-group timeout"
    assert last_step(run["run_dir"]) == 0
