"""Real launches (test_launch_nodes, test_launch_ds_configs, test_launch_failures,
test_console_failures, test_run_lock): ``ds-relora train`` with a launcher, or ranks
started by hand that a test watches one by one (which rank died, with which code, when).
Processes in their own sessions with hard timeouts, the ranks' environment, the launch variant of
the tiny run config and the comparison of two trainings. Ranks that only have to finish run
through ``harness.ranks.run_workers`` instead.

Every process runs in its own session with a hard timeout; on timeout or failure the whole
process group (launcher, ranks, MPI proxies) is killed. Ranks use OMP_NUM_THREADS=1 (2 cores,
and every compared run uses the same per-rank thread count, so the float math is identical).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import REPO
from harness.checks import read_metrics, within_rel
from harness.configs import tiny_run_config, write_config
from harness.ranks import rank_env


WORKERS = REPO / "tests" / "workers"
VENV_BIN = Path(sys.executable).parent
DS_RELORA = [str(VENV_BIN / "ds-relora")] if (VENV_BIN / "ds-relora").is_file() else [sys.executable, "-m", "ds_relora.cli"]
SWAP = [sys.executable, str(WORKERS / "launch_swap.py")]  # ds-relora train with another worker module
TRAIN_TIMEOUT = 150  # one tiny launch takes ~15-35 s here
STEPS = 16
MERGES = [8, 12]  # warm start 4 steps, then ReLoRA with merges every 4
# Launch paths (local vs 2 nodes over pdsh, vs mpirun) run the same ranks on the same split:
# measured exactly equal on the native (AVX2) and ATen-default kernels
# (benchmarks/invariance/tolerances.py, AMD EPYC). 1e-6 leaves room for another reduction order
# in a launcher's process group; a wrong rank mapping moves the loss by 1e-3 or more.
REL = 1e-6
# Variables a surrounding launcher (torchrun, srun, mpirun) may have set: they would change how
# the ranks find each other, so no launch here inherits them.
FOREIGN = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE")
FOREIGN_PREFIXES = ("SLURM_", "PMI_", "PMIX_", "OMPI_", "HYDRA_", "MPI_LOCAL")


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


def start_ranks(procs: list, name: str, cmd: list[str], env: dict, logdir: Path, world: int, port: int) -> list[Proc]:
    """``world`` ranks of ``cmd`` with the env-var rendezvous on ``port`` (as srun or torchrun
    would start them), one Proc each, named ``<name>-rank<r>``."""
    return [start(procs, f"{name}-rank{rank}", cmd, {**env, **rank_env(rank, world, port)}, logdir)
            for rank in range(world)]


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
    from ds_relora.checkpoint.format import open_weights

    return open_weights(run_dir / "checkpoints" / f"step-{STEPS}").load_all()


def assert_same_training(ref: Path, other: Path) -> None:
    """Same per-step losses (rel 1e-6), same merges, same final eval and final weights."""
    import torch

    a, events_a = read_metrics(ref)
    b, events_b = read_metrics(other)
    assert sorted(b) == sorted(a) == list(range(1, STEPS + 1))
    for step in a:
        assert within_rel(b[step], a[step], REL, "launch paths: losses"), (step, a[step], b[step])
    merges = lambda ev: [e["lr_index"] for e in ev if e["event"] == "merge"]  # noqa: E731
    assert merges(events_b) == merges(events_a) == MERGES
    evals = lambda ev: [e["loss"] for e in ev if e["event"] == "eval"]  # noqa: E731
    assert len(evals(events_a)) == len(evals(events_b)) == 1
    assert within_rel(evals(events_b)[0], evals(events_a)[0], REL, "launch paths: eval")
    wa, wb = final_weights(ref), final_weights(other)
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=REL, atol=1e-9, msg=name)
