"""The warm-start switch's snapshot: this rank's fp32 shards of an engine (the engine's own
tensors, no copy), written into the next engine of the same world size and stage without any
gather (ZeRO-3: ``4 P / N`` bytes per rank, never a whole model)."""

from __future__ import annotations

import torch

from ds_relora.checkpoint.state_io import partitioned, write_local, write_whole
from ds_relora.zero.state import get_master, is_zero3_param, local_partition


@torch.no_grad()
def local_snapshot(engine) -> dict[str, torch.Tensor]:
    """This rank's fp32 share of every parameter, where it lives (a GPU run's snapshot stays on
    the GPU; host memory never holds a whole fp32 model): the local master fragment (ZeRO-3
    trainable) or shard (ZeRO-3 frozen) without communication; the whole value of a ZeRO-3
    persistent (always gathered, small) param and on ZeRO 0-2, which replicate the module anyway.
    Collective (the master getters): every rank calls it.

    The values are the old engine's own fp32 tensors wherever they hold the exact value (views of
    its masters and shards; on ZeRO 0-2 the module's fp32 params, which equal their masters after
    every step: checked here), not copies: the snapshot costs nothing beside the engine it is
    taken from, and after that engine is released it keeps only those tensors (the masters; the
    moments and gradients go). Nothing writes them before :func:`restore_snapshot` reads them.
    """
    out = {}
    for name, p in engine.module.named_parameters():
        if partitioned(p):
            out[name] = local_partition(p).float()
            continue
        module = p.detach()
        value = get_master(engine, p) if p.requires_grad else module.float()
        if value is not module and module.dtype == torch.float32 and torch.equal(value, module.reshape(value.shape)):
            value = module.reshape(value.shape)  # the module's own tensor: the gathered copy is dropped
        out[name] = value
    return out


@torch.no_grad()
def restore_snapshot(engine, snapshot: dict[str, torch.Tensor]) -> None:
    """Write a :func:`local_snapshot` of an engine of the same stage and world size into the
    matching parameters of ``engine`` (names absent from the snapshot, the new adapters, keep
    their values). ZeRO-3 shards are written as they are, so no rank sees a whole tensor."""
    for name, p in engine.module.named_parameters():
        if name not in snapshot:
            continue
        value = snapshot.pop(name)
        if is_zero3_param(p) and value.numel() != p.ds_numel:
            if value.numel() != p.ds_tensor.numel() or not partitioned(p):
                raise RuntimeError(f"{name}: a shard of {value.numel()} values for a partition of {p.ds_tensor.numel()} "
                                   "(the switch keeps the world size and the stage)")
            write_local(p, value, p.requires_grad)
        else:
            write_whole(engine, p, value, p.requires_grad)

