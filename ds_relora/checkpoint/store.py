"""Saving, finding and loading checkpoints: ``run_dir/checkpoints/step-N/``.

Each folder holds DeepSpeed's own checkpoint of the trainable state (exact resume at the same
world size; the frozen params are read back from the weights set), one RNG
file per rank, the weights and Adam moments as whole tensors in Hugging Face's sharded
safetensors layout (every parameter by its HF name in fp32, adapters included, each shard
written by the rank that holds it; stage-independent: export, eval, spectrum, warm starts and
elastic resumes read them), the resolved run config, the HF model config (``config.json``) and
the tokenizer. The folder format itself (meta.json, manifest,
format_version, fsync, staging names) is owned by :mod:`ds_relora.checkpoint.format`.

Every file a rank streams (its tensor shards, DeepSpeed's states, its RNG) is hashed as it is
written and the hashes are gathered into rank 0's manifest; on resume each rank hashes its share
of the chosen checkpoint, and a mismatch anywhere makes every rank skip it together. A disk
error (full, quota, read-only) on any rank fails the save on every rank with one line; the
half-written ``step-N.saving`` is deleted and never trusted.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ds_relora.checkpoint.choose import complete_checkpoints
from ds_relora.checkpoint.format import (
    HF_CONFIG,
    REPLACED,
    STAGING,
    STEP_FOLDER,
    CheckpointMeta,
    HashingFile,
    best_folder_per_step,
    expected_checkpoint_bytes,
    fsync_dir,
    fsync_tree,
    has_moments,
    open_moments,
    open_weights,
    write_atomic,
    write_meta,
)
from ds_relora.checkpoint.state_io import load_weights, restore_projected, write_state
from ds_relora.disk import disk_error, is_disk_error
from ds_relora.errors import CheckpointError
from ds_relora.faults import fault_point
from ds_relora.methods import load_adapter_buffers
from ds_relora.run_folder import CONFIG
from ds_relora.zero.state import projected

__all__ = ["write_atomic", "save_checkpoint", "load_checkpoint"]


def optimizer_update_count(engine) -> int:
    """Adam's step count (its bias correction), the same for every param of a phase."""
    basic = getattr(engine.optimizer, "optimizer", engine.optimizer)
    if hasattr(basic, "update_count"):  # the projected optimizer (APOLLO, Fira) keeps its own
        return basic.update_count()
    for state in basic.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def clean_leftovers(root: Path) -> None:
    """Rank 0 at the start of a save: delete interrupted saves (folders without meta.json,
    ``step-N.saving``) and finish an interrupted swap (``step-N.replaced`` becomes ``step-N`` when
    no complete ``step-N`` exists). Never deletes the only complete folder of a step."""
    best = {folders[0] for folders in best_folder_per_step(root).values()}
    kept = []
    for child in sorted(Path(root).iterdir()):
        if STEP_FOLDER.match(child.name) and child.is_dir():
            if child in best:
                kept.append(child)
            else:
                shutil.rmtree(child, ignore_errors=True)
    for child in kept:
        m = STEP_FOLDER.match(child.name)
        if m.group(2):
            os.rename(child, root / f"step-{m.group(1)}")
    fsync_dir(root)


def _publish(staging: Path, final: Path) -> None:
    """Rename the complete ``staging`` to ``final``; an existing complete ``final`` is moved
    aside first and deleted only once the new one is in place."""
    if final.exists():
        aside = final.with_name(final.name + REPLACED)
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
        fsync_dir(final.parent)
        os.rename(staging, final)
        fsync_dir(final.parent)
        shutil.rmtree(aside)
    else:
        os.rename(staging, final)
        fsync_dir(final.parent)


def _torch_save(obj, path: Path, zipfile: bool = True) -> dict:
    """``torch.save`` hashing the bytes on their way to the file: the file's size and hash."""
    with open(path, "wb") as f:
        out = HashingFile(f)
        try:
            torch.save(obj, out, _use_new_zipfile_serialization=zipfile)
        except RuntimeError:
            if out.error is not None:  # the disk error torch wrapped
                raise out.error from None
            raise
    return out.record()


@contextlib.contextmanager
def _hashing_deepspeed_writes(engine, staging: Path, digests: dict, errors: list):
    """DeepSpeed's own files go through its checkpoint engine's ``save``: with the plain torch
    engine, write them through :class:`HashingFile` (other engines: their files are read back
    for the manifest). A disk error is recorded, not raised: DeepSpeed's save ends in a barrier
    the other ranks are already waiting in."""
    ce = getattr(engine, "checkpoint_engine", None)
    if type(ce).__name__ != "TorchCheckpointEngine":
        yield
        return

    def save(state_dict, path):
        path = Path(path)
        try:
            record = _torch_save(state_dict, path, bool(ce.zipfile_serialization))
        except OSError as exc:
            if not is_disk_error(exc):
                raise
            exc.filename = exc.filename or str(path)
            errors.append(exc)
            return
        # DeepSpeed writes flat into the tag folder: recorded by the name relative to it.
        digests[path.relative_to(staging).as_posix()] = record

    ce.save = save
    try:
        yield
    finally:
        del ce.save  # the class's own method again


