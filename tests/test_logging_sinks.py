"""The TensorBoard and W&B sinks of a real 1-rank run that is stopped and resumed: what they hold
after the resume is what metrics.jsonl holds (W&B offline: no network, nothing leaves tmp)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ds_relora.launch.hosts import free_port
from harness import REPO

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")

DOCS = [f"def g{i}(y):\n    return y - {i} * {i + 1}  # sink {i}\n" for i in range(40)]
TOTAL = 6


def _train(sets, env, *extra):
    return subprocess.run([sys.executable, "-m", "ds_relora.cli", "train", "--config", "quickstart", "--set", *sets, *extra],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """A 6-step run whose first job stops at the job limit after step 3 (checkpoint and exit 75),
    the second resumes from it with --resume auto: both jobs write to the same sinks."""
    from ds_relora.config import PrepareConfig
    from ds_relora.data import prepare_data

    root = tmp_path_factory.mktemp("sinks")
    src = root / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    data = prepare_data(PrepareConfig(source=str(src), vocab_size=300, val_fraction=0.2), root / "data", log=lambda _m: None)
    run = root / "run"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline", "WANDB_DIR": str(root / "wandb"), "WANDB_SILENT": "true",
           "WANDB_CONFIG_DIR": str(root / "wandb-config"), "WANDB_CACHE_DIR": str(root / "wandb-cache")}
    (root / "wandb").mkdir()
    sets = [f"data.path={data}", "data.seq_len=32", f"train.run_dir={run}", f"train.total_steps={TOTAL}",
            "train.micro_batch_size=2", "relora.rank=4", "relora.warm_start_steps=2", "relora.reset_every=2",
            "relora.restart_warmup_steps=1", "optim.warmup_steps=1", "train.eval_every=3", "train.eval_batches=1",
            "train.save_every=2", "train.tensorboard=true", "train.wandb_project=ds-relora-test",
            "launch.launcher=none", "launch.num_gpus=1", f"launch.master_port={free_port()}"]
    first = _train(sets, env, "train.max_steps_per_job=3")
    assert first.returncode == 75, first.stderr[-3000:]
    second = _train(sets, env, "--resume", "auto")
    assert second.returncode == 0, second.stderr[-3000:]
    return {"run": run, "wandb_dir": root / "wandb", "second": second.stdout + second.stderr}


def _metrics(run: Path) -> tuple[dict, dict]:
    steps, evals = {}, {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["type"] == "step":
            assert rec["step"] not in steps, f"step {rec['step']} logged twice in metrics.jsonl"
            steps[rec["step"]] = rec
        elif rec.get("event") == "eval":
            evals[rec["step"]] = rec
    return steps, evals


def _tb_events(run: Path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar, file by file in write order, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    out = []
    for path in sorted((run / "tb").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                scalar = float(tensor_util.make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value
                out.append((value.tag, event.step, scalar))
    return out


def test_tensorboard_steps_never_go_back_and_values_match_metrics(resumed_run):
    from tensorboard.backend.event_processing import event_accumulator

    run = resumed_run["run"]
    steps, evals = _metrics(run)
    assert sorted(steps) == list(range(1, TOTAL + 1))
    events = _tb_events(run)
    loss_steps = [s for tag, s, _ in events if tag == "train/loss"]
    assert loss_steps == sorted(loss_steps), loss_steps  # in write order too, across the event files
    acc = event_accumulator.EventAccumulator(str(run / "tb"), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    seen = [e.step for e in acc.Scalars("train/loss")]
    assert seen == sorted(seen) == list(range(1, TOTAL + 1)), (seen, loss_steps)
    for e in acc.Scalars("train/loss"):
        assert e.value == pytest.approx(steps[e.step]["loss"], rel=1e-6), e
    for e in acc.Scalars("train/lr"):
        assert e.value == pytest.approx(steps[e.step]["lr"], rel=1e-6), e
    assert sorted(evals) and [e.step for e in acc.Scalars("eval/loss")] == sorted(evals)
    for e in acc.Scalars("eval/loss"):
        assert e.value == pytest.approx(evals[e.step]["loss"], rel=1e-6), e


def _wandb_records(path: Path):
    """The protobuf payloads of a W&B transaction log (``run-<id>.wandb``): a 7-byte header, then
    LevelDB-log style blocks of 32 KiB holding records of ``crc32 u32, length u16, type u8``
    (1 full, 2 first, 3 middle, 4 last); a block tail under 7 bytes is padding. wandb >= 0.2x
    ships no Python reader of it (the Go core writes it)."""
    import struct

    data, pos, block, parts = path.read_bytes(), 7, 32768, []
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, pos)
        pos += 7
        if kind == 0:  # zero padding to the block end
            pos += block - pos % block if pos % block else 0
            continue
        parts.append(data[pos:pos + length])
        pos += length
        if kind in (1, 4):
            yield b"".join(parts)
            parts = []


def _wandb_history(folder: Path) -> dict[int, dict]:
    from wandb.proto import wandb_internal_pb2

    out = {}
    for payload in _wandb_records(next(folder.glob("*.wandb"))):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            out[int(items["_step"])] = items
    return out


def test_wandb_keeps_one_run_id_across_the_resume_and_logs_the_same_values(resumed_run):
    run = resumed_run["run"]
    run_id = (run / "wandb_id").read_text().strip()
    # wandb.init(dir=run_dir): the offline runs live in run_dir/wandb whatever WANDB_DIR says.
    dirs = sorted(p for p in (run / "wandb").glob("offline-run-*") if p.is_dir())
    assert len(dirs) == 2, dirs  # one folder per job ...
    assert {d.name.rsplit("-", 1)[1] for d in dirs} == {run_id}, dirs  # ... of one W&B run
    steps, evals = _metrics(run)
    logged: dict[int, dict] = {}
    for d in dirs:  # in job order: the resumed job's records win, as on the W&B server
        logged.update(_wandb_history(d))
    train = {s: h for s, h in logged.items() if "train/loss" in h}
    assert sorted(train) == list(range(1, TOTAL + 1)), sorted(logged)
    for step, h in train.items():
        assert h["train/loss"] == pytest.approx(steps[step]["loss"], rel=1e-6), (step, h, steps[step])
        assert h["train/lr"] == pytest.approx(steps[step]["lr"], rel=1e-6), (step, h, steps[step])
    for step, rec in evals.items():
        assert logged[step]["eval/loss"] == pytest.approx(rec["loss"], rel=1e-6), (step, logged.get(step))
