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


def _partition_rank(p) -> int:
    return torch.distributed.get_rank(group=p.ds_process_group)


def _write_module_tensor(p, value: torch.Tensor) -> None:
    """Write the full ``value`` into the module's (low-precision) copy of ``p`` on this rank
    (``copy_`` moves it to each copy's own device: the shard may live in CPU memory)."""
    if is_zero3_param(p):
        part = p.ds_tensor
        rank = _partition_rank(p)
        flat = value.reshape(-1)
        start = rank * part.numel()
        end = min(start + part.numel(), flat.numel())
        if end > start:
            part.data[: end - start].copy_(flat[start:end].to(part.dtype))
        if _is_gathered(p):
            p.data.copy_(value.reshape(p.data.shape).to(p.dtype))
    else:
        p.data.copy_(value.reshape(p.shape).to(p.dtype))


def compute_device(target: torch.Tensor, operand: torch.Tensor) -> torch.device:
    """Where to compute an update of ``target`` from ``operand``: the accelerator of the two.

    W's shard in pinned CPU memory (ZeRO-3 param offload) is updated from a product computed
    next to the masters on the GPU; the masters in CPU memory (optimizer offload) are moved to
    a W on the GPU. Only adapter-sized or shard-sized tensors ever cross."""
    return target.device if target.device.type != "cpu" else operand.device


def _add_into(target: torch.Tensor, delta: torch.Tensor) -> None:
    """``target += delta`` in fp32, rounded once to ``target``'s dtype, on ``target``'s device."""
    delta = delta.to(target.device).reshape(target.shape)
    target.copy_((target.float() + delta).to(target.dtype))


def base_delta(a: torch.Tensor, b: torch.Tensor, scale: float, device: torch.device,
               rows: slice = slice(None)) -> torch.Tensor:
    """``scale * b[rows] @ a`` in fp32 on ``device``."""
    return scale * (b[rows].to(device, torch.float32) @ a.to(device, torch.float32))


def _add_delta_to_base(weight, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """``weight += scale * b @ a`` computed in fp32, touching only this rank's shard on ZeRO-3."""
    if not is_zero3_param(weight):
        _add_into(weight.data, base_delta(a, b, scale, compute_device(weight.data, a)))
        return
    part = weight.ds_tensor
    cols = a.shape[1]
    start = _partition_rank(weight) * part.numel()
    end = min(start + part.numel(), weight.ds_numel)
    full = None
    if _is_gathered(weight):
        # A persistent W has two copies (the gathered param.data and the shard): one product,
        # sliced for the shard, keeps them bit-identical (a checkpoint taken now resumes exactly).
        full = base_delta(a, b, scale, compute_device(weight.data, a))
        _add_into(weight.data, full)
    if end > start:
        if full is not None:
            delta = full.reshape(-1)[start:end]
        else:
            row0, row1 = start // cols, (end - 1) // cols + 1
            rows = base_delta(a, b, scale, compute_device(part, a), slice(row0, row1)).reshape(-1)
            delta = rows[start - row0 * cols : end - row0 * cols]
        _add_into(part.data[: end - start], delta)


def reinit_values(shape_a, shape_b, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh fp32 A (Kaiming, drawn from the CPU ``generator``: the same values on every
    device and rank) and B = 0, both on ``device``."""
    new_a = kaiming_uniform_A(tuple(shape_a), generator).to(device)
    return new_a, torch.zeros(tuple(shape_b), dtype=torch.float32, device=device)


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
        # Made next to the masters; the writes below copy to each copy's own device.
        new_a, new_b = reinit_values(full_shape(mod.lora_A), full_shape(mod.lora_B), generator, a.device)
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
