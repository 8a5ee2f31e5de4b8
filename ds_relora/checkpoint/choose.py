"""Which checkpoint a run resumes from: the newest intact one under a run folder (``auto``), a
folder the user named, or none; each damaged one is skipped with one line. On the ranks the
choice is collective (:func:`agree_on_resume`): rank 0 decides, every rank hashes its share, and
a mismatch anywhere makes all of them fall back together."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable

from ds_relora.checkpoint.format import META, best_folder_per_step, check_complete, read_meta, verify, verify_share
from ds_relora.errors import CheckpointError
from ds_relora.run_folder import checkpoint_root


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint with a meta.json under ``root`` (the best folder of
    each step), oldest first. Not verified: see :func:`latest_intact`."""
    return sorted((step, folders[0]) for step, folders in best_folder_per_step(root).items())


def latest_intact(root: Path, log: Callable[[str], None] | None = None, *, hashes: bool = True,
                  skip: tuple | list = ()) -> Path | None:
    """The newest checkpoint under ``root`` that verifies; each damaged one is skipped with one
    line (``skip``: folders already found damaged and reported)."""
    found = best_folder_per_step(root)
    for step in sorted(found, reverse=True):
        for folder in found[step]:
            if folder in skip:
                continue
            try:
                check_complete(folder, hashes=hashes)
                return folder
            except CheckpointError as exc:
                if log:
                    log(f"resume: skipping {str(exc).split(': pick another')[0]}; falling back to an older checkpoint")
    if found:
        raise CheckpointError(f"every checkpoint under {root} is damaged: resume from another run folder, or "
                              "delete them to start over")
    return None


def resolve_resume(resume: str | None, run_dir: Path, log: Callable[[str], None] | None = None, *,
                   hashes: bool = True, skip: tuple | list = ()) -> Path | None:
    """The checkpoint folder to resume from, or None for a fresh start. ``auto`` and run/checkpoints
    folders pick the newest intact checkpoint; an explicit step-N folder must be intact.
    ``hashes=False`` checks meta.json and sizes only (:func:`agree_on_resume` hashes on every rank)."""
    if not resume:
        return None
    if resume == "auto":
        return latest_intact(checkpoint_root(run_dir), log, hashes=hashes, skip=skip)
    path = Path(resume)
    if path.is_dir() and not (path / META).is_file():
        found = (latest_intact(path, log, hashes=hashes, skip=skip)
                 or latest_intact(checkpoint_root(path), log, hashes=hashes, skip=skip))
        if found:
            return found
    if not (path / META).is_file():
        raise CheckpointError(
            f"--resume {resume}: no complete checkpoint there (a step-N folder with {META}): "
            "point at a checkpoints/step-N folder, a run folder, or use --resume auto"
        )
    check_complete(path, hashes=hashes)
    return path


def agree_on_resume(resume: str | None, run_dir: Path, log: Callable[[str], None] | None = None) -> Path | None:
    """Collective: rank 0 resolves the checkpoint and broadcasts it (ranks on a lagging or
    unshared filesystem must not pick another one); every rank then checks it can read it and
    hashes its share of its files (:func:`verify_share`). A hash mismatch on any rank skips the
    checkpoint with one line and tries the next older one (an explicit step-N folder fails)."""
    import torch.distributed as dist  # noqa: PLC0415  (torch takes seconds to import; `sweep --status` and the sweep's point runner read checkpoints through this module)

    rank, world = dist.get_rank(), dist.get_world_size()
    explicit = bool(resume) and resume != "auto" and (Path(resume) / META).is_file()
    damaged: list[Path] = []
    while True:
        chosen = [None, None]
        if rank == 0:
            try:
                folder = resolve_resume(resume, run_dir, log, hashes=False, skip=damaged)
                chosen = [str(folder) if folder is not None else None, None]
            except CheckpointError as exc:  # every rank must raise it, not wait for a broadcast
                chosen = [None, str(exc)]
        dist.broadcast_object_list(chosen, src=0)
        if chosen[1] is not None:
            raise CheckpointError(chosen[1])
        if chosen[0] is None:
            return None
        folder = Path(chosen[0])
        damage = None
        try:
            meta = read_meta(folder, for_resume=True)
            problem = verify(folder, meta, hashes=False)
        except CheckpointError as exc:
            problem = str(exc)
        if problem is None:
            damage = verify(folder, meta, only=verify_share(meta, rank, world))
        reports = [None] * world
        dist.all_gather_object(reports, (rank, socket.gethostname(), problem, damage))
        bad = [r for r in reports if r[2]]
        if bad:
            rank_, host, problem = bad[0][:3]
            raise CheckpointError(
                f"rank {rank_} on host {host} cannot read the checkpoint {folder} chosen by rank 0 ({problem}): "
                "put train.run_dir on a filesystem every node sees, or wait for it to sync"
            )
        hurt = [r[3] for r in reports if r[3]]
        if not hurt:
            return folder
        if explicit:
            raise CheckpointError(f"{folder} is damaged ({hurt[0]}): pick another step-N folder")
        if log:
            log(f"resume: skipping {folder} is damaged ({hurt[0]}); falling back to an older checkpoint")
        damaged.append(folder)
