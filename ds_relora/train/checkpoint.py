"""Atomic, resumable checkpoints: ``run_dir/checkpoints/step-N/``.

Each folder holds DeepSpeed's own checkpoint (exact resume at the same world size), one RNG
file per rank, ``model_fp32.safetensors`` (every parameter by its HF name in fp32, adapters
included; stage-independent, used by export, eval, spectrum and warm starts), the resolved run
config, the HF model config and the tokenizer. ``meta.json`` is written last, atomically: a
folder without it is incomplete and ignored.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..errors import CheckpointError
from ..relora.zero_state import full_shape, get_master, is_zero3_param
from ..weights import CONSOLIDATED, META, read_meta

STEP_DIR = re.compile(r"^step-(\d+)$")


def write_atomic(path: Path, data: bytes | str) -> None:
    # A per-process temp name: several nodes may write the same file on a shared filesystem.
    tmp = path.with_name(f"{path.name}.tmp.{socket.gethostname()}.{os.getpid()}")
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(tmp, mode) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under ``root``, oldest first."""
    found = []
    if root.is_dir():
        for child in root.iterdir():
            m = STEP_DIR.match(child.name)
            if m and (child / META).is_file():
                found.append((int(m.group(1)), child))
    return sorted(found)


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint folder to resume from, or None for a fresh start."""
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir / "checkpoints")
        return found[-1][1] if found else None
    path = Path(resume)
    if path.is_dir() and not (path / META).is_file():
        found = complete_checkpoints(path) or complete_checkpoints(path / "checkpoints")
        if found:
            return found[-1][1]
    if not (path / META).is_file():
        raise CheckpointError(
            f"--resume {resume}: no complete checkpoint there (a step-N folder with {META}): "
            "point at a checkpoints/step-N folder, a run folder, or use --resume auto"
        )
    return path


@torch.no_grad()
def gather_full_state(engine) -> dict[str, torch.Tensor]:
    """Every parameter's full fp32 value on every rank: trainable ones from the optimizer's fp32
    master, frozen ones from the module (gathered under ZeRO-3). Collective."""
    import deepspeed

    state = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            state[name] = get_master(engine, p).contiguous()
        else:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None, enabled=is_zero3_param(p)):
                state[name] = p.data.detach().float().clone().reshape(full_shape(p))
    return state


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


def save_checkpoint(engine, root: Path, step: int, *, meta: dict, client_state: dict, config_yaml: str,
                    hf_config, tokenizer_dir: Path | None, keep_last: int) -> Path:
    """Collective: every rank must call it at the same step."""
    from safetensors.torch import save_file

    rank = dist.get_rank()
    folder = root / f"step-{step}"
    if rank == 0:
        if folder.exists():
            shutil.rmtree(folder)  # a leftover from an interrupted save of the same step
        root.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=folder.name, client_state=client_state, save_latest=False)
    torch.save(rng_state(), folder / f"rng_rank{rank}.pt")
    full = gather_full_state(engine)
    if rank == 0:
        tmp = folder / (CONSOLIDATED + ".tmp")
        save_file(full, str(tmp))
        os.replace(tmp, folder / CONSOLIDATED)
        write_atomic(folder / "config.yaml", config_yaml)
        hf_config.to_json_file(str(folder / "hf_config.json"))
        if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
            shutil.copytree(tokenizer_dir, folder / "tokenizer", dirs_exist_ok=True)
    dist.barrier()
    if rank == 0:
        write_atomic(folder / META, json.dumps(meta, indent=2))
        if keep_last > 0:
            for _, old in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return folder


def load_checkpoint(engine, folder: Path, world_size: int) -> dict:
    """Restore engine, scheduler and this rank's RNG; returns the client state. Collective."""
    meta = read_meta(folder)
    if meta.get("world_size") != world_size:
        raise CheckpointError(
            f"{folder} was written by {meta.get('world_size')} ranks but this run has {world_size}: resume with "
            f"the same number of ranks, or start a new run from it with relora.warm_start_from"
        )
    _, client = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    if client is None:
        raise CheckpointError(f"DeepSpeed could not load {folder}: the folder is damaged; resume from an older step-N")
    rng_file = folder / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client


def load_consolidated(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(folder) / CONSOLIDATED
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {CONSOLIDATED}: point at a complete ds_relora checkpoints/step-N folder")
    return load_file(str(path))
