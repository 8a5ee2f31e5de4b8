"""The launcher's summary line names the ranks and the node that died without a record (a lost
node, kill -9), from the hosts the ranks registered at start. No processes: records only."""

from __future__ import annotations

import json
import socket

from ds_relora import rank_exits


def _as_host(run, rank, host):
    path = run / rank_exits.FOLDER / f"started-{rank}.json"
    info = json.loads(path.read_text())
    path.write_text(json.dumps({**info, "host": host}))


def test_summary_names_the_lost_node(tmp_path):
    for rank, host in ((0, "node1"), (1, "node2"), (2, "node2")):
        rank_exits.register(tmp_path, rank)
        _as_host(tmp_path, rank, host)
    rank_exits.record(tmp_path, 0, "RuntimeError: Connection closed by peer", peer=True)
    line = rank_exits.summary(tmp_path, 255)
    assert "\n" not in line
    assert line.startswith("rank(s) 1, 2 on node2 died without saying why (node node2 lost"), line
    assert "rank(s) 0 stopped because a peer was gone; the launcher exited with code 255" in line


def test_summary_without_a_lost_node_keeps_the_generic_cause(tmp_path):
    for rank in (0, 1):  # both on this host, which rank 0's record shows is still there
        rank_exits.register(tmp_path, rank)
    rank_exits.record(tmp_path, 0, "RuntimeError: Connection closed by peer", peer=True)
    line = rank_exits.summary(tmp_path, 1)
    assert line.startswith(f"rank(s) 1 on {socket.gethostname()} died without saying why (killed by a signal"), line


def test_a_long_reason_keeps_its_fix(tmp_path):
    rank_exits.register(tmp_path, 0)
    long = "ConfigError: " + "detail " * 400 + "use launch.master_addr=10.0.0.1 to fix it"
    rank_exits.record(tmp_path, 0, long, peer=False)
    line = rank_exits.summary(tmp_path, 1)
    assert "\n" not in line and "ConfigError: detail" in line, line
    assert "use launch.master_addr=10.0.0.1 to fix it" in line, line[-300:]
    assert len(line) < 1800, len(line)
