"""A node whose view of the shared run folder lags: node2 sees, at the run folder's path, its own
copy taken before the newest checkpoint landed (a bind mount in node2's mount namespace, what an
NFS client with a stale attribute cache or a late sync shows). ``--resume auto`` on 2 nodes
(launcher=deepspeed over pdsh, 1 rank per node) must not let node2 pick its own newest
checkpoint: rank 0 chooses, and node2's rank, which cannot read that one, stops the run before
anything trains with one line naming node2 and the checkpoint's path."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from box_procs import VENV_BIN, Proc, rank_env, start_train  # noqa: E402
from runs import BOX_PATH, NODE_ENV, run_config  # noqa: E402

pytestmark = pytest.mark.distributed
STOP = 4
RUN_TIMEOUT = 240


def test_node_with_a_lagging_run_folder_view_stops_the_resume_in_one_line(box, cluster_data, tmp_path):
    # The first part, on this host: 1 rank, global batch 8, stopped (and saved) at step STOP.
    cfg1, run_dir = run_config(cluster_data, tmp_path, "lag", {"launcher": "none"}, global_batch_size=8, stop_after_steps=STOP)
    first = start_train(cfg1, tmp_path / "logs" / "first", {})
    try:
        assert first.wait(RUN_TIMEOUT) == 75, first.log()  # stopped early, to be resumed
    finally:
        first.kill()
    chosen = run_dir / "checkpoints" / f"step-{STOP}"
    assert chosen.is_dir(), sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    # node2's view: the run folder as it was before step STOP's checkpoint arrived.
    stale = tmp_path / "node2-view"
    shutil.copytree(run_dir, stale)
    shutil.rmtree(stale / "checkpoints" / f"step-{STOP}")
    box.run("node2", "mount", "--bind", str(stale), str(run_dir))
    try:
        assert not box.sh("node2", f"test -e {chosen} && echo seen || echo missing").stdout.strip() == "seen"
        hostfile = tmp_path / "hosts"
        hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
        launch = {"launcher": "deepspeed", "num_nodes": 2, "num_gpus": 1, "hostfile": str(hostfile), "master_addr": "node1"}
        cfg2, _ = run_config(cluster_data, tmp_path, "lag", launch, global_batch_size=8)
        (tmp_path / ".deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in NODE_ENV.items()))
        env = rank_env({**NODE_ENV, "HOME": "/root", "PATH": f"{VENV_BIN}:{BOX_PATH}"})
        cmd = box.cmd("node1", "bash", "-c", f"cd {tmp_path} && exec {VENV_BIN / 'ds-relora'} train --config {cfg2} --resume auto")
        proc = Proc(cmd, env, tmp_path / "logs" / "resume")
        try:
            started = time.time()
            code = proc.wait(RUN_TIMEOUT)
        finally:
            proc.kill()
    finally:
        box.run("node2", "umount", str(run_dir), check=False)
    out = proc.stdout + proc.stderr
    assert code not in (0, 75), proc.log()
    # ds-relora train's own line (the ranks' lines come prefixed with their host by pdsh).
    lines = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.log()
    assert f"rank 1 on host node2 cannot read the checkpoint {chosen} chosen by rank 0" in lines[0], lines[0]
    # Nothing trained past the checkpoint, on either view.
    steps = [ln for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if '"type": "step"' in ln]
    assert len(steps) == STOP, steps[-3:]
    assert time.time() - started < RUN_TIMEOUT
