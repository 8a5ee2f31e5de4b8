"""Saving, finding and loading checkpoints: ``run_dir/checkpoints/step-N/``.

Each folder holds one copy of the state: the weights and Adam moments as whole tensors in
Hugging Face's sharded safetensors layout (every parameter by its HF name in fp32, adapters
included, each shard written by the rank that holds it, all ranks at once; stage-independent:
every resume, export, eval, spectrum and warm start reads them), one RNG file per rank, the
resolved run config, the HF model config (``config.json``) and the tokenizer; ``meta.json``
carries the step counters and LR position DeepSpeed's own files held. Format 6 writes no
DeepSpeed files (before it they were a second copy of the masters and moments); older
checkpoints that have them still resume through DeepSpeed's loader. The folder format itself (meta.json, manifest,
format_version, fsync, staging names) is owned by :mod:`ds_relora.checkpoint.format`.

Every file a rank streams (its tensor shards, its RNG) is hashed as it is
written and the hashes are gathered into rank 0's manifest; on resume each rank hashes its share
of the chosen checkpoint, and a mismatch anywhere makes every rank skip it together. A disk
error (full, quota, read-only) on any rank fails the save on every rank with one line; the
half-written ``step-N.saving`` is deleted and never trusted.

Pruning (``keep_last``) runs after the save's last collective, on rank 0: the folders to drop are
renamed out of the ``step-N`` namespace at once (a resume never picks a half-deleted one) and
deleted by a background thread, so a slow delete on a parallel filesystem holds no rank in a
collective. The checkpoint just written is never pruned.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ds_relora.checkpoint.choose import complete_checkpoints
from ds_relora.checkpoint.elastic import restore
from ds_relora.checkpoint.format import (
    HF_CONFIG,
    REPLACED,
    SETS_ONLY_VERSION,
    STAGING,
    STEP_FOLDER,
    CheckpointMeta,
    HashingFile,
    best_folder_per_step,
    expected_checkpoint_bytes,
    fsync_dir,
    fsync_tree,
    open_weights,
    write_atomic,
    write_meta,
)
from ds_relora.checkpoint.state_io import load_weights, write_state
from ds_relora.disk import disk_error, is_disk_error
from ds_relora.errors import CheckpointError
from ds_relora.faults import fault_point
from ds_relora.methods import load_adapter_buffers
from ds_relora.row_blocks import whole_names
from ds_relora.run_folder import CONFIG

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
    aside first and handed to :func:`prune`'s delete only once the new one is in place."""
    if final.exists():
        aside = final.with_name(final.name + REPLACED)
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
        fsync_dir(final.parent)
        os.rename(staging, final)
        fsync_dir(final.parent)
        _set_aside(aside)  # deleted by prune's background thread, outside the collectives
    else:
        os.rename(staging, final)
        fsync_dir(final.parent)


def _torch_save(obj, path: Path, zipfile: bool = True) -> dict:
    """``torch.save`` hashing the bytes on their way to the file, then fsynced: the file's size
    and hash."""
    with open(path, "wb") as f:
        out = HashingFile(f)
        try:
            torch.save(obj, out, _use_new_zipfile_serialization=zipfile)
        except RuntimeError:
            if out.error is not None:  # the disk error torch wrapped
                raise out.error from None
            raise
        f.flush()
        os.fsync(f.fileno())
    return out.record()


# Where pruned checkpoints wait for their background delete: outside the ``step-N`` names, so
# neither a resume nor clean_leftovers ever sees them.
PRUNED = ".pruned-"
_pruners: list[threading.Thread] = []


def _set_aside(folder: Path) -> Path:
    """Rename ``folder`` out of the step-N names (a metadata operation: instant at any size)."""
    aside, n = folder.parent / f"{PRUNED}{folder.name}", 0
    while aside.exists():  # an interrupted delete of the same name: the thread takes both
        n += 1
        aside = folder.parent / f"{PRUNED}{folder.name}.{n}"
    os.rename(folder, aside)
    return aside


