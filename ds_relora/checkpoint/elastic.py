"""Restoring a run's state from a checkpoint's whole-tensor sets, on any number of ranks and any
ZeRO stage: since format 6 the one way every resume restores (same layout or not).

DeepSpeed's optimizer checkpoint is per rank and per stage (and its universal checkpoints do not
restore frozen params), so format 6 no longer writes it. Every ds_relora checkpoint holds the whole fp32 value of every
parameter (the weights set: masters of the trainable ones, frozen W, adapters, adapter buffers)
and the Adam moments of every trainable one (the moments set), written through ``zero_state`` as
whole tensors and read back one parameter at a time. From those two files any stage and world size rebuilds
exactly the same optimizer state:

* the module tensors and the fp32 masters get the saved values (each rank writes its own shard);
* Adam's state is created for every flat partition at the saved step count (torch's own layout:
  a scalar ``step``, zero moments) and then the saved moments are written into each fragment;
* the LR scheduler's position, DeepSpeed's step counters and an fp16 loss scaler come from
  ``meta.json`` (:func:`engine_counters` writes them; the data position too, as on every
  resume: :meth:`~ds_relora.checkpoint.meta.CheckpointMeta.data_position`).

The per-rank RNG streams are restored by the caller only on the same world size
(:func:`ds_relora.checkpoint.store.load_checkpoint`); on another one the ranks are other ranks,
so adapter dropout masks after an elastic resume differ from an uninterrupted run's.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ds_relora.checkpoint.format import CheckpointMeta, has_moments, open_moments, open_weights
from ds_relora.checkpoint.state_io import load_weights, restore_projected
from ds_relora.display import plural
from ds_relora.errors import CheckpointError
from ds_relora.methods import load_adapter_buffers
from ds_relora.row_blocks import reader
from ds_relora.zero.state import MOMENTS, set_moment


def needs_elastic(meta: CheckpointMeta, world_size: int, stage: int) -> bool:
    """A resume on another layout than the checkpoint's (another world size or ZeRO stage)."""
    return meta.world_size != world_size or meta.zero_stage != stage


# The fp16 dynamic loss scaler's changing numbers (DeepSpeed's fp16/loss_scaler.py).
_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def _loss_scaler(engine):
    return getattr(engine.optimizer, "loss_scaler", None) if engine.fp16_enabled() else None


def engine_counters(engine) -> dict:
    """What DeepSpeed's own checkpoint files held besides tensors, for ``meta.json``: its step
    counters, the LR scheduler's position and (fp16 only) the loss scaler's state."""
    scaler = _loss_scaler(engine)
    return {
        "global_steps": int(engine.global_steps), "global_samples": int(engine.global_samples),
        "skipped_steps": int(engine.skipped_steps), "scheduler_epoch": int(engine.lr_scheduler.last_epoch),
        "loss_scaler": None if scaler is None else {k: getattr(scaler, k) for k in _SCALER_FIELDS if hasattr(scaler, k)},
    }


def _restore_counters(engine, meta: CheckpointMeta) -> None:
    """The LR scheduler's position and DeepSpeed's counters (before format 6: derived from the
    step, as no config of that time skipped updates)."""
    updates = int(meta.step) - int(meta.phase_offset)
    counters = meta.engine_counters or {"global_steps": updates, "global_samples": updates * int(meta.global_batch),
                                        "skipped_steps": 0, "scheduler_epoch": updates, "loss_scaler": None}
    scheduler = engine.lr_scheduler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": we set its position
        scheduler.last_epoch = int(counters["scheduler_epoch"]) - 1
        scheduler.step()
    engine.global_steps = int(counters["global_steps"])
    engine.global_samples = int(counters["global_samples"])
    engine.skipped_steps = int(counters["skipped_steps"])
    scaler = _loss_scaler(engine)
    for key, value in (counters.get("loss_scaler") or {}).items():
        if scaler is not None and key in _SCALER_FIELDS:
            setattr(scaler, key, value)


def check_elastic(folder: Path, meta: CheckpointMeta, world_size: int, stage: int) -> None:
    """One line when a checkpoint cannot be resumed on this world size / stage."""
    if meta.optimizer_step is None or (meta.optimizer_step > 0 and not has_moments(folder)):
        raise CheckpointError(
            f"{folder} was written by {plural(meta.world_size, 'rank')} on ZeRO-{meta.zero_stage} before "
            f"checkpoints held the stage-independent optimizer state (the Adam moments), and this run has "
            f"{plural(world_size, 'rank')} on ZeRO-{stage}: resume it with {plural(meta.world_size, 'rank')} and the same "
            "ZeRO stage (DeepSpeed's optimizer shards are per rank)"
        )


def _init_adam_state(engine, step: int) -> None:
    """Adam's state for every param the (inner) optimizer steps, as torch creates it lazily."""
    basic = getattr(engine.optimizer, "optimizer", engine.optimizer)
    on_device = any(g.get("fused") or g.get("capturable") for g in basic.param_groups)
    params = [p for g in basic.param_groups for p in g["params"]]
    # ZeRO-3 steps its flat fp32 partitions (one per sub-group), not always listed in the groups.
    params += list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))
    for p in {id(p): p for p in params}.values():
        state = basic.state[p]
        state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device if on_device else "cpu")
        for key in MOMENTS:
            if key not in state:
                state[key] = torch.zeros_like(p)


@torch.no_grad()
def restore(engine, folder: Path, meta: CheckpointMeta) -> None:
    """Load a checkpoint of any stage / world size into ``engine`` (collective): weights, adapter
    buffers, Adam state, LR scheduler and DeepSpeed's step counters. A method whose optimizer
    keeps state that is not shaped like its params takes it back here, after the moments."""

    folder = Path(folder)
    weights = open_weights(folder)
    load_weights(engine.module, weights, source=str(folder), engine=engine)
    load_adapter_buffers(engine.module, weights)
    step = int(meta.optimizer_step)
    if step > 0:
        moments = reader(open_moments(folder), engine.module)  # row blocks read their rows of the whole moments
        if not restore_projected(engine, moments):  # APOLLO / Fira: their own state, taken whole
            _init_adam_state(engine, step)
            for name, p in engine.module.named_parameters():
                if p.requires_grad:
                    for key in MOMENTS:
                        if f"{name}.{key}" not in moments:
                            raise CheckpointError(f"{folder} has no Adam moment {name}.{key}: the checkpoint is "
                                                  "damaged or of another method; resume from another step-N folder")
                        set_moment(engine, p, key, moments[f"{name}.{key}"].to(engine.device))
    _restore_counters(engine, meta)
