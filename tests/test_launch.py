"""Launchers: the command each launcher builds, every LaunchError before a launch, run_plan.
Fast: nothing trains, executables are fakes. (Host lists: test_launch_hosts.py; the shell
launchers: test_launch_scripts.py.)"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ds_relora.config import LaunchConfig
from ds_relora.launch import launchers as L
from ds_relora.launch import preflight as P
from ds_relora.launch.hosts import free_port
from harness.launch_units import ARGS, ROOT, SLURM, cfg, fakebin, hostfile, names, one_line_error, run_helper  # noqa: F401  (fixtures are used by name)


# ---------------------------------------------------------------- command building

def test_local(fakebin):
    c = cfg(num_gpus=4, extra_args=["--log_level", "warning"])
    plan = L.build_launch(c, ARGS, fakebin)
    assert names(plan.commands[0]) == ["deepspeed", "--num_gpus", "4", "--master_port", str(c.master_port),
                                       "--log_level", "warning", "--module", "ds_relora.worker", *ARGS]
    assert plan.world_size == 4 and plan.env == {} and not plan.in_process


def test_local_honours_cuda_visible_devices(fakebin):
    plan = L.build_launch(cfg(num_gpus=2), ARGS, {**fakebin, "CUDA_VISIBLE_DEVICES": "2,3"})
    assert "--num_gpus" not in plan.commands[0]
    one_line_error(L.build_launch, cfg(num_gpus=4), ARGS, {**fakebin, "CUDA_VISIBLE_DEVICES": "2,3"}, match="CUDA_VISIBLE_DEVICES")


def test_deepspeed_pdsh(fakebin, hostfile):
    c = cfg(launcher="deepspeed", num_nodes=2, num_gpus=2, hostfile=hostfile)
    plan = L.build_launch(c, ARGS, fakebin)
    assert names(plan.commands[0]) == ["deepspeed", "--hostfile", hostfile, "--master_addr", "localhost", "--master_port",
                                       str(c.master_port), "--launcher", "pdsh", "--module", "ds_relora.worker", *ARGS]
    assert plan.world_size == 4 and plan.wait_for_master is None


def test_deepspeed_no_ssh(fakebin, hostfile):
    c = cfg(launcher="deepspeed", num_nodes=2, num_gpus=2, hostfile=hostfile, no_ssh=True, node_rank=1, master_addr="127.0.0.1")
    os.remove(fakebin["PATH"].split(":")[0] + "/pdsh")  # no_ssh needs no pdsh
    cmd = L.build_launch(c, ARGS, {**fakebin, "PATH": fakebin["PATH"].split(":")[0]}).commands[0]
    i = cmd.index("--no_ssh")
    assert cmd[i:i + 3] == ["--no_ssh", "--node_rank", "1"] and cmd[cmd.index("--master_addr") + 1] == "127.0.0.1"
    assert L.build_launch(c, ARGS, fakebin).wait_for_master == ("127.0.0.1", c.master_port)
    assert L.build_launch(dataclasses.replace(c, node_rank=0), ARGS, fakebin).wait_for_master is None


def test_deepspeed_pdsh_warns_about_dropped_env(fakebin, hostfile):
    c = cfg(launcher="deepspeed", num_nodes=2, num_gpus=2, hostfile=hostfile)
    plan = L.build_launch(c, ARGS, {**fakebin, "HF_HOME": "/x"}, strict=False)
    assert any("HF_HOME" in w and ".deepspeed_env" in w for w in plan.warnings)
    one_line_error(L.build_launch, c, ["--config", "a;rm -rf b"], fakebin, match="shell characters")


def test_mpi_openmpi(fakebin, hostfile):
    c = cfg(launcher="mpi", num_nodes=2, num_gpus=2, hostfile=hostfile)
    plan = L.build_launch(c, ARGS, {**fakebin, "NCCL_DEBUG": "INFO"})
    cmd = names(plan.commands[0])
    assert plan.launcher == "mpi (openmpi)" and plan.world_size == 4
    assert cmd[:5] == ["mpirun", "-np", "4", "--hostfile", hostfile]
    assert ["--map-by", "ppr:2:node"] == cmd[5:7]
    assert f"MASTER_PORT={c.master_port}" in cmd and cmd[cmd.index("NCCL_DEBUG") - 1] == "-x"
    assert cmd[-5:] == [sys.executable, "-u", "-m", "ds_relora.worker", *ARGS][-5:]


def test_mpi_mpich(fakebin, hostfile):
    env = {**fakebin, "FAKE_MPI": "HYDRA build details:\n    Version: 4.2.0"}
    c = cfg(launcher="mpi", num_nodes=2, num_gpus=2, hostfile=hostfile, master_addr="127.0.0.1")
    cmd = names(L.build_launch(c, ARGS, env).commands[0])
    assert cmd[:7] == ["mpirun", "-np", "4", "-ppn", "2", "-hosts", "localhost,127.0.0.1"]
    assert ["-genv", "MASTER_PORT", str(c.master_port), "-genv", "MASTER_ADDR", "127.0.0.1"] == cmd[7:13]


def test_mpi_in_a_slurm_allocation_takes_its_hosts_and_port(fakebin):
    env = {**fakebin, **SLURM}
    plan = L.build_launch(cfg(launcher="mpi", num_nodes=2, num_gpus=2, mpi_flavor="openmpi", master_port=29500), ARGS, env)
    cmd = names(plan.commands[0])
    assert cmd[:5] == ["mpirun", "-np", "4", "--hostfile", os.path.abspath("hostfile.slurm-4242")]
    assert plan.hostfile_text == "node01 slots=2\nnode02 slots=2\n" and plan.hostfile_path == cmd[4]
    assert f"MASTER_PORT={L.slurm_port('4242')}" in cmd
    cmd = names(L.build_launch(cfg(launcher="mpi", num_nodes=2, num_gpus=2, mpi_flavor="mpich"), ARGS, env).commands[0])
    assert cmd[:7] == ["mpirun", "-np", "4", "-ppn", "2", "-hosts", "node01,node02"]
    one_line_error(L.build_launch, cfg(launcher="mpi", num_nodes=3, num_gpus=2), ARGS, env, match="SLURM allocation has 2 nodes")


def test_mpi_single_node_and_flavor_detection(fakebin):
    cmd = L.build_launch(cfg(launcher="mpi", num_gpus=2, mpi_flavor="mpich"), ARGS, fakebin).commands[0]
    assert names(cmd)[:5] == ["mpirun", "-np", "2", "-ppn", "2"] and "-hosts" not in cmd
    assert P.detect_mpi_flavor("mpirun", fakebin) == "openmpi"
    one_line_error(P.detect_mpi_flavor, "mpirun", {**fakebin, "FAKE_MPI": "something else 1.0"}, match="mpi_flavor")
    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent))
    if mpirun:  # the venv's MPICH wheel
        assert P.detect_mpi_flavor(mpirun, os.environ) == "mpich"


def test_slurm_srun_mode(fakebin):
    env = {**fakebin, **SLURM}
    plan = L.build_launch(cfg(launcher="slurm", num_nodes=2, num_gpus=4, master_port=29500), ARGS, env, strict=False)
    cmd = names(plan.commands[0])
    assert cmd[:8] == ["srun", "--nodes", "2", "--ntasks", "8", "--ntasks-per-node", "4", "--kill-on-bad-exit=1"]
    assert cmd[8:14] == [sys.executable, "-m", "ds_relora.launch", "slurm-exec", "--", sys.executable]
    assert plan.env == {"MASTER_ADDR": "node01", "MASTER_PORT": str(L.slurm_port("4242"))} and plan.world_size == 8
    assert plan.hostfile_text is None


def test_slurm_hostfile_mode(fakebin, tmp_path):
    hf = str(tmp_path / "hf")
    c = cfg(launcher="slurm", num_nodes=2, num_gpus=8, hostfile=hf, master_addr="127.0.0.1")
    plan = L.build_launch(c, ARGS, {**fakebin, **SLURM})
    assert plan.hostfile_text == "node01 slots=8\nnode02 slots=8\n" and plan.hostfile_path == hf
    assert not Path(hf).exists()  # written only by run_plan, never by a dry run
    assert names(plan.commands[0])[:8] == ["deepspeed", "--hostfile", hf, "--master_addr", "127.0.0.1", "--master_port", str(c.master_port), "--launcher"]


def test_slurm_no_ssh_mode(fakebin):
    plan = L.build_launch(cfg(launcher="slurm", num_nodes=2, num_gpus=8, no_ssh=True), ARGS, {**fakebin, **SLURM}, strict=False)
    cmd = plan.commands[0]
    assert names(cmd)[:6] == ["srun", "--nodes", "2", "--ntasks", "2", "--ntasks-per-node"]
    assert cmd[cmd.index("--node_rank") + 1] == "$SLURM_NODEID" and "--no_ssh" in cmd and "slurm-node" in cmd
    assert plan.hostfile_path.endswith("hostfile.slurm-4242") and "node02 slots=8" in plan.hostfile_text
    assert "'$SLURM_NODEID'" in plan.describe()


def test_none_runs_in_process(fakebin):
    plan = L.build_launch(cfg(launcher="none"), ARGS, fakebin)
    assert plan.in_process and plan.env["WORLD_SIZE"] == "1" and plan.env["RANK"] == "0"
    assert plan.commands[0][-4:] == ["-m", "ds_relora.worker", *ARGS]
    with pytest.raises(ValueError):
        L.run_plan(plan)


def test_describe_is_shell_quoted(fakebin):
    plan = L.build_launch(cfg(num_gpus=1), ["--config", "my runs/a.yaml"], fakebin)
    assert plan.describe().splitlines()[-1].endswith("--config 'my runs/a.yaml'")


def test_main_dry_run_reads_config(tmp_path, fakebin, monkeypatch):
    yml = tmp_path / "run.yaml"
    yml.write_text("launch:\n  launcher: deepspeed\n  num_nodes: 2\n  hostfile: does/not/exist\n")
    one_line_error(L.main_dry_run, str(yml), env=fakebin, match="does not exist")
    text = L.main_dry_run(str(yml), ["launch.launcher=local", "launch.num_nodes=1", "launch.hostfile=null", "launch.num_gpus=3"], env=fakebin)
    assert "--num_gpus 3" in text and "--config runs/default/config.yaml" in text

# ---------------------------------------------------------------- every other LaunchError

def test_world_size_mismatches(fakebin, hostfile):
    one_line_error(L.build_launch, cfg(launcher="deepspeed", num_nodes=3, num_gpus=2, hostfile=hostfile), ARGS, fakebin,
                   match="num_nodes=3 but hostfile .* lists 2 hosts")
    one_line_error(L.build_launch, cfg(launcher="deepspeed", num_nodes=2, num_gpus=8, hostfile=hostfile), ARGS, fakebin,
                   match="slots=2 but launch.num_gpus=8")
    one_line_error(L.build_launch, cfg(launcher="deepspeed", num_nodes=2, num_gpus=2), ARGS, fakebin, match="needs launch.hostfile")
    one_line_error(L.build_launch, cfg(launcher="mpi", num_nodes=2, num_gpus=2), ARGS, fakebin, match="needs launch.hostfile")
    one_line_error(L.build_launch, cfg(num_nodes=2), ARGS, fakebin, match="launcher=local runs on one node")
    one_line_error(L.build_launch, cfg(launcher="none", num_gpus=2), ARGS, fakebin, match="launcher=none")
    one_line_error(L.build_launch, cfg(num_gpus=0), ARGS, fakebin, match=">= 1")


def test_slurm_errors(fakebin):
    one_line_error(L.build_launch, cfg(launcher="slurm"), ARGS, fakebin, match="needs a SLURM allocation")
    one_line_error(L.build_launch, cfg(launcher="slurm", num_nodes=3), ARGS, {**fakebin, **SLURM}, match="allocation has 2 nodes")
    one_line_error(L.build_launch, cfg(launcher="slurm", num_nodes=2, num_gpus=8), ARGS, {**fakebin, **SLURM, "SLURM_GPUS_ON_NODE": "4"},
                   match="SLURM gives 4 GPUs per node")


@pytest.mark.parametrize("node_rank", [2, -1])
def test_node_rank_out_of_range(fakebin, hostfile, node_rank):
    c = cfg(launcher="deepspeed", num_nodes=2, num_gpus=2, hostfile=hostfile, no_ssh=True, node_rank=node_rank)
    one_line_error(L.build_launch, c, ARGS, fakebin, match="node_rank=.* out of range")


@pytest.mark.parametrize("launcher,exe,hint", [
    ("local", "deepspeed", "pip install deepspeed"),
    ("deepspeed", "pdsh", "apt-get install pdsh"),
    ("mpi", "mpirun", "openmpi-bin"),
    ("slurm", "srun", "SLURM"),
])
def test_missing_executable(fakebin, hostfile, tmp_path, launcher, exe, hint):
    os.remove(fakebin["PATH"].split(":")[0] + "/" + exe)
    env = {**fakebin, "PATH": fakebin["PATH"].split(":")[0], **SLURM}
    multi = launcher in ("deepspeed",)
    c = cfg(launcher=launcher, num_nodes=2 if multi or launcher == "slurm" else 1, num_gpus=2,
            hostfile=hostfile if multi else None, master_addr="127.0.0.1", mpi_flavor="openmpi")
    msg = one_line_error(L.build_launch, c, ARGS, env, match=f"'{exe}' executable not found")
    assert hint in msg
    assert any(exe in w for w in L.build_launch(c, ARGS, env, strict=False).warnings)


@pytest.mark.parametrize("port", [80, 0, 70000])
def test_invalid_port(fakebin, port):
    one_line_error(L.build_launch, LaunchConfig(master_port=port), ARGS, fakebin, match="not a usable port")


def test_busy_port(fakebin):
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        one_line_error(L.build_launch, LaunchConfig(master_port=port), ARGS, fakebin, match="already in use")


@pytest.mark.parametrize("launcher", ["local", "none"])
def test_busy_default_port_is_replaced_on_one_node(fakebin, launcher):
    # A second one-node run (or sweep) on the same machine must not collide on the default port.
    with socket.socket() as s:
        # As the launcher's own check does: a connection of an earlier run still in TIME_WAIT on
        # the port must not make this bind fail (the test would then listen elsewhere).
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", L.DEFAULT_PORT))
        except OSError:
            pass  # someone else holds it: busy either way
        s.listen()
        plan = L.build_launch(LaunchConfig(launcher=launcher, num_gpus=1), ARGS, fakebin)
    text = " ".join(plan.commands[0]) + " " + str(plan.env)
    assert str(L.DEFAULT_PORT) not in text


def test_master_addr_does_not_resolve(fakebin, hostfile):
    c = cfg(launcher="deepspeed", num_nodes=2, num_gpus=2, hostfile=hostfile, master_addr="no-such-host.invalid")
    one_line_error(L.build_launch, c, ARGS, fakebin, match="does not resolve")
    assert any("does not resolve" in w for w in L.build_launch(c, ARGS, fakebin, strict=False).warnings)


def test_check_master_reachable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        P.check_master_reachable("127.0.0.1", s.getsockname()[1], timeout=2)
    port = free_port()  # nothing listens: refused until the deadline, then a one-line error
    t0 = time.monotonic()
    msg = one_line_error(P.check_master_reachable, "127.0.0.1", port, timeout=1.0, match="cannot reach master")
    assert time.monotonic() - t0 < 5 and f"127.0.0.1:{port}" in msg and "check --master_addr/firewall" in msg
    one_line_error(P.check_master_reachable, "no-such-host.invalid", port, timeout=1.0, match="does not resolve")


def test_cli_error_is_one_line_exit_2():
    res = run_helper(["hostfile", "gpu[01-", "--slots", "2"], {})
    assert res.returncode == 2 and res.stderr.startswith("error: nodelist") and res.stderr.count("\n") == 1

def test_run_plan_writes_hostfile_then_runs_the_launcher(tmp_path):
    hf = tmp_path / "shared" / "hf"
    code = ("import sys; from ds_relora.launch import launchers as L; "
            f"sys.exit(L.run_plan(L.LaunchPlan('x', [['sh', '-c', 'cat \"$0\"; echo $FOO; exit 7', {str(hf)!r}]], env={{'FOO': 'bar'}}, "
            f"hostfile_text='a slots=2\\n', hostfile_path={str(hf)!r})))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.stdout == "a slots=2\nbar\n", res.stderr
    assert res.returncode == 7  # the launcher's exit code is the command's


def test_run_plan_stops_when_master_unreachable(monkeypatch):
    monkeypatch.setenv("DS_RELORA_MASTER_WAIT", "0.5")
    plan = L.LaunchPlan("deepspeed", [["false"]], wait_for_master=("127.0.0.1", free_port()))
    one_line_error(L.run_plan, plan, match="cannot reach master")
