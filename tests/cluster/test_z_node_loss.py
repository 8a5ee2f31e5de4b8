"""A 2-node run (launcher=deepspeed with a hostfile, over pdsh/ssh, 1 rank per node) with
``launch.master_addr`` naming node1's second interface (``node1-data``, the data network; the
first address of ``hostname -I`` is the management one):

* the rendezvous and the collectives use that interface: node2's rank is connected to
  10.200.0.211 only (never node1's management address or loopback), and the steps before the
  loss equal the 1 node x 2 ranks reference bit for bit (with 2 ranks an all-reduce is one
  addition, so no launch path may change a bit);
* node loss: every process of node2 (its rank, its launcher, sshd, slurmd, munged) is killed
  while rank 0 waits at a step. The rank on node1 stops within seconds, ``ds-relora train``
  names node2 in one line, no half-written checkpoint is trusted, and ``--resume auto``
  continues on node1 alone (1 rank, elastic resume) to the end.

One run checks both (a pdsh launch costs half a minute on the 2 cores). Runs last in this folder
(the box's node2 is rebuilt afterwards)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.checks import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from box_procs import VENV_BIN, Proc, python_tcp_peers, rank_env  # noqa: E402
from runs import BOX_PATH, NODE_ENV, STEPS, last_step, run_config  # noqa: E402

pytestmark = pytest.mark.distributed
HOLD = 6
# From the kill to `ds-relora train` returning on node1: the survivor's next collective fails
# on the closed connection at once; pdsh then reports the lost ssh session.
EXIT_BOUND = 60.0
RUN_TIMEOUT = 240


def _kill_node(box, node: str) -> int:
    ns = f"{box.prefix}-{node}"
    killed = 0
    for _ in range(5):
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        if not pids:
            break
        subprocess.run(["kill", "-9", *pids], capture_output=True)
        killed += len(pids)
        time.sleep(0.2)
    return killed


def test_pdsh_run_uses_the_data_network_and_a_lost_node_is_named_and_resumed(box, cluster_data, reference, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    launch = {"launcher": "deepspeed", "num_nodes": 2, "num_gpus": 1, "hostfile": str(hostfile), "master_addr": "node1-data"}
    # The global batch is fixed, so the resume on one rank sees the same batches (elastic resume).
    cfg, run_dir = run_config(cluster_data, tmp_path, "lost", launch, global_batch_size=8)
    release = tmp_path / "release"
    fault = {"DS_RELORA_FAULT": f"hold:{HOLD}", "DS_RELORA_FAULT_RANK": "0", "DS_RELORA_FAULT_RELEASE": str(release),
             # gloo binds to the address its hostname resolves to (eth0) unless told
             "GLOO_SOCKET_IFNAME": "eth1"}
    # pdsh passes on only these lines (read from the launcher's working folder) to both nodes.
    (tmp_path / ".deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in {**NODE_ENV, **fault}.items()))
    env = rank_env({**NODE_ENV, **fault, "HOME": "/root", "PATH": f"{VENV_BIN}:{BOX_PATH}"})
    cmd = box.cmd("node1", "bash", "-c", f"cd {tmp_path} && exec {VENV_BIN / 'ds-relora'} train --config {cfg}")
    proc = Proc(cmd, env, tmp_path / "logs" / "lost")
    try:
        deadline = time.time() + RUN_TIMEOUT
        while last_step(run_dir) < HOLD - 1 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.3)
        assert proc.poll() is None and last_step(run_dir) == HOLD - 1, proc.log()
        # Rank 1 (node2) is in step HOLD's all-reduce: its connections to rank 0 are open.
        sockets = box.run("node2", "ss", "-tnp", check=False).stdout
        assert _kill_node(box, "node2") > 0
        killed_at = time.time()
        release.touch()
        code = proc.wait(RUN_TIMEOUT)
        took = time.time() - killed_at
    finally:
        release.touch()
        proc.kill()
        box.revive("node2")
    out = proc.stdout + proc.stderr
    peers = python_tcp_peers(sockets)
    assert peers and peers == {("10.200.0.212", "10.200.0.211")}, sockets
    before_loss = read_metrics(run_dir)[0]
    assert [before_loss[s] for s in range(1, HOLD)] == [reference[s] for s in range(1, HOLD)], proc.log()
    assert code not in (0, 75), proc.log()
    assert took < EXIT_BOUND, f"node1 took {took:.0f} s to stop after node2 was lost"
    lines = [ln for ln in out.splitlines() if ln.startswith("error: ") and "node2" in ln]
    assert len(lines) == 1 and "rank(s) 1 on node2 died without saying why" in lines[0], proc.log()
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert f"step-{HOLD}" not in ckpts, ckpts  # the lost step was never saved

    # The remaining node alone: 1 rank, same global batch, from the newest complete checkpoint.
    cfg1, _ = run_config(cluster_data, tmp_path, "lost", {"launcher": "local", "num_gpus": 1}, global_batch_size=8)
    env1 = rank_env({**NODE_ENV, "HOME": "/root", "PATH": f"{VENV_BIN}:{BOX_PATH}"})
    resume = Proc(box.cmd("node1", str(VENV_BIN / "ds-relora"), "train", "--config", str(cfg1), "--resume", "auto"), env1,
                  tmp_path / "logs" / "resume")
    try:
        assert resume.wait(RUN_TIMEOUT) == 0, resume.log()
    finally:
        resume.kill()
    losses, events = read_metrics(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1)), sorted(losses)
    (event,) = [e for e in events if e["event"] == "resume"]
    assert event["step"] < HOLD, event
