"""The ZeRO-exact merge every merging method shares: ``W += ΔW`` in fp32, then the adapter re-init.

A method's layer supplies only the :class:`~ds_relora.methods.base.MergeableLayer` protocol:
``adapter_params()``, ``delta_rows(values, row0, row1)`` (rows of its ΔW from the full fp32
adapter values) and ``reset_values(values, generator)``. ReLoRA's ΔW is ``s * B @ A``, MoRA's an
index expansion of M, GaLore's ``s * P C``. Works on ZeRO 0-3, fp32 or bf16:

* the adapter values are read from the optimizer's fp32 masters (collective, adapter-sized);
* W is frozen, so it has no master: the module tensor is the only copy. On ZeRO 0-2 it is
  replicated and every rank adds the same delta. On ZeRO-3 each rank adds only the rows of ΔW
  that cover its own shard ``W.ds_tensor`` (plus the full tensor when W is a persistent,
  always-gathered param), so a merge moves adapter bytes only, never W;
* the re-initialised values (identical on every rank: seeded generator) are written to the module
  tensors *and* to the fp32 masters; otherwise the next ``step()`` would copy the old adapter
  back while its product already sits in W (the update counted twice).

:class:`MergingMethod` is what ReLoRA and ReMoRA add to their adapter method: the jagged LR
schedule and a merge after every ``relora.reset_every``-th update, from ``Method.after_step``.
GaLore's projector update goes through the same :func:`merge_and_reinit`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from ds_relora.faults import fault_point
from ds_relora.methods.base import ScheduleSpec
from ds_relora.methods.lora_layer import base_delta, reinit_values  # noqa: F401  (re-exported: ReLoRA's ΔW and re-init)
from ds_relora.methods.schedule import merge_points
from ds_relora.zero.optim_reset import reset_generator, reset_moments
from ds_relora.zero.state import _partition_rank, get_master, is_zero3_param, set_master, set_module_value, shard_writes

RowsFn = Callable[[int, int, torch.device], torch.Tensor]  # (row0, row1, device) -> fp32 rows of ΔW


def _is_gathered(p) -> bool:
    return p.data.numel() == p.ds_numel


def compute_device(target: torch.Tensor, operand: torch.Tensor | torch.device) -> torch.device:
    """Where to compute an update of ``target`` from ``operand``: the accelerator of the two.

    W's shard in pinned CPU memory (ZeRO-3 param offload) is updated from a product computed
    next to the masters on the GPU; the masters in CPU memory (optimizer offload) are moved to
    a W on the GPU. Only adapter-sized or shard-sized tensors ever cross."""
    operand_device = operand if isinstance(operand, torch.device) else operand.device
    return target.device if target.device.type != "cpu" else operand_device


def _add_into(target: torch.Tensor, delta: torch.Tensor) -> None:
    """``target += delta`` in fp32, rounded once to ``target``'s dtype, on ``target``'s device."""
    delta = delta.to(target.device).reshape(target.shape)
    if target.dtype == torch.float32:
        target.add_(delta)  # the same sum in place: no temporary the size of W's shard
    else:
        target.copy_((target.float() + delta).to(target.dtype))


def add_delta_rows(weight, rows: RowsFn, source: torch.device) -> None:
    """``weight += ΔW`` (fp32 sum, one rounding), ΔW given by row blocks; ``source`` is where the
    adapter values live. On ZeRO-3 only the rows covering this rank's shard are computed."""
    if not is_zero3_param(weight):
        _add_into(weight.data, rows(0, weight.shape[0], compute_device(weight.data, source)))
        return
    part = weight.ds_tensor
    n_rows, cols = weight.ds_shape[0], weight.ds_numel // weight.ds_shape[0]
    start = _partition_rank(weight) * part.numel()
    end = min(start + part.numel(), weight.ds_numel)
    full = None
    if _is_gathered(weight):
        # A persistent W has two copies (the gathered param.data and the shard): one product,
        # sliced for the shard, keeps them bit-identical (a checkpoint taken now resumes exactly).
        full = rows(0, n_rows, compute_device(weight.data, source))
        _add_into(weight.data, full)
    if end > start:
        if full is not None:
            delta = full.reshape(-1)[start:end]
        else:
            row0, row1 = start // cols, (end - 1) // cols + 1
            block = rows(row0, row1, compute_device(part, source)).reshape(-1)
            delta = block[start - row0 * cols : end - row0 * cols]
        _add_into(part.data[: end - start], delta)