def _agree_on_errors(errors: list, staging: Path, needed: int) -> None:
    """Collective: every rank raises the first rank's disk error (one line), after rank 0 removed
    the half-written staging folder, or returns when no rank had one."""
    mine = None
    if errors:
        exc = errors[0]
        mine = (exc.errno, exc.filename, str(exc))
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, mine)
    first = next((r for r in reports if r), None)
    if first is None:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)  # never trusted (no meta.json), and its space is needed
    dist.barrier()
    raise disk_error(OSError(first[0], os.strerror(first[0]), first[1]), needed=needed, setting="train.run_dir")


def save_checkpoint(engine, root: Path, step: int, *, meta: CheckpointMeta, config_yaml: str,
                    hf_config, tokenizer_dir: Path | None, keep_last: int) -> Path:
    """Collective: every rank must call it at the same step. Writes ``step-N.saving``, fsyncs
    every file on the rank that wrote it, then rank 0 writes meta.json and renames the folder."""
    rank = dist.get_rank()
    root = Path(root)
    final, staging = root / f"step-{step}", root / f"step-{step}{STAGING}"
    needed = expected_checkpoint_bytes(engine.module)
    digests: dict[str, dict] = {}
    errors: list[OSError] = []

    def disk_step(fn, path: Path):
        try:
            fn()
        except OSError as exc:
            if not is_disk_error(exc):
                raise
            exc.filename = exc.filename or str(path)  # a failed write() names no file
            errors.append(exc)

    if rank == 0:
        def prepare():
            root.mkdir(parents=True, exist_ok=True)
            clean_leftovers(root)
        disk_step(prepare, root)
    _agree_on_errors(errors, staging, needed)
    # Frozen W (ReLoRA's base, most of the model) is written once, in the weights set: DeepSpeed
    # would store it again in its module file and, on ZeRO 1-3, once more per rank.
    with _hashing_deepspeed_writes(engine, staging, digests, errors):
        try:
            engine.save_checkpoint(str(root), tag=staging.name, save_latest=False,
                                   exclude_frozen_parameters=True)
        except OSError as exc:  # outside the checkpoint engine (its makedirs, the recovery scripts)
            if is_disk_error(exc):
                if rank == 0:
                    shutil.rmtree(staging, ignore_errors=True)
                raise disk_error(exc, needed=needed, setting="train.run_dir") from None
            raise
    if not errors:
        def rng():
            digests[f"rng_rank{rank}.pt"] = _torch_save(rng_state(), staging / f"rng_rank{rank}.pt")
        disk_step(rng, staging / f"rng_rank{rank}.pt")
    # The whole-tensor sets, each shard streamed by the rank that owns it (one parameter at a time).
    write_state(engine, staging, with_moments=optimizer_update_count(engine) > 0, digests=digests,
                errors=errors)
    if rank == 0 and not errors:
        def small_files():
            write_atomic(staging / CONFIG, config_yaml)
            hf_config.to_json_file(str(staging / HF_CONFIG))
            if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
                shutil.copytree(tokenizer_dir, staging / "tokenizer", dirs_exist_ok=True)
        disk_step(small_files, staging)
    fault_point("save", step)
    if not errors:
        disk_step(lambda: fsync_tree(staging), staging)  # each rank syncs what it wrote (shared filesystem: everything, cheaply)
    _agree_on_errors(errors, staging, needed)
    streamed = [None] * dist.get_world_size()
    dist.all_gather_object(streamed, digests)
    if rank == 0:
        def publish():
            write_meta(staging, meta, {k: v for d in streamed for k, v in d.items()})
            _publish(staging, final)
            if keep_last > 0:
                for _, old in complete_checkpoints(root)[:-keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
        disk_step(publish, staging)
    _agree_on_errors(errors, staging, needed)
    return final


def load_checkpoint(engine, folder: Path) -> None:
    """Restore engine, scheduler, frozen params, adapter buffers and this rank's RNG from a
    checkpoint of this world size and ZeRO stage (the plan sends any other to
    :func:`ds_relora.checkpoint.elastic.restore`). Collective. The data position is the meta's
    (:meth:`~ds_relora.checkpoint.meta.CheckpointMeta.data_position`); DeepSpeed's client state,
    where older checkpoints kept a second copy of it, is not read."""
    # Its module file lacks the frozen params (saved once, in the weights set: each rank reads its shard).
    _, client = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=False)
    if client is None:
        raise CheckpointError(f"DeepSpeed could not load {folder}: the folder is damaged; resume from an older step-N")

    weights = open_weights(folder)
    trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
    load_weights(engine.module, weights, source=str(folder), skip=trainable)
    load_adapter_buffers(engine.module, weights)  # MoRA's patterns, GaLore's projectors
    if projected(engine) is not None and has_moments(folder):
        restore_projected(engine, open_moments(folder))  # APOLLO / Fira: their state is only in our sets
    rng_file = folder / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