def prune(root: Path, keep_last: int, newest: Path) -> list[Path]:
    """Rank 0, after the save's last collective: move every complete checkpoint but the newest
    ``keep_last`` (0 keeps all; never ``newest``, the one just written, even when a damaged
    higher step exists) out of the step-N names, and delete them (with a replaced folder of the
    same step and leftovers of an interrupted delete) in a background thread. Returns the folders
    it moved. A failure is one line on stderr, not an error: the run goes on, the other ranks are
    already past the save."""
    moved = []
    try:
        old = complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []
        moved = [_set_aside(folder) for _, folder in old if folder != newest]
        fsync_dir(root)
        doomed = sorted(p for p in root.iterdir() if p.name.startswith(PRUNED) and p.is_dir())
    except OSError as exc:
        print(f"checkpoint: could not prune old checkpoints under {root} ({exc}); delete them by hand "
              "or lower train.keep_last", file=sys.stderr, flush=True)
        return moved
    if doomed:
        # Not a daemon: the interpreter finishes the delete before the process exits.
        thread = threading.Thread(target=lambda: [shutil.rmtree(p, ignore_errors=True) for p in doomed],
                                  name="checkpoint-prune")
        thread.start()
        _pruners.append(thread)
    return moved


def wait_for_pruning() -> None:
    """Block until every background delete this process started has finished."""
    while _pruners:
        _pruners.pop().join()


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
    """Collective: every rank must call it at the same step. Writes ``step-N.saving``, each rank
    fsyncing the files it wrote, then rank 0 writes meta.json and renames the folder; after the
    last collective rank 0 prunes old checkpoints in the background (:func:`prune`)."""
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
            staging.mkdir()
        disk_step(prepare, root)
    _agree_on_errors(errors, staging, needed)

    def rng():
        digests[f"rng_rank{rank}.pt"] = _torch_save(rng_state(), staging / f"rng_rank{rank}.pt")
    disk_step(rng, staging / f"rng_rank{rank}.pt")
    # The whole-tensor sets: every rank streams the shards it owns, all at once (fsynced as closed).
    write_state(engine, staging, with_moments=optimizer_update_count(engine) > 0, digests=digests,
                errors=errors)
    if rank == 0 and not errors:
        def small_files():
            write_atomic(staging / CONFIG, config_yaml)
            write_atomic(staging / HF_CONFIG, hf_config.to_json_string())  # what to_json_file writes, fsynced
            if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
                shutil.copytree(tokenizer_dir, staging / "tokenizer", dirs_exist_ok=True)
                fsync_tree(staging / "tokenizer")
            # The folder's entries (every rank's renamed shards) are fsynced by write_meta's
            # write_atomic, after the collective that follows every rank's last write.
        disk_step(small_files, staging)
    fault_point("save", step)
    _agree_on_errors(errors, staging, needed)
    streamed = [None] * dist.get_world_size()
    dist.all_gather_object(streamed, digests)
    if rank == 0:
        def publish():
            write_meta(staging, meta, {k: v for d in streamed for k, v in d.items()})
            _publish(staging, final)
        disk_step(publish, staging)
    _agree_on_errors(errors, staging, needed)
    if rank == 0:
        prune(root, keep_last, final)  # after the last collective: no rank waits for the delete
    return final


def load_checkpoint(engine, folder: Path, meta: CheckpointMeta, *, same_layout: bool) -> None:
    """Restore a checkpoint into ``engine`` (collective): weights, adapter buffers, Adam state,
    LR scheduler and DeepSpeed's counters from the whole-tensor sets
    (:func:`ds_relora.checkpoint.elastic.restore`, any world size and stage), and on the layout
    it was written with (``same_layout``) this rank's RNG too. The data position is the meta's
    (:meth:`~ds_relora.checkpoint.meta.CheckpointMeta.data_position`)."""
    # DeepSpeed's files name the unsplit tensors: a model in row blocks reads the sets.
    if same_layout and (meta.format_version or 0) < SETS_ONLY_VERSION and not whole_names(engine.module):
        _load_deepspeed_files(engine, folder)
    else:
        restore(engine, folder, meta)
    rng_file = folder / f"rng_rank{dist.get_rank()}.pt"
    if same_layout and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))


def _load_deepspeed_files(engine, folder: Path) -> None:
    """Formats 2-5 on their own layout: DeepSpeed's files restore exactly what they hold (its
    client state, where older checkpoints kept a second copy of the data position, is not read);
    its module file lacks the frozen params, read from the weights set (each rank its shard)."""
    _, client = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=False)
    if client is None:
        raise CheckpointError(f"DeepSpeed could not load {folder}: the folder is damaged; resume from an older step-N")
    weights = open_weights(folder)
    trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
    load_weights(engine.module, weights, source=str(folder), skip=trainable)
    load_adapter_buffers(engine.module, weights)  # MoRA's patterns, GaLore's projectors
