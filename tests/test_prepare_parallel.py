"""prepare-data with worker processes, resume after an interruption, progress, num_workers checks.

The contract under test: whatever ``prepare.num_workers`` is and however often a run is
interrupted, the output folder holds the same bytes as one uninterrupted one-process run.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ds_relora.config import PrepareConfig, load_config
from ds_relora.data import prepare_data, read_data_meta
from ds_relora.data import packing as packing_mod
from ds_relora.data import prepare as prepare_mod
from ds_relora.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
# Varied lengths and scripts, so that chunks differ in size and the BPE has something to merge.
DOCS = [f"def f{i}(x):\n    return x * {i} + {i * i}  # doc {i} {'é' * (i % 3)}{' ∑' * (i % 5)}\n" * (1 + i % 4) for i in range(60)]


def cfg(source, **kw) -> PrepareConfig:
    kw.setdefault("vocab_size", 300)
    kw.setdefault("val_fraction", 0.25)
    kw.setdefault("shard_tokens", 500)  # several shards per split
    return PrepareConfig(source=str(source), **kw)


def quiet(_msg: str) -> None:
    pass


def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    return path


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (tokenizer files included) by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_output(a: Path, b: Path) -> None:
    fa, fb = folder_bytes(a), folder_bytes(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        assert fa[name] == fb[name], f"{name} differs"


@pytest.fixture
def small_batches(monkeypatch):
    # Many chunks from a small corpus: ordering across workers and chunk-boundary checkpoints matter.
    monkeypatch.setattr(packing_mod, "_BATCH_DOCS", 7)


def _parent_must_not_tokenize(*a, **kw):
    raise AssertionError("with num_workers > 1 the workers tokenize, not the prepare-data process")


def test_workers_give_the_one_process_bytes_with_and_without_max_tokens(tmp_path, monkeypatch, small_batches):
    src = corpus(tmp_path)
    one = prepare_data(cfg(src), tmp_path / "one", log=quiet)
    monkeypatch.setattr(packing_mod, "encode_batch", _parent_must_not_tokenize)
    two = prepare_data(cfg(src, num_workers=2), tmp_path / "two", log=quiet)
    monkeypatch.undo()
    monkeypatch.setattr(packing_mod, "_BATCH_DOCS", 7)
    assert_same_output(one, two)
    meta = read_data_meta(one)
    assert len(meta["shards"]["train"]) > 2 and meta["num_documents"]["validation"] > 0
    assert "num_workers" not in meta["prepare"]  # how, not what: it must not make outputs differ

    # A cut inside a document (not at an EOS), with the held-back last document in play.
    cut = meta["num_tokens"]["train"] // 2 + 3
    one = prepare_data(cfg(src, max_tokens=cut), tmp_path / "one_cut", log=quiet)
    two = prepare_data(cfg(src, max_tokens=cut, num_workers=2), tmp_path / "two_cut", log=quiet)
    assert_same_output(one, two)
    cut_meta = read_data_meta(one)
    assert sum(cut_meta["num_tokens"].values()) == cut
    last = {s: np.fromfile(one / cut_meta["shards"][s][-1], dtype=cut_meta["dtype"])[-1] for s in ("train", "validation")}
    assert cut_meta["eos_token_id"] in last.values() and set(last.values()) != {cut_meta["eos_token_id"]}


@pytest.mark.parametrize("bad, words", [(0, ["prepare.num_workers=0", "at least 1", "CPU core"]),
                                        (-2, ["prepare.num_workers=-2", "at least 1"]),
                                        ("many", ["prepare.num_workers", "expected an integer"])])
def test_bad_num_workers_is_one_line_error(bad, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"prepare.num_workers={bad}"])
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def _interrupt_at_checkpoint(monkeypatch, n: int) -> None:
    """Ctrl-C right after checkpoint ``n`` (checkpoint 0 is written before the first document)."""
    monkeypatch.setattr(packing_mod, "CHECKPOINT_SECONDS", 0.0)

    def fault(point, step):
        if point == "prepare" and step == n:
            raise KeyboardInterrupt

    monkeypatch.setattr(packing_mod, "fault_point_local", fault)


def test_interrupted_run_continues_to_the_same_bytes(tmp_path, monkeypatch, small_batches):
    src = corpus(tmp_path)
    want = prepare_data(cfg(src, max_tokens=2000), tmp_path / "want", log=quiet)
    out = tmp_path / "out"
    part = prepare_mod.partial_dir(out)

    _interrupt_at_checkpoint(monkeypatch, 3)
    logs: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg(src, max_tokens=2000), out, log=logs.append)
    assert not out.exists() and (part / prepare_mod.PROGRESS_FILE).is_file()
    assert any("run the same command again" in m for m in logs)
    done = json.loads((part / prepare_mod.PROGRESS_FILE).read_text())["documents_read"]
    assert done == 3 * 7

    # What a kill between two checkpoints leaves: tokens past the checkpoint, a shard begun after it.
    last = sorted(part.glob("train_*.bin"))[-1]
    with open(last, "ab") as f:
        f.write(b"\xff\xff" * 9)
    (part / "validation_00099.bin").write_bytes(b"\x01\x00")

    monkeypatch.setattr(packing_mod, "fault_point_local", lambda point, step: None)
    encoded = []
    real_encode = packing_mod.encode_batch
    monkeypatch.setattr(packing_mod, "encode_batch", lambda tok, texts: encoded.append(len(texts)) or real_encode(tok, texts))
    logs.clear()
    prepare_data(cfg(src, max_tokens=2000), out, log=logs.append)
    assert any("resuming" in m for m in logs)
    assert sum(encoded) <= len(DOCS) - done  # the documents read before the interruption are not tokenized again
    assert_same_output(want, out)
    assert not part.exists()


def test_resume_with_other_worker_count_and_a_settings_change_starts_over(tmp_path, monkeypatch, small_batches):
    src = corpus(tmp_path)
    out = tmp_path / "out"
    _interrupt_at_checkpoint(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg(src), out, log=quiet)
    monkeypatch.setattr(packing_mod, "fault_point_local", lambda point, step: None)
    logs: list[str] = []
    prepare_data(cfg(src, num_workers=2), out, log=logs.append)  # num_workers is not part of the fingerprint
    assert any("resuming" in m for m in logs)
    assert_same_output(prepare_data(cfg(src), tmp_path / "want", log=quiet), out)

    _interrupt_at_checkpoint(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg(src, seed=1), tmp_path / "out2", log=quiet)
    monkeypatch.setattr(packing_mod, "fault_point_local", lambda point, step: None)
    logs.clear()
    prepare_data(cfg(src, seed=2), tmp_path / "out2", log=logs.append)
    assert any("other settings" in m and "starting over" in m for m in logs)
    assert_same_output(prepare_data(cfg(src, seed=2), tmp_path / "want2", log=quiet), tmp_path / "out2")


def _processes_with_env(marker: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def test_sigkill_midway_then_rerun_gives_the_same_bytes_and_no_worker_outlives_it(tmp_path):
    # The real thing: DS_RELORA_FAULT=prepare:2 SIGKILLs the process right after checkpoint 2.
    src = corpus(tmp_path)
    out = tmp_path / "out"
    script = (
        "from ds_relora.data import packing, prepare as p; from ds_relora.config import PrepareConfig\n"
        "packing.CHECKPOINT_SECONDS = 0.0; packing._BATCH_DOCS = 7\n"
        f"p.prepare_data(PrepareConfig(source={str(src)!r}, vocab_size=300, val_fraction=0.25, shard_tokens=500, num_workers=2), {str(out)!r})\n"
    )
    marker = f"DS_RELORA_TEST_MARKER={tmp_path}"
    env = {**os.environ, "DS_RELORA_FAULT": "prepare:2", "PYTHONPATH": str(REPO), "DS_RELORA_TEST_MARKER": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    part = prepare_mod.partial_dir(out)
    assert not out.exists() and json.loads((part / prepare_mod.PROGRESS_FILE).read_text())["documents_read"] == 2 * 7

    logs: list[str] = []
    prepare_data(cfg(src), out, log=logs.append)  # other batch sizes than the killed run: chunking is not in the bytes
    assert any("resuming" in m for m in logs)
    assert_same_output(prepare_data(cfg(src), tmp_path / "want", log=quiet), out)
    deadline = time.time() + 10
    while _processes_with_env(marker) and time.time() < deadline:
        time.sleep(0.2)
    assert not _processes_with_env(marker), "worker processes outlived their killed parent"


def test_a_second_run_on_the_same_folder_is_refused(tmp_path):
    src = corpus(tmp_path)
    out = tmp_path / "out"
    part = prepare_mod.partial_dir(out)
    part.mkdir()
    fd = os.open(part, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running prepare-data holds
        with pytest.raises(DataError) as e:
            prepare_data(cfg(src), out, log=quiet)
    finally:
        os.close(fd)
    msg = str(e.value)
    assert "\n" not in msg and "another prepare-data" in msg and "wait for it" in msg
    assert part.is_dir()  # not ours to delete
    assert read_data_meta(prepare_data(cfg(src), out, log=quiet))["num_documents"]["train"] > 0


def test_progress_lines_on_stderr_with_tokens_per_second(tmp_path, monkeypatch, capsys, small_batches):
    monkeypatch.setattr(packing_mod, "PROGRESS_SECONDS", 0.0)
    prepare_data(cfg(corpus(tmp_path)), tmp_path / "out", log=quiet)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("prepare-data:")]
    assert lines and all("tokens/s" in line for line in lines)
    assert "prepare-data:" not in captured.out
