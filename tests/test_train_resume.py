"""Reliability (issue 9): no lost or corrupted checkpoints, requeued jobs that make progress,
logs that do not repeat, metrics that mean what they say. Runnable alone:
``pytest tests/test_train_resume.py``.

Five short 2-rank launches share one reference run: kill -9 of rank 1 during a save and during a
merge (``DS_RELORA_FAULT``, ds_relora/faults.py), a SIGUSR1 that reaches rank 1 only, then one
``resume: auto`` launch whose per-step losses must equal the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import textwrap
import time

import pytest

from harness.checks import read_metrics
from harness.configs import tiny_run_config, write_config
from harness.ranks import run_workers

WORKER = "tests/workers/run_configs.py"


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _tied_model_folder(path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True).save_pretrained(str(path))
    return path


def _step_records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"type": "step"' in x]


@pytest.fixture(scope="module")
def runs(prepared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    common = dict(train={"total_steps": 24, "save_every": 8, "keep_last": 0})
    cfg = {name: tiny_run_config(prepared_data, root / name, 2, **common) for name in ("ref", "kill_save", "kill_merge")}
    cfg["signal"] = tiny_run_config(prepared_data, root / "signal", 2, **common)
    cfg["tied"] = tiny_run_config(prepared_data, root / "tied", 2, model={"preset": None, "name_or_path": str(
        _tied_model_folder(root / "tied_model"))}, train={"total_steps": 16}, relora={"save_at_switch": False})
    cfg["zero0"] = tiny_run_config(prepared_data, root / "zero0", 0, train={"method": "full", "total_steps": 6},
                                   optim={"warmup_steps": 1})
    paths = {k: write_config(root / f"{k}.yaml", v) for k, v in cfg.items()}
    outs = run_workers([WORKER, *(str(paths[k]) for k in ("ref", "tied", "zero0"))], 2, timeout=600)
    crashes = {}
    for name, fault in (("kill_save", "save:16"), ("kill_merge", "merge:17")):
        with pytest.raises(AssertionError) as exc:
            run_workers([WORKER, str(paths[name])], 2, timeout=300, env={"DS_RELORA_FAULT": fault})
        crashes[name] = str(exc.value)
    with pytest.raises(AssertionError) as exc:
        run_workers(["-m", "ds_relora.worker", "--config", str(paths["signal"])], 2, timeout=300,
                    env={"DS_RELORA_FAULT": "signal:5"})
    crashes["signal"] = str(exc.value)
    after_crash = {"kill_save": _listing(root / "kill_save"), "kill_merge": _listing(root / "kill_merge"),
                   "signal": _listing(root / "signal")}
    # kill_merge's newest checkpoint (step-16) gets a corrupted meta.json: resume falls back to step-8.
    (root / "kill_merge" / "checkpoints" / "step-16" / "meta.json").write_text('{"step": 16, "phase"')
    resumed = []
    for name in ("kill_save", "kill_merge", "signal"):
        c = dict(cfg[name], train={**cfg[name]["train"], "resume": "auto"})
        if name == "signal":
            c["train"]["max_steps_per_job"] = 4  # the requeued job: 4 more steps, then stop again
        resumed.append(write_config(root / f"{name}-resume.yaml", c))
    resume_outs = run_workers([WORKER, *map(str, resumed)], 2, timeout=600)
    return {"root": root, "outs": outs, "crashes": crashes, "after_crash": after_crash, "resume_outs": resume_outs}


def _listing(run_dir):
    ckpts = run_dir / "checkpoints"
    return sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-")) if ckpts.is_dir() else []


# ----------------------------------------------------------------------------- kill -9 and resume
@pytest.mark.distributed
@pytest.mark.parametrize("name", ["kill_save", "kill_merge"])
def test_kill_of_one_rank_then_resume_auto_matches_the_uninterrupted_run(runs, name):
    root = runs["root"]
    assert "exited with -9" in runs["crashes"][name]
    if name == "kill_save":  # killed inside the save of step 16: no step-16, its staging folder only
        assert runs["after_crash"][name] == ["step-16.saving", "step-8"]
    else:  # killed inside the merge after step 17
        assert runs["after_crash"][name] == ["step-16", "step-8"]
    ref, ref_events = read_metrics(root / "ref")
    losses, events = read_metrics(root / name)
    assert [losses[s] for s in range(1, 25)] == [ref[s] for s in range(1, 25)]
    # The log holds each step once (cut back to the checkpoint resumed from), and one merge.
    assert [r["step"] for r in _step_records(root / name)] == list(range(1, 25))
    assert [e["lr_index"] for e in events if e["event"] == "merge"] == [16]
    (resume,) = [e for e in events if e["event"] == "resume"]
    assert resume["step"] == 8 and resume["dropped_records"] > 0
    assert not list((root / name / "checkpoints").glob("*.saving")), "leftovers are cleaned at the next save"


@pytest.mark.distributed
def test_resume_auto_skips_a_corrupted_meta_json_with_one_line(runs):
    out = runs["resume_outs"][0]
    lines = [ln for ln in out.splitlines() if ln.startswith("resume: skipping")]
    assert len(lines) == 1 and "kill_merge/checkpoints/step-16" in lines[0] and "JSONDecodeError" in lines[0], lines


# ----------------------------------------------------------------------------- jobs on clusters
@pytest.mark.distributed
def test_signal_on_one_rank_stops_all_ranks_with_the_requeue_code_and_requeue_makes_progress(runs):
    from ds_relora.train.job_limits import REQUEUE_EXIT_CODE

    root = runs["root"] / "signal"
    # Both ranks stop at the same step and exit with the requeue code; a rank still tearing down
    # when the harness gives up waiting on it is killed (-9), but the first to leave said 75.
    crash = runs["crashes"]["signal"]
    codes = json.loads(crash[crash.index("(exit codes ") + len("(exit codes "):].split(")")[0])
    assert REQUEUE_EXIT_CODE in codes and set(codes) <= {REQUEUE_EXIT_CODE, -9}, crash
    assert runs["after_crash"]["signal"] == ["step-5"], "both ranks stopped at the same step boundary"
    ref, _ = read_metrics(runs["root"] / "ref")
    losses, events = read_metrics(root)
    stops = [(e["step"], e["reason"]) for e in events if e["event"] == "stop"]
    assert stops == [(5, "a stop signal"), (9, "train.max_steps_per_job")]
    assert [losses[s] for s in range(1, 10)] == [ref[s] for s in range(1, 10)]
    assert _listing(root)[-1] == "step-9"


def test_time_limit_and_steps_per_job_parse_and_stop_after_steps_does_not_creep():
    from ds_relora.config import TrainConfig
    from ds_relora.errors import ConfigError
    from ds_relora.train.job_limits import JobLimits, parse_duration

    assert parse_duration("3h50m") == parse_duration("03:50:00") == parse_duration(13800) == 13800
    assert parse_duration("90m") == 5400 and parse_duration("1d") == 86400
    for bad in ("soon", "-5", "0"):
        with pytest.raises(ConfigError, match="train.time_limit"):
            TrainConfig(time_limit=bad)
    with pytest.raises(ConfigError, match="max_steps_per_job"):
        TrainConfig(max_steps_per_job=0)
    # A job requeued at step 21 with stop_after_steps=21 used to train one step and stop again.
    assert JobLimits(TrainConfig(stop_after_steps=21), start_step=21).local_code(22) == 0
    assert JobLimits(TrainConfig(stop_after_steps=21), start_step=0).local_code(21) == 1
    assert JobLimits(TrainConfig(max_steps_per_job=3), start_step=21).local_code(24) == 2
    limits = JobLimits(TrainConfig(time_limit="0.01"), start_step=0)
    time.sleep(0.02)
    assert limits.local_code(1) == 3


RESUME_AGREEMENT = textwrap.dedent('''
    import os, sys
    import torch.distributed as dist
    from ds_relora.errors import CheckpointError
    from ds_relora.checkpoint.choose import agree_on_resume
    dist.init_process_group("gloo")
    # Rank 1 runs on a "node" that does not see rank 0's relative run_dir (no shared filesystem).
    os.chdir(sys.argv[1] if dist.get_rank() == 0 else sys.argv[2])
    try:
        print("CHOSEN", agree_on_resume("auto", "run"))
    except CheckpointError as exc:
        print("ERROR", exc)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # as every worker: gloo's threads occasionally abort in the interpreter's teardown
''')


def test_rank0_decides_resume_and_a_rank_that_cannot_read_it_names_host_and_path(runs, tmp_path):
    import socket

    shutil.copytree(runs["root"] / "ref" / "checkpoints" / "step-24", tmp_path / "a" / "run" / "checkpoints" / "step-24")
    (tmp_path / "b").mkdir()
    script = tmp_path / "agree.py"
    script.write_text(RESUME_AGREEMENT)
    outs = run_workers([str(script), str(tmp_path / "a"), str(tmp_path / "b")], 2, timeout=120)
    for out in outs:
        (line,) = [ln for ln in out.splitlines() if ln.startswith(("CHOSEN", "ERROR"))]
        assert line.startswith("ERROR rank 1 on host " + socket.gethostname()) and "run/checkpoints/step-24" in line


def test_merging_method_reads_the_scheduler_epoch_after_the_checkpoint_load(monkeypatch):
    from types import SimpleNamespace

    from harness.configs import merging_method

    from ds_relora.methods import merging

    merges = []
    monkeypatch.setattr(merging, "merge_and_reinit", lambda *a, step, **k: merges.append(step) or {"modules": 0})
    engine = SimpleNamespace(lr_scheduler=SimpleNamespace(last_epoch=0))
    method = merging_method(total_steps=20, reset_every=16)
    assert method.merge_at == {16}
    engine.lr_scheduler.last_epoch = 17  # load_checkpoint restored a scheduler past the merge at 16
    method.after_load(engine, engine.lr_scheduler.last_epoch)
    assert method.after_step(engine, engine.lr_scheduler.last_epoch) is None  # the first step after resume was skipped (overflow): epoch unchanged
    assert merges == []


# ----------------------------------------------------------------------------- what a user reads
@pytest.mark.distributed
def test_metrics_mean_what_their_names_say(runs):
    root = runs["root"]
    steps = {r["step"]: r for r in _step_records(root / "ref")}
    _, events = read_metrics(root / "ref")
    (merge,) = [e for e in events if e["event"] == "merge"]
    # The merge follows the update taken at LR 0: that update is this step record's.
    assert merge["step"] == 17 and merge["lr_index"] == 16 and steps[17]["lr"] == 0.0 and steps[16]["lr"] > 0
    assert steps[1]["lr"] == 0.0  # warm-up starts at 0 for the first update
    (ev,) = [e for e in events if e["event"] == "eval"]
    assert (ev["batches"], ev["sequences"], ev["tokens"]) == (4, 16, 16 * 32) and ev["split_sequences"] > 16
    z0 = _step_records(root / "zero0")
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in z0)
    assert "step 17: merged 14 adapters into W in" in runs["outs"][0] and "Adam moments" in runs["outs"][0]


@pytest.mark.distributed
def test_the_switch_never_rewrites_a_saved_checkpoint_and_can_skip_its_own(runs):
    _, events = read_metrics(runs["root"] / "ref")
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [8, 16, 24]
    # tied run: save_every 0 and relora.save_at_switch false -> only the final checkpoint.
    assert _listing(runs["root"] / "tied") == ["step-16"]


@pytest.mark.distributed
def test_tied_embeddings_switch_to_relora(runs):
    from ds_relora.checkpoint.export import load_merged_model

    _, events = read_metrics(runs["root"] / "tied")
    (switch,) = [e for e in events if e["event"] == "switch"]
    assert switch["probe_loss_after"] == pytest.approx(switch["probe_loss_before"], abs=1e-6)
    model = load_merged_model(runs["root"] / "tied" / "checkpoints" / "step-16")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.distributed
def test_weights_files_are_readable_by_the_group(runs, tmp_path):
    from ds_relora.checkpoint.export import export_model

    ckpt = runs["root"] / "ref" / "checkpoints" / "step-24"
    shards = sorted(ckpt.glob("*-of-*.safetensors"))
    assert len(shards) == 4  # weights and moments, one shard of each per rank
    for path in [*shards, ckpt / "model.safetensors.index.json"]:
        assert stat.S_IMODE(path.stat().st_mode) == _umask_mode(), path.name
    out = export_model(ckpt, tmp_path / "exp")
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == _umask_mode()


# ----------------------------------------------------------------------------- export --out safety
@pytest.mark.distributed
def test_export_never_deletes_user_files_and_replaces_a_previous_export(runs, tmp_path):
    from ds_relora.cli import main

    ckpt = str(runs["root"] / "ref" / "checkpoints" / "step-24")
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    assert main(["export", ckpt, "--out", str(user)]) == 2
    assert (user / "notes.txt").read_text() == "precious"
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["export", ckpt, "--out", str(afile)]) == 2 and afile.read_text() == "x"
    out = tmp_path / "exp"
    assert main(["export", ckpt, "--out", str(out)]) == 0
    (out / "stale.bin").write_text("from the first export")
    assert main(["export", ckpt, "--out", str(out)]) == 0, "a previous export is replaced"
    assert not (out / "stale.bin").exists() and (out / "model.safetensors").is_file()
    assert main(["export", ckpt, "--out", str(user), "--overwrite"]) == 0 and not (user / "notes.txt").exists()
    assert not list(tmp_path.glob("*.tmp-export*"))


def test_export_out_errors_are_one_line(runs, tmp_path, capsys):
    from ds_relora.cli import main

    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["export", str(runs["root"] / "ref" / "checkpoints" / "step-24"), "--out", str(afile)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file" in err[0]


# ----------------------------------------------------------------------------- checkpoint format
def _copy_ckpt(runs, tmp_path, step=24):
    dst = tmp_path / "run" / "checkpoints" / f"step-{step}"
    shutil.copytree(runs["root"] / "ref" / "checkpoints" / f"step-{step}", dst)
    return dst


def test_format_version_is_checked(runs, tmp_path):
    from ds_relora.checkpoint.format import FORMAT_VERSION, read_meta
    from ds_relora.errors import CheckpointError

    folder = _copy_ckpt(runs, tmp_path)
    meta = json.loads((folder / "meta.json").read_text())
    for version, words in ((FORMAT_VERSION + 1, "upgrade ds_relora"), (1, "warm_start_from"), (None, "not written by")):
        (folder / "meta.json").write_text(json.dumps({**meta, "format_version": version}))
        with pytest.raises(CheckpointError, match=words) as exc:
            read_meta(folder, for_resume=True)
        assert "\n" not in str(exc.value)
    (folder / "meta.json").write_text(json.dumps({**meta, "format_version": 1}))
    assert read_meta(folder).step == 24, "format 1 weights stay readable (eval/export/spectrum)"
    (folder / "meta.json").write_text(json.dumps({**meta, "format_version": 2}))
    assert read_meta(folder, for_resume=True).step == 24, "format 2 (one weights file) still resumes"


def test_damaged_files_are_detected_and_auto_falls_back(runs, tmp_path):
    from ds_relora.errors import CheckpointError
    from ds_relora.checkpoint.choose import resolve_resume

    newest, older = _copy_ckpt(runs, tmp_path, 24), _copy_ckpt(runs, tmp_path, 16)
    shard = newest / "optimizer-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])  # a power loss before the data reached the disk
    lines = []
    assert resolve_resume("auto", tmp_path / "run", lines.append) == older
    assert len(lines) == 1 and "optimizer-00002-of-00002.safetensors has 1000 bytes" in lines[0]
    with pytest.raises(CheckpointError, match="is damaged"):
        resolve_resume(str(newest), tmp_path / "run")
    rng = older / "rng_rank0.pt"
    rng.write_bytes(b"\0" * rng.stat().st_size)  # same size, other content: the hash catches it
    with pytest.raises(CheckpointError, match="every checkpoint .* is damaged"):
        resolve_resume("auto", tmp_path / "run")


def test_interrupted_swap_and_leftovers(runs, tmp_path, monkeypatch):
    from ds_relora.checkpoint import store as ck
    from ds_relora.checkpoint.choose import resolve_resume

    folder = _copy_ckpt(runs, tmp_path, 16)
    root = folder.parent
    staging = root / "step-16.saving"
    shutil.copytree(folder, staging)
    (root / "step-12").mkdir()  # an interrupted save of the old layout: no meta.json
    real_rename, calls = os.rename, []

    def crash_after_first(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the two renames")
        real_rename(src, dst)

    monkeypatch.setattr(ck.os, "rename", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        ck._publish(staging, folder)
    monkeypatch.setattr(ck.os, "rename", real_rename)
    assert not folder.exists(), "the crash window: step-16 is renamed aside"
    assert resolve_resume("auto", tmp_path / "run") in (staging, root / "step-16.replaced")
    ck.clean_leftovers(root)
    assert sorted(p.name for p in root.iterdir()) == ["step-16"]
    assert resolve_resume("auto", tmp_path / "run") == folder


def test_resume_on_other_data_or_layout_is_refused(runs, prepared_data, tmp_path):
    from ds_relora.checkpoint.format import check_resume_matches, data_fingerprint, read_meta
    from ds_relora.errors import CheckpointError

    folder = runs["root"] / "ref" / "checkpoints" / "step-24"
    meta = read_meta(folder, for_resume=True)
    layout = {"seq_len": 32, "global_batch": 8, "micro_batch": 4, "grad_accum": 1}
    check_resume_matches(folder, meta, {**data_fingerprint(prepared_data), **layout})
    other = tmp_path / "data"
    shutil.copytree(prepared_data, other)
    shard = other / "train_00000.bin"
    shard.write_bytes(bytes(reversed(shard.read_bytes()[:64])) + shard.read_bytes()[64:])  # other documents
    with pytest.raises(CheckpointError, match="prepared data in data.path changed"):
        check_resume_matches(folder, meta, {**data_fingerprint(other), **layout})
    shutil.copytree(prepared_data, other, dirs_exist_ok=True)
    (other / "tokenizer" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="tokenizer"):
        check_resume_matches(folder, meta, {**data_fingerprint(other), **layout})
    with pytest.raises(CheckpointError, match="data.seq_len") as exc:
        check_resume_matches(folder, meta, {**data_fingerprint(prepared_data), **layout, "seq_len": 64})
    assert "\n" not in str(exc.value)


def test_metrics_truncation_keeps_records_up_to_the_checkpoint(tmp_path):
    from ds_relora.train.metrics import truncate_to_checkpoint

    path = tmp_path / "metrics.jsonl"
    recs = [{"type": "step", "step": 1}, {"type": "event", "event": "checkpoint", "step": 1},
            {"type": "event", "event": "switch", "step": 1}, {"type": "step", "step": 2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"type": "st')
    assert truncate_to_checkpoint(path, 1) == 3
    assert [json.loads(x) for x in path.read_text().splitlines()] == recs[:2]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