def _add_delta_to_base(weight, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """ReLoRA's ``weight += scale * b @ a`` (fp32), touching only this rank's shard on ZeRO-3."""
    add_delta_rows(weight, lambda r0, r1, device: base_delta(a, b, scale, device, slice(r0, r1)), a.device)


def _on(values: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in values.items()}


def merge_layer(engine, layer, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """Add ``layer``'s ΔW into its frozen W and write its re-initialised adapter into the module
    and the masters (collective). Returns the new adapter values."""
    params = layer.adapter_params()
    values = {k: get_master(engine, p) for k, p in params.items()}
    source = next(iter(values.values())).device
    # Made next to the masters; the writes below copy to each copy's own device.
    new = layer.reset_values(values, generator)
    with shard_writes(layer.weight, *params.values()):
        add_delta_rows(layer.weight, lambda r0, r1, device: layer.delta_rows(_on(values, device), r0, r1), source)
        for key, p in params.items():
            set_module_value(p, new[key])
    for key, p in params.items():
        set_master(engine, p, new[key])
    return new


@torch.no_grad()
def merge_and_reinit(
    engine,
    modules: list[tuple[str, torch.nn.Module]],
    *,
    seed: int,
    step: int,
    optimizer_reset: str = "magnitude",
    prune_ratio: float = 0.99,
    after_merge: Callable[[torch.nn.Module], None] | None = None,
) -> dict:
    """Merge every adapter into its base weight, re-init it and reset its Adam moments.

    Call on every rank, in the same order, between ``engine.step()`` and the next forward.
    ``after_merge(layer)`` runs after each layer (ReMoRA switches its grouping there).
    Returns statistics for the metrics log.
    """
    start = time.perf_counter()
    pruned = numel = 0
    for index, (_, mod) in enumerate(modules):
        generator = reset_generator(seed, step, index)
        merge_layer(engine, mod, generator)
        for param in mod.adapter_params().values():
            stats = reset_moments(engine, param, optimizer_reset, prune_ratio, generator)
            pruned += stats.get("pruned", 0)
            numel += stats.get("numel", 0)
        if after_merge is not None:
            after_merge(mod)
    return {
        "modules": len(modules),
        "moments_pruned_fraction": pruned / numel if numel else None,
        "seconds": time.perf_counter() - start,
    }


class MergingMethod:
    """Mixin before an adapter method (``class ReLoRAMethod(MergingMethod, LoRAMethod)``):
    merge-and-reinit after the update of every ``relora.reset_every``-th step of the phase,
    optimizer reset, and (``relora.jagged_schedule``) the LR back to 0 with a linear re-warm-up
    after every merge.

    Merges are fired from the LR scheduler's own step count (the ``step`` the trainer passes to
    :meth:`after_step`): DeepSpeed does not step the scheduler on a step it skipped for overflow,
    while its global step counter still advances; driving merges from the scheduler keeps every
    merge at the bottom of its LR saw-tooth, and a skipped step (the count unchanged) never merges
    twice. After a checkpoint load, :meth:`after_load` takes the restored count as the one already
    seen: the count read at :meth:`start_phase` is the fresh engine's, before the load, and a first
    step skipped after a resume would otherwise replay the merge the checkpoint already holds."""

    merges = True
    writes_base = True  # every merge adds into W

    def schedule(self, cfg, start: int) -> ScheduleSpec:
        spec = super().schedule(cfg, start)
        r = cfg.relora
        if not r.jagged_schedule:
            return spec
        return dataclasses.replace(spec, restart_every=r.reset_every, restart_warmup_steps=r.restart_warmup_steps)

    def start_phase(self, cfg, start: int, offset: int) -> None:
        super().start_phase(cfg, start, offset)
        r = cfg.relora
        self.merge_at = set(merge_points(cfg.train.total_steps, r.reset_every, start))
        self.offset, self.seed = offset, cfg.train.seed
        self.optimizer_reset, self.prune_ratio = r.optimizer_reset, r.prune_ratio
        self.seen_step = 0  # a fresh engine's scheduler: no update taken yet

    def after_load(self, engine, step: int) -> None:
        """The updates the loaded checkpoint already took are not merge candidates."""
        super().after_load(engine, step)
        self.seen_step = step

    def after_step(self, engine, step: int) -> dict | None:
        """Merges when the update just taken (global index ``offset + step - 1``, its LR was
        schedule(index)) is a merge point; returns the merge event for the metrics log."""
        if step == self.seen_step:
            return None
        self.seen_step = step
        update = self.offset + step - 1
        if update not in self.merge_at:
            return None
        fault_point("merge", update + 1)  # numbered like the step record of the update just taken
        stats = merge_and_reinit(engine, self.layers, seed=self.seed, step=update,
                                 optimizer_reset=self.optimizer_reset, prune_ratio=self.prune_ratio,
                                 after_merge=self.after_merge)
        return {"event": "merge", "step": update, **stats}
