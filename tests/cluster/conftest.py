"""Fixtures of the cluster tests: the box (one per session) and a tiny corpus on the shared /tmp."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from clusterbox import Box, missing_reason  # noqa: E402

DOCS = [f"def f{i}(x):\n    return x * {i} + {i * i}  # doc {i}\n" for i in range(60)]


@pytest.fixture(scope="session")
def box(request):
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    b = Box()
    try:
        b.up()
        # Most box tests compare with the reference run: it trains in the background meanwhile.
        request.getfixturevalue("reference_run")
        yield b
    finally:
        b.down()


@pytest.fixture(scope="session")
def cluster_data():
    """A small prepared corpus (seconds, no download) in /tmp, which every box node sees."""
    from ds_relora.config import PrepareConfig
    from ds_relora.data import prepare_data

    root = Path(tempfile.mkdtemp(prefix="dsr-cluster-data-", dir="/tmp"))
    src = root / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    yield prepare_data(PrepareConfig(source=str(src), vocab_size=300, val_fraction=0.2), root / "data", log=lambda _m: None)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def reference_run(cluster_data, tmp_path_factory):
    """The uninterrupted run, started (in the background) by the first test that needs it or the box."""
    from box_procs import start_train
    from runs import run_config

    root = tmp_path_factory.mktemp("reference")
    cfg, run_dir = run_config(cluster_data, root, "ref", {"launcher": "local", "num_gpus": 2})
    proc = start_train(cfg, root / "logs", {})
    yield proc, run_dir
    proc.kill()


@pytest.fixture(scope="session")
def reference(reference_run):
    """Per-step losses of the uninterrupted run: one node, 2 ranks (launcher=local). With 2 ranks
    every all-reduce is one addition, so no launch path may change a bit of them."""
    from harness.checks import read_metrics

    proc, run_dir = reference_run
    assert proc.wait(300) == 0, proc.log()
    return read_metrics(run_dir)[0]
