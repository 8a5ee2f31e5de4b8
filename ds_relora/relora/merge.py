"""DeepSpeed-aware merge-and-reinit: ``W += s * B @ A`` in fp32, then A Kaiming, B zero.

Works on ZeRO 0-3, fp32 or bf16:

* A and B are read from the optimizer's fp32 masters (collective, adapter-sized).
* W is frozen, so it has no master: the module tensor is the only copy. On ZeRO 0-2 it is
  replicated and every rank adds the same delta. On ZeRO-3 each rank adds only the rows of
  ``s * B @ A`` that cover its own shard ``W.ds_tensor`` (plus the full tensor when W is a
  persistent, always-gathered param), so a merge moves adapter bytes only, never W.
* The new A (identical on every rank: seeded generator) and B = 0 are written to the module
  tensors *and* to the fp32 masters; otherwise the next ``step()`` would copy the old A and B
  back while their product already sits in W (the update counted twice).
"""

from __future__ import annotations

import time

import torch

from .layer import ReLoRALinear, kaiming_uniform_A
from .optim_reset import reset_generator, reset_moments
from .zero_state import full_shape, get_master, is_zero3_param, set_master


def _is_gathered(p) -> bool:
    return p.data.numel() == p.ds_numel


def _write_module_tensor(p, value: torch.Tensor) -> None:
    """Write the full ``value`` into the module's (low-precision) copy of ``p`` on this rank."""
    if is_zero3_param(p):
        part = p.ds_tensor
        rank = torch.distributed.get_rank(group=p.ds_process_group)
        flat = value.reshape(-1)
        start = rank * part.numel()
        end = min(start + part.numel(), flat.numel())
        if end > start:
            part.data[: end - start].copy_(flat[start:end].to(part.dtype))
        if _is_gathered(p):
            p.data.copy_(value.reshape(p.data.shape).to(p.dtype))
    else:
        p.data.copy_(value.reshape(p.shape).to(p.dtype))


def _add_delta_to_base(weight, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """``weight += scale * b @ a`` computed in fp32, touching only this rank's shard on ZeRO-3."""
    if not is_zero3_param(weight):
        weight.data.copy_((weight.data.float() + scale * (b @ a)).to(weight.dtype))
        return
    part = weight.ds_tensor
    cols = a.shape[1]
    rank = torch.distributed.get_rank(group=weight.ds_process_group)
    start = rank * part.numel()
    end = min(start + part.numel(), weight.ds_numel)
    if end > start:
        row0, row1 = start // cols, (end - 1) // cols + 1
        rows = (scale * (b[row0:row1] @ a)).reshape(-1)
        delta = rows[start - row0 * cols : end - row0 * cols]
        part.data[: end - start].copy_((part.data[: end - start].float() + delta).to(part.dtype))
    if _is_gathered(weight):
        weight.data.copy_((weight.data.float() + scale * (b @ a)).to(weight.dtype))


@torch.no_grad()
def merge_and_reinit(
    engine,
    modules: list[tuple[str, ReLoRALinear]],
    *,
    seed: int,
    step: int,
    optimizer_reset: str = "magnitude",
    prune_ratio: float = 0.99,
) -> dict:
    """Merge every adapter into its base weight, re-init it and reset its Adam moments.

    Call on every rank, in the same order, between ``engine.step()`` and the next forward.
    Returns statistics for the metrics log.
    """
    start = time.perf_counter()
    pruned = numel = 0
    for index, (_, mod) in enumerate(modules):
        a = get_master(engine, mod.lora_A)
        b = get_master(engine, mod.lora_B)
        _add_delta_to_base(mod.weight, a, b, mod.scale)
        generator = reset_generator(seed, step, index)
        new_a = kaiming_uniform_A(full_shape(mod.lora_A), generator)
        new_b = torch.zeros(full_shape(mod.lora_B))
        _write_module_tensor(mod.lora_A, new_a)
        _write_module_tensor(mod.lora_B, new_b)
        set_master(engine, mod.lora_A, new_a)
        set_master(engine, mod.lora_B, new_b)
        for param in (mod.lora_A, mod.lora_B):
            stats = reset_moments(engine, param, optimizer_reset, prune_ratio, generator)
            pruned += stats.get("pruned", 0)
            numel += stats.get("numel", 0)
    return {
        "modules": len(modules),
        "moments_pruned_fraction": pruned / numel if numel else None,
        "seconds": time.perf_counter() - start,
    }
