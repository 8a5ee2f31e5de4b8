"""Real launches on one machine (CPU, gloo): what the cluster launch paths must show.

* two "nodes" on loopback through the deepspeed launcher's ``--no_ssh`` mode (two concurrent
  ``ds-relora train`` processes, node_rank 0 and 1) train exactly like one node with two ranks
  (``launcher=local``), and so does ``mpirun -np 2`` with mpi4py rank discovery;
* every shipped ``ds_configs/*.json`` trains through the trainer on 2 ranks, and the
  comms-logging one records the gradient all-reduce;
* launch mistakes fail with one ``error: ...`` line that names the fix, and a rank that dies
  mid-training takes the whole launch down within seconds instead of hanging.

Every process runs in its own session with a hard timeout; on timeout or failure the whole
process group (launcher, ranks, MPI proxies) is killed. Ranks use OMP_NUM_THREADS=1 (2 cores,
and every compared run uses the same per-rank thread count, so the float math is identical).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, read_metrics, tiny_run_config, write_config

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(420)]

WORKERS = REPO / "tests" / "workers"
VENV_BIN = Path(sys.executable).parent
DS_RELORA = [str(VENV_BIN / "ds-relora")] if (VENV_BIN / "ds-relora").is_file() else [sys.executable, "-m", "ds_relora.cli"]
SWAP = [sys.executable, str(WORKERS / "launch_swap.py")]  # ds-relora train with another worker module
TRAIN_TIMEOUT = 150  # one tiny launch takes ~15-35 s here
STEPS = 16
MERGES = [8, 12]  # warm start 4 steps, then ReLoRA with merges every 4
REL = 1e-6
# Variables a surrounding launcher (torchrun, srun, mpirun) may have set: they would change how
# the ranks find each other, so no launch here inherits them.
FOREIGN = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE")
FOREIGN_PREFIXES = ("SLURM_", "PMI_", "PMIX_", "OMPI_", "HYDRA_", "MPI_LOCAL")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- process handling

class Proc:
    """One launched command in its own session (process group), output in files."""

    def __init__(self, name: str, cmd: list[str], env: dict, logdir: Path):
        logdir.mkdir(parents=True, exist_ok=True)
        self.name, self.cmd = name, cmd
        self._out, self._err = open(logdir / f"{name}.out", "w+"), open(logdir / f"{name}.err", "w+")
        self.started = time.time()
        self.ended: float | None = None
        self.p = subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=self._out, stderr=self._err,
                                  stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def rc(self) -> int | None:
        rc = self.p.poll()
        if rc is not None and self.ended is None:
            self.ended = time.time()
        return rc

    def wait(self, deadline: float) -> int:
        """Exit status; kills the whole group and fails the test past ``deadline`` (time.time())."""
        while self.rc is None:
            if time.time() > deadline:
                self.kill()
                pytest.fail(f"{self.name} still running after {time.time() - self.started:.0f} s: killed\n{self.log()}")
            time.sleep(0.1)
        return self.p.returncode

    def kill(self) -> None:
        """SIGKILL everything in the group (the launcher's ranks and proxies too), even after the
        leader exited: an orphaned rank must not outlive the test."""
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def _read(self, f) -> str:
        f.flush()
        f.seek(0)
        return f.read()

    @property
    def stdout(self) -> str:
        return self._read(self._out)

    @property
    def stderr(self) -> str:
        return self._read(self._err)

    def log(self) -> str:
        return f"--- {self.name}: {' '.join(self.cmd)}\n--- stdout\n{self.stdout[-5000:]}\n--- stderr\n{self.stderr[-5000:]}"


@pytest.fixture(scope="module")
def procs():
    """Every Proc started by this module; all groups are killed at the end, passed or not."""
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()
        p._out.close()
        p._err.close()


def start(procs: list, name: str, cmd: list[str], env: dict, logdir: Path) -> Proc:
    p = Proc(name, cmd, env, logdir)
    procs.append(p)
    return p


def run(procs: list, name: str, cmd: list[str], env: dict, logdir: Path, timeout: float = TRAIN_TIMEOUT) -> Proc:
    p = start(procs, name, cmd, env, logdir)
    p.wait(time.time() + timeout)
    return p


# ---------------------------------------------------------------- environment

@pytest.fixture(scope="module")
def env():
    """The ranks' environment: CPU accelerator, one thread per rank, no inherited rank variables,
    the venv's bin/ (deepspeed, mpirun, hydra_pmi_proxy) first on PATH and tests/workers importable."""
    base = {k: v for k, v in os.environ.items() if k not in FOREIGN and not k.startswith(FOREIGN_PREFIXES)}
    base.update({
        "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1", "DS_RELORA_MASTER_WAIT": "60",
        # The launcher's INFO lines (world info, spawned commands) are what these tests read.
        "DS_RELORA_VERBOSE": "1",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', os.defpath)}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(WORKERS), str(REPO), os.environ.get("PYTHONPATH")])),
    })
    return base


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("launch")


def train_config(data: Path, root: Path, name: str, launch: dict, **sections) -> tuple[Path, Path]:
    """(config yaml, run_dir): the tiny ReLoRA run (ZeRO-2, 16 steps, warm start 4, merges at 8
    and 12) with this ``launch`` section."""
    run_dir = root / name
    cfg = tiny_run_config(data, run_dir, 2, launch=launch, **sections)
    cfg = {**cfg, "train": {**cfg["train"], "total_steps": STEPS},
           "relora": {**cfg["relora"], "warm_start_steps": 4, "reset_every": 4}}
    return write_config(root / f"{name}.yaml", cfg), run_dir


def step_lines(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(ln)["step"] for ln in lines if json.loads(ln)["type"] == "step"]


def final_weights(run_dir: Path) -> dict:
    from ds_relora.checkpoint_format import open_weights

    return open_weights(run_dir / "checkpoints" / f"step-{STEPS}").load_all()


def assert_same_training(ref: Path, other: Path) -> None:
    """Same per-step losses (rel 1e-6), same merges, same final eval and final weights."""
    import torch

    a, events_a = read_metrics(ref)
    b, events_b = read_metrics(other)
    assert sorted(b) == sorted(a) == list(range(1, STEPS + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=REL), (step, a[step], b[step])
    merges = lambda ev: [e["lr_index"] for e in ev if e["event"] == "merge"]  # noqa: E731
    assert merges(events_b) == merges(events_a) == MERGES
    evals = lambda ev: [e["loss"] for e in ev if e["event"] == "eval"]  # noqa: E731
    assert evals(events_b) == pytest.approx(evals(events_a), rel=REL) and len(evals(events_a)) == 1
    wa, wb = final_weights(ref), final_weights(other)
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=REL, atol=1e-9, msg=name)


# ---------------------------------------------------------------- 1 node x 2 ranks (reference)

@pytest.fixture(scope="module")
def local_run(prepared_data, root, env, procs):
    cfg, run_dir = train_config(prepared_data, root, "local", {"launcher": "local", "num_gpus": 2, "master_port": free_port()})
    p = run(procs, "local", [*DS_RELORA, "train", "--config", str(cfg)], env, root / "logs")
    assert p.p.returncode == 0, p.log()
    return p, run_dir


def test_local_launcher_two_ranks_trains(local_run):
    p, run_dir = local_run
    out = p.stdout + p.stderr
    assert "deepspeed.launcher.launch" in out and "dist_world_size=2" in out, p.log()
    assert "2 rank(s), ZeRO-2" in out
    losses, events = read_metrics(run_dir)
    curve = [losses[s] for s in sorted(losses)]
    assert len(curve) == STEPS and all(math.isfinite(x) for x in curve)
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4 - 0.3, curve
    assert [e["step"] for e in events if e["event"] == "switch"] == [4]
    assert [e["lr_index"] for e in events if e["event"] == "merge"] == MERGES


# ---------------------------------------------------------------- 2 "nodes" x 1 rank, --no_ssh

@pytest.fixture(scope="module")
def two_node_run(prepared_data, root, env, procs):
    hostfile = root / "hostfile-2nodes"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")  # names are only keys with --no_ssh
    launch = {"launcher": "deepspeed", "hostfile": str(hostfile), "no_ssh": True, "master_addr": "127.0.0.1",
              "master_port": free_port(), "num_nodes": 2, "num_gpus": 1}
    cfg, run_dir = train_config(prepared_data, root, "two-nodes", launch)  # one run_dir: a shared filesystem
    cmd = [*DS_RELORA, "train", "--config", str(cfg), "--set"]
    deadline = time.time() + TRAIN_TIMEOUT
    node0 = start(procs, "node0", [*cmd, "launch.node_rank=0"], env, root / "logs")
    # Node 1 starts once node 0 has written run_dir/config.yaml: two `ds-relora train` writing
    # that file at the same instant race on write_atomic's fixed "config.yaml.tmp" name and one
    # dies with FileNotFoundError (seen here; see the report). Node 1 still has to wait for
    # rank 0's port (check_master_reachable), which is what the test is about.
    while not (run_dir / "config.yaml").exists():
        assert node0.rc is None, node0.log()
        assert time.time() < deadline, node0.log()
        time.sleep(0.1)
    node1 = start(procs, "node1", [*cmd, "launch.node_rank=1"], env, root / "logs")
    rcs = [node0.wait(deadline), node1.wait(deadline)]
    assert rcs == [0, 0], node0.log() + "\n" + node1.log()
    return node0, node1, run_dir


def test_two_nodes_no_ssh_each_run_their_own_rank(two_node_run):
    node0, node1, run_dir = two_node_run
    for k, node in enumerate((node0, node1)):
        out = node.stdout + node.stderr
        # each node's own deepspeed launcher starts one local rank of a world of 2
        assert f"nnodes=2, num_local_procs=1, node_rank={k}" in out and "dist_world_size=2" in out, node.log()
    # metrics come from global rank 0 only (not from every node's local rank 0) ...
    assert step_lines(run_dir) == list(range(1, STEPS + 1))
    # ... while both nodes write their own shards into the shared checkpoint folder
    final = run_dir / "checkpoints" / f"step-{STEPS}"
    for rank in (0, 1):
        assert (final / f"rng_rank{rank}.pt").is_file() and (final / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()
    assert json.loads((final / "meta.json").read_text())["world_size"] == 2


def test_two_nodes_match_one_node(local_run, two_node_run):
    assert_same_training(local_run[1], two_node_run[2])


# ---------------------------------------------------------------- mpirun -np 2, mpi4py discovery

@pytest.fixture(scope="module")
def mpi_run(prepared_data, root, env, procs):
    cfg, run_dir = train_config(prepared_data, root, "mpi", {"launcher": "mpi", "num_gpus": 2, "master_port": free_port()})
    p = run(procs, "mpi", [*DS_RELORA, "train", "--config", str(cfg)], env, root / "logs")
    assert p.p.returncode == 0, p.log()
    return p, cfg, run_dir


def test_mpirun_discovers_ranks_and_matches_one_node(local_run, mpi_run, env):
    from ds_relora.launch import main_dry_run

    p, cfg, run_dir = mpi_run
    plan = main_dry_run(str(cfg), env=env)
    # mpirun is named bare when on PATH, else by its absolute path (e.g. a venv not activated).
    assert "launcher=mpi (mpich), world size 2" in plan, plan
    assert re.search(r"\n(\S*/)?mpirun -np 2 -ppn 2 ", plan), plan
    out = p.stdout + p.stderr
    # No RANK/WORLD_SIZE in the ranks' environment (env fixture), no deepspeed launcher: the
    # world size 2 below can only come from DeepSpeed's mpi4py discovery.
    assert "deepspeed.launcher" not in out and "2 rank(s), ZeRO-2" in out, p.log()
    assert_same_training(local_run[1], run_dir)


# ---------------------------------------------------------------- every shipped DeepSpeed config

DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
CONFIG_STEPS = 6  # merge after step 3


@pytest.fixture(scope="module")
def config_runs(prepared_data, root, env, procs):
    """All shipped JSONs trained one after the other in ONE 2-rank process group (plain env-var
    launch, like srun/torchrun), each reporting what the comms logger recorded."""
    paths, runs = [], {}
    for js in DS_CONFIGS:
        run_dir = root / "ds-configs" / js.stem
        cfg = tiny_run_config(prepared_data, run_dir, 2, deepspeed={"config": str(js)}, train={"total_steps": CONFIG_STEPS},
                              optim={"warmup_steps": 2}, relora={"warm_start_steps": 0, "reset_every": 3})
        paths.append(str(write_config(root / "ds-configs" / f"{js.stem}.yaml", cfg)))
        runs[js.name] = run_dir
    port, ranks = free_port(), []
    for rank in range(2):
        renv = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        ranks.append(start(procs, f"configs-rank{rank}", [sys.executable, str(WORKERS / "launch_configs.py"), *paths],
                           renv, root / "logs"))
    deadline = time.time() + TRAIN_TIMEOUT
    while any(r.rc is None for r in ranks):
        if any(r.rc for r in ranks):  # one failed: give the other a moment to stop, then kill it
            time.sleep(2)
            for r in ranks:
                r.kill()
            break
        assert time.time() < deadline, "\n".join(r.log() for r in ranks)
        time.sleep(0.2)
    assert [r.p.returncode for r in ranks] == [0, 0], "\n".join(r.log() for r in ranks)
    comms = {}
    for r in ranks:
        for line in r.stdout.splitlines():
            if line.startswith("RESULT "):
                rec = json.loads(line[len("RESULT "):])
                comms[(Path(rec["config"]).stem + ".json", rec["rank"])] = rec
    assert len(comms) == 2 * len(DS_CONFIGS), "\n".join(r.log() for r in ranks)
    return runs, comms


def test_expected_configs_are_shipped():
    assert {"zero0.json", "zero1.json", "zero2.json", "zero2_comms_logging.json", "zero3.json",
            "zero3_offload.json"} <= {p.name for p in DS_CONFIGS}


@pytest.mark.parametrize("name", [p.name for p in DS_CONFIGS])
def test_shipped_ds_config_trains(config_runs, name):
    runs, comms = config_runs
    losses, events = read_metrics(runs[name])
    assert sorted(losses) == list(range(1, CONFIG_STEPS + 1)) and all(math.isfinite(v) for v in losses.values())
    assert [e["lr_index"] for e in events if e["event"] == "merge"] == [3]
    assert (runs[name] / "checkpoints" / f"step-{CONFIG_STEPS}" / "meta.json").is_file()
    # fp32 on CPU ("bf16": "auto" resolves to off): every stage computes the same run
    ref, _ = read_metrics(runs["zero0.json"])
    for step in ref:
        assert losses[step] == pytest.approx(ref[step], rel=REL), (name, step)
    if name != "zero2_comms_logging.json":  # the logger stays off unless a config turns it on
        assert all(not comms[(name, r)]["comms_enabled"] and not comms[(name, r)]["ops"] for r in (0, 1))


def test_comms_logging_config_records_gradient_allreduce(config_runs):
    runs, comms = config_runs
    name = "zero2_comms_logging.json"
    meta = json.loads((runs[name] / "checkpoints" / f"step-{CONFIG_STEPS}" / "meta.json").read_text())
    trainable = meta["params"]["trainable"]
    for rank in (0, 1):
        rec = comms[(name, rank)]
        assert rec["comms_enabled"], rec
        # debug=true names each op by its caller; ZeRO-2 reduces the gradients in allreduce_bucket:
        # one bucket per optimizer step (bucket 2e8 elements > the adapters), fp32 gradients of
        # exactly the trainable (adapter) parameters, the frozen base is never communicated.
        key = "all_reduce | [Caller Func: allreduce_bucket]"
        assert rec["ops"].get(key) == CONFIG_STEPS, rec["ops"]
        assert rec["bytes"][key] == CONFIG_STEPS * 4 * trainable, (rec["bytes"][key], trainable)
        assert any(k.startswith("all_gather") for k in rec["ops"]), rec["ops"]  # updated partitions go back


# ---------------------------------------------------------------- launch errors: one line, no hang

MASTER_WAIT = 5
NO_SSH = {"launcher": "deepspeed", "no_ssh": True, "master_addr": "127.0.0.1", "num_nodes": 2, "num_gpus": 1}


def one_line_error(rc: int, stdout: str, stderr: str, *fragments: str) -> str:
    """Exit status 2 and exactly one stderr line ``error: <problem>: <fix>``, nothing on stdout."""
    lines = stderr.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and stdout == "", (rc, stdout, stderr)
    line = lines[0]
    assert line.startswith("error: ") and ": " in line[len("error: "):], line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def test_unreachable_master_fails_after_the_configured_wait(prepared_data, root, env, procs):
    """Node 1 of a --no_ssh launch whose master port has nothing listening: exec_plan's
    check_master_reachable retries for DS_RELORA_MASTER_WAIT seconds, then one error line."""
    hostfile = root / "hostfile-2x1"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()  # nothing listens there
    launch = {**NO_SSH, "hostfile": str(hostfile), "node_rank": 1, "master_port": port}
    cfg, run_dir = train_config(prepared_data, root / "errors", "unreachable-master", launch)
    p = run(procs, "unreachable-master", [*DS_RELORA, "train", "--config", str(cfg)],
            {**env, "DS_RELORA_MASTER_WAIT": str(MASTER_WAIT)}, root / "logs", timeout=90)
    line = one_line_error(p.p.returncode, p.stdout, p.stderr, f"cannot reach master 127.0.0.1:{port}", "master_addr")
    took = p.ended - p.started
    # It retried the refused connection for the whole wait (rank 0 may still be importing torch),
    # then stopped: DS_RELORA_MASTER_WAIT honoured (not the 120 s default), no rendezvous hang.
    assert MASTER_WAIT <= took < MASTER_WAIT + 40, (took, line)
    assert not (run_dir / "metrics.jsonl").exists()  # the deepspeed launcher never ran


@pytest.mark.parametrize("case, launch, fragments", [
    ("slots-vs-num-gpus", {"hostfile": "2x2", "node_rank": 0}, ("slots=2", "launch.num_gpus=1", "make them equal")),
    ("hosts-vs-num-nodes", {"hostfile": "2x1", "num_nodes": 3, "node_rank": 0},
     ("launch.num_nodes=3", "lists 2 hosts", "set launch.num_nodes=2")),
    ("missing-hostfile", {"hostfile": "absent", "node_rank": 1}, ("does not exist", "make_hostfile.sh", "launch.hostfile")),
    ("no-hostfile", {"node_rank": 0}, ("needs launch.hostfile", "make_hostfile.sh")),
])
def test_bad_launch_fails_before_anything_starts(prepared_data, root, capsys, case, launch, fragments):
    """World size (hostfile slots vs num_nodes x num_gpus) and hostfile mistakes are found by
    build_launch, before the run_dir is written or any process starts: ``ds-relora train`` runs
    in this process (cli.main, as the console script calls it)."""
    from ds_relora.cli import main

    hostfiles = {"2x1": "node0 slots=1\nnode1 slots=1\n", "2x2": "node0 slots=2\nnode1 slots=2\n"}
    launch = {**NO_SSH, "master_port": free_port(), **launch}
    if "hostfile" in launch:
        path = root / "errors" / f"hostfile-{case}"
        if launch["hostfile"] in hostfiles:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(hostfiles[launch["hostfile"]])
        launch["hostfile"] = str(path)
    cfg, run_dir = train_config(prepared_data, root / "errors", case, launch)
    capsys.readouterr()
    rc = main(["train", "--config", str(cfg)])
    captured = capsys.readouterr()
    one_line_error(rc, captured.out, captured.err, *fragments)
    assert not run_dir.exists()  # nothing written, nothing started


# ---------------------------------------------------------------- a rank that dies

DIE_AT = 5


def _die_env(env: dict, mark: Path, rank: int = 1) -> dict:
    return {**env, "DS_RELORA_TEST_DIE_AT_STEP": str(DIE_AT), "DS_RELORA_TEST_DIE_RANK": str(rank),
            "DS_RELORA_TEST_DIE_MARK": str(mark)}


def test_dying_rank_stops_the_deepspeed_launch(prepared_data, root, env, procs):
    """launcher=local (the real deepspeed launcher, 2 ranks) running tests/workers/launch_die_worker.py
    instead of ds_relora.worker: rank 1 exits with 3 after step 5 while rank 0 goes on to the next
    collective."""
    launch = {"launcher": "local", "num_gpus": 2, "master_port": free_port()}
    cfg, run_dir = train_config(prepared_data, root, "die-deepspeed", launch)
    mark = root / "die-deepspeed.mark"
    cmd = [*SWAP, "launch_die_worker", "train", "--config", str(cfg)]
    p = run(procs, "die-deepspeed", cmd, _die_env(env, mark), root / "logs")
    out = p.stdout + p.stderr
    assert "'-m', 'launch_die_worker'" in out and "dist_world_size=2" in out, p.log()
    assert mark.is_file(), p.log()  # it really died where asked, after training started
    assert p.p.returncode != 0, p.log()
    assert p.ended - float(mark.read_text()) < 60, p.log()
    assert "exits with return code" in out  # deepspeed's launch.py saw it and stopped the rest
    assert max(step_lines(run_dir)) == DIE_AT and not (run_dir / "checkpoints" / f"step-{STEPS}").exists()


@pytest.fixture(scope="module")
def plain_env_deaths(prepared_data, root, env, procs):
    """No launcher watching (srun/torchrun-style env vars), rank 1 dies in one group and rank 0
    (the TCPStore host) in another; both 2-rank groups run at the same time."""
    groups = {}
    for dying in (0, 1):
        cfg, run_dir = train_config(prepared_data, root, f"die-env-{dying}", {"launcher": "none"})
        mark = root / f"die-env-{dying}.mark"
        port, ranks = free_port(), []
        for rank in range(2):
            renv = {**_die_env(env, mark, dying), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                    "LOCAL_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            cmd = [sys.executable, "-m", "launch_die_worker", "--config", str(cfg)]
            ranks.append(start(procs, f"die-env-{dying}-rank{rank}", cmd, renv, root / "logs"))
        groups[dying] = (ranks, mark, run_dir)
    deadline = time.time() + TRAIN_TIMEOUT
    for ranks, _, _ in groups.values():
        for r in ranks:
            r.wait(deadline)
    return groups


@pytest.mark.parametrize("dying", [1, 0])
def test_dying_rank_stops_a_plain_env_launch(plain_env_deaths, dying):
    """The survivor must notice on its own (gloo sees the closed connection) and exit non-zero,
    not sit in the collective until the 600 s process-group timeout."""
    ranks, mark, run_dir = plain_env_deaths[dying]
    logs = "\n".join(r.log() for r in ranks)
    assert mark.is_file(), logs
    died, survivor = float(mark.read_text()), ranks[1 - dying]
    assert ranks[dying].p.returncode == 3, logs
    assert survivor.p.returncode != 0 and survivor.ended - died < 60, logs
    assert max(step_lines(run_dir)) == DIE_AT  # rank 0 logged up to the death, nothing after
