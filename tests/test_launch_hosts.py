"""Host lists: SLURM nodelist expansion, the SLURM task environment and the task wrappers,
hostfiles written and parsed (every malformed one is one line). Fast: nothing launches."""

from __future__ import annotations

import sys

import pytest

from ds_relora.launch import hosts as H
from ds_relora.launch import launchers as L
from harness.launch_units import SLURM, one_line_error, run_helper


# ---------------------------------------------------------------- SLURM parsing

@pytest.mark.parametrize("expr,hosts", [
    ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
    ("node[01-02]", ["node01", "node02"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("a,b.example.org", ["a", "b.example.org"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
    ("solo", ["solo"]),
])
def test_expand_nodelist(expr, hosts):
    assert L.expand_nodelist(expr) == hosts


@pytest.mark.parametrize("expr", ["", "a,,b", "gpu[01-03", "gpu01]", "gpu[03-01]", "gpu[a-c]", "gpu[]", "g[[1]]", ",a"])
def test_expand_nodelist_errors(expr):
    one_line_error(L.expand_nodelist, expr, match="nodelist")


def test_slurm_env():
    env = {**SLURM, "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}
    assert H.slurm_env(env) == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "node01",
                                "MASTER_PORT": str(L.slurm_port("4242"))}
    assert 1024 <= L.slurm_port("4242") <= 65535 and L.slurm_port("4242") != L.slurm_port("4243")
    got = H.slurm_env({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "31000"})
    assert got["MASTER_ADDR"] == "10.0.0.1" and got["MASTER_PORT"] == "31000"
    one_line_error(H.slurm_env, {k: v for k, v in env.items() if k != "SLURM_PROCID"}, match="SLURM_PROCID is not set")
    one_line_error(H.slurm_env, {**env, "SLURM_LOCALID": "x"}, match="not a number")


def test_slurm_task_wrappers():
    probe = [sys.executable, "-c", "import os,sys; print(sys.argv[1:], *(os.environ[k] for k in ('RANK','LOCAL_RANK','WORLD_SIZE','MASTER_ADDR','MASTER_PORT')))"]
    env = {**SLURM, "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4"}
    res = run_helper(["slurm-exec", "--", *probe, "a"], env)
    assert res.stdout.split() == ["['a']", "3", "1", "4", "node01", str(L.slurm_port("4242"))], res.stderr
    res = run_helper(["slurm-node", "--master-addr", "127.0.0.1", "--master-port", "1", "--", "echo", "--node_rank", "$SLURM_NODEID"], {"SLURM_NODEID": "0"})
    assert res.stdout.strip() == "--node_rank 0", res.stderr


# ---------------------------------------------------------------- hostfiles

def test_write_and_parse_hostfile(tmp_path):
    path = tmp_path / "sub" / "hf"
    assert H.write_hostfile(["a", "b"], 8, path) == "a slots=8\nb slots=8\n"
    assert L.parse_hostfile(path) == {"a": 8, "b": 8}
    one_line_error(H.write_hostfile, ["a", "a"], 8, path, match="duplicates")
    one_line_error(H.write_hostfile, [], 8, path, match="no hosts")
    res = run_helper(["hostfile", "g[1-2]", "--slots", "4"], {})
    assert res.stdout == "g1 slots=4\ng2 slots=4\n"


@pytest.mark.parametrize("content,match", [
    ("a slots=2\nb\n", "line 2 'b' is malformed"),
    ("a slots=two\n", "malformed"),
    ("a slots=0\n", "malformed"),
    ("a slots=2\na slots=2\n", "lists host a twice"),
    ("# only a comment\n\n", "lists no hosts"),
])
def test_hostfile_errors(tmp_path, content, match):
    path = tmp_path / "hf"
    path.write_text(content)
    one_line_error(L.parse_hostfile, path, match=match)


def test_hostfile_missing_or_unreadable(tmp_path):
    one_line_error(L.parse_hostfile, tmp_path / "nope", match="does not exist")
    bad = tmp_path / "binary"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    one_line_error(L.parse_hostfile, bad, match="unreadable")
