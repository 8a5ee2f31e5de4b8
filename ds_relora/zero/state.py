"""Reading and writing the optimizer's copy of a trainable parameter under every ZeRO stage.

DeepSpeed keeps a separate fp32 master (and the Adam moments) for every trainable parameter on
ZeRO 1, 2 and 3, even in fp32, and on stage 0 with bf16/fp16; after each ``step()`` it copies
the master back over the module tensor. A re-init written only to the module is therefore undone
one step later. These helpers reach the master and the moments per *whole* parameter, whatever
the stage, so that callers never see DeepSpeed's flat partitions:

* ``get_*`` are collective on ZeRO 1/2/3 (all-reduce / all-gather): call them on every rank in
  the same order.
* ``set_*`` take the *full* value and must be called on every rank with the same value; each rank
  writes only its own fragment.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from ds_relora.zero import projected_state

MOMENTS = ("exp_avg", "exp_avg_sq")


def is_zero3_param(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def full_shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    """The logical shape (ZeRO-3 params have an empty ``data`` outside a gather)."""
    return tuple(p.ds_shape) if is_zero3_param(p) else tuple(p.shape)


def _uses_hp_mapping(p) -> bool:
    # ZeRO 1/2 and BF16_Optimizer link every trainable param to its flat fp32 fragment.
    return hasattr(p, "_hp_mapping")


def _stage0_master(engine, p) -> torch.Tensor | None:
    """The fp32 copy of ``p`` under stage 0 with fp16/bf16 (FP16_[Unfused]Optimizer), else None."""
    opt = engine.optimizer
    lp_groups = getattr(opt, "fp16_groups", None)
    hp_groups = getattr(opt, "fp32_groups", None)
    if lp_groups is None or hp_groups is None:
        return None
    for lp_group, hp_group in zip(lp_groups, hp_groups):
        for lp, hp in zip(lp_group, hp_group):
            if lp is p:
                return hp
    raise RuntimeError("parameter not found in the fp16 optimizer's groups")


def _partition_rank(p) -> int:
    return dist.get_rank(group=p.ds_process_group)


def shard_bounds(p) -> tuple[int, int] | None:
    """``[start, end)`` of the flattened full tensor that this rank's ZeRO-3 shard of ``p`` holds,
    or None where writing the whole value is needed: ``p`` is not partitioned, or it is also
    gathered (persistent)."""
    if not is_zero3_param(p) or p.data.numel() == p.ds_numel:
        return None
    return _shard_range(p)


def _shard_range(p) -> tuple[int, int]:
    start = _partition_rank(p) * p.ds_tensor.numel()
    return start, min(start + p.ds_tensor.numel(), p.ds_numel)


def set_shard_slice(p, start: int, values: torch.Tensor) -> None:
    """Write ``values``, elements ``[start, start + len)`` of the flattened full tensor, into this
    rank's shard of ZeRO-3 ``p`` where they overlap it."""
    bounds = shard_bounds(p)
    lo, hi = max(start, bounds[0]), min(start + values.numel(), bounds[1])
    if hi > lo:
        p.ds_tensor.data[lo - bounds[0]: hi - bounds[0]].copy_(values[lo - start: hi - start].to(p.ds_tensor.dtype))


def set_module_value(p, value: torch.Tensor) -> None:
    """Write the full ``value`` into the module's (low-precision) copy of ``p`` on this rank: on
    ZeRO-3 only this rank's slice of its shard, plus the whole tensor when ``p`` is gathered
    (persistent). ``copy_`` moves it to each copy's own device: the shard may live in CPU memory."""
    if is_zero3_param(p):
        part = p.ds_tensor
        flat = value.reshape(-1)
        start, end = _shard_range(p)
        if end > start:
            part.data[: end - start].copy_(flat[start:end].to(part.dtype))
        if p.data.numel() == p.ds_numel:
            p.data.copy_(value.reshape(p.data.shape).to(p.dtype))
    else:
        p.data.copy_(value.reshape(p.shape).to(p.dtype))


@contextlib.contextmanager
def shard_writes(*params):
    """Around in-place writes to ZeRO-3 shards (``ds_tensor``) outside DeepSpeed's hooks: a
    merge, a projector update. ZeRO-3 gathers (and, with parameter offload, copies shards from
    pinned host memory) on its own CUDA stream, which is not ordered after the current stream's
    kernels: wait for whatever reads the shards before writing them, and for the writes before
    the next forward's prefetch reads them. Merges are rare, so two device syncs cost nothing
    measurable; without CUDA in use there is nothing to order."""
    sync = torch.cuda.is_initialized() and any(is_zero3_param(p) for p in params)
    if sync:
        torch.cuda.synchronize()
    yield
    if sync:
        torch.cuda.synchronize()


def _z3_local_slice(p, value: torch.Tensor) -> torch.Tensor:
    """This rank's padded slice ``[r*P, (r+1)*P)`` of the flattened full value."""
    part = p.ds_tensor.numel()
    rank = _partition_rank(p)
    flat = value.detach().reshape(-1).to(torch.float32)
    out = torch.zeros(part, dtype=torch.float32, device=p.ds_tensor.device)
    start = rank * part
    end = min(start + part, flat.numel())
    if end > start:
        out[: end - start].copy_(flat[start:end])
    return out


def ensure_state_linked(engine) -> None:
    """Link ZeRO-1/2 fragments to their Adam state where DeepSpeed left them unlinked.

    DeepSpeed links them once, lazily, right after the *first param group's* first step (so
    groups 2+ stay unlinked for good) and does not re-link after ``load_checkpoint``."""
    opt = engine.optimizer
    if not hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        return
    params = [p for g in getattr(opt, "bit16_groups", getattr(opt, "bf16_groups", [])) for p in g]
    stale = any(
        getattr(p, "_hp_mapping", None) is not None and not p._hp_mapping.optim_fragment for p in params
    )
    if stale and any(len(s) for s in opt.optimizer.state.values()):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def get_master(engine, p) -> torch.Tensor:
    """Full fp32 master value of trainable ``p`` (collective on ZeRO 1/2/3)."""
    from deepspeed.utils import safe_get_full_fp32_param  # noqa: PLC0415  (deepspeed takes seconds to import and patches torch; only code that builds an engine needs it)

    if is_zero3_param(p) or _uses_hp_mapping(p):
        return safe_get_full_fp32_param(p).reshape(full_shape(p)).float()
    hp = _stage0_master(engine, p)
    return (hp if hp is not None else p).detach().float().clone().reshape(full_shape(p))


def master_pieces(p) -> list[tuple[int, torch.Tensor]] | None:
    """This rank's piece of partitioned ZeRO-3 ``p``'s fp32 value, ``[(start in the flattened
    whole, flat values)]``, without communication: a view of the master fragment of a trainable
    ``p``, the module's shard of a frozen one (in its dtype). None where ``p`` is not
    partitioned (ZeRO 0-2, a persistent param): use :func:`get_master`."""
    bounds = shard_bounds(p)
    if bounds is None:
        return None
    return [(bounds[0], local_partition(p)[: bounds[1] - bounds[0]])]


def local_partition(p) -> torch.Tensor:
    """This rank's flat, padded partition of ZeRO-3 ``p``'s value, no copy on the device it
    lives on: a view of the master fragment of a trainable ``p``, the module's shard of a frozen
    one (in its dtype)."""
    from deepspeed.utils import safe_get_local_fp32_param  # noqa: PLC0415  (deepspeed takes seconds to import and patches torch; only code that builds an engine needs it)

    local = safe_get_local_fp32_param(p) if p.requires_grad else p.ds_tensor
    return local.detach().reshape(-1)


def set_master(engine, p, value: torch.Tensor) -> None:
    """Write the full fp32 ``value`` into ``p``'s master copy (same value on every rank)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param  # noqa: PLC0415  (deepspeed takes seconds to import and patches torch; only code that builds an engine needs it)

    value = value.detach().to(torch.float32)
    if is_zero3_param(p):
        # The full setter crashes on the last rank when numel % world_size != 0; the local,
        # padded setter does not.
        safe_set_local_fp32_param(p, _z3_local_slice(p, value))
    elif _uses_hp_mapping(p):
        safe_set_full_fp32_param(p, value)
    else:
        hp = _stage0_master(engine, p)
        target = hp if hp is not None else p
        target.data.copy_(value.reshape(target.shape).to(target.dtype))


def _stage0_state(engine, p) -> dict:
    hp = _stage0_master(engine, p)
    if hp is not None:
        return engine.optimizer.optimizer.state.get(hp, {})
    return engine.optimizer.state.get(p, {})


def projected(engine):
    """The engine's projected optimizer (APOLLO, Fira: ``zero/projected_adam.py``), else None."""
    basic = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return basic if hasattr(basic, "proj_state") else None


def get_moment(engine, p, key: str) -> torch.Tensor | None:
    """Full fp32 Adam moment ``key`` of ``p``; None before the first optimizer step. Under the
    projected optimizer: its state by the same names, and its per-matrix tensors
    (``projected_state.SUFFIXES``)."""
    from deepspeed.utils import safe_get_full_optimizer_state  # noqa: PLC0415  (deepspeed takes seconds to import and patches torch; only code that builds an engine needs it)

    opt = projected(engine)
    if opt is not None:
        if key in projected_state.SUFFIXES:
            return projected_state.value(opt, p, key)
        value = projected_state.plain_moment(opt, p, key, math.prod(full_shape(p)))
        return None if value is None else value.reshape(full_shape(p))

    if is_zero3_param(p):
        opt = p._z3_optimizer
        if not any(key in s for s in opt.optimizer.state.values()):
            return None
        return safe_get_full_optimizer_state(p, key).reshape(full_shape(p)).float()
    if _uses_hp_mapping(p):
        ensure_state_linked(engine)
        if not any(key in s for s in engine.optimizer.optimizer.state.values()):
            return None
        return safe_get_full_optimizer_state(p, key).reshape(full_shape(p)).float()
    state = _stage0_state(engine, p)
    return state[key].detach().float().clone() if key in state else None


def moment_pieces(engine, p, key: str) -> list[tuple[int, torch.Tensor]] | None:
    """This rank's pieces of Adam moment ``key`` of ``p`` (as :func:`master_pieces`; none before
    the first step), where the optimizer partitions it: ZeRO-3, and the projected optimizer's
    plain moments when it is partitioned. None otherwise: use :func:`get_moment`."""
    from deepspeed.utils import safe_get_local_optimizer_state  # noqa: PLC0415  (deepspeed takes seconds to import and patches torch; only code that builds an engine needs it)

    opt = projected(engine)
    if opt is not None:
        return None if key in projected_state.SUFFIXES else projected_state.plain_moment_pieces(opt, p, key)
    bounds = shard_bounds(p)
    if bounds is None:
        return None
    if not any(key in s for s in p._z3_optimizer.optimizer.state.values()):
        return []
    local = safe_get_local_optimizer_state(p, key)
    return [(bounds[0], local.detach().reshape(-1)[: bounds[1] - bounds[0]])]


def set_moment(engine, p, key: str, value: torch.Tensor) -> None:
    """Write the full fp32 Adam moment ``key`` of ``p`` (same value on every rank)."""
    from deepspeed.utils import safe_set_full_optimizer_state, safe_set_local_optimizer_state  # noqa: PLC0415  (deepspeed takes seconds to import and patches torch; only code that builds an engine needs it)

    value = value.detach().to(torch.float32)
    opt = projected(engine)
    if opt is not None:
        projected_state.set_plain_moment(opt, p, key, value, opt.update_count())
        return
    if is_zero3_param(p):
        safe_set_local_optimizer_state(p, _z3_local_slice(p, value), key)
    elif _uses_hp_mapping(p):
        ensure_state_linked(engine)
        safe_set_full_optimizer_state(p, value, key)
    else:
        state = _stage0_state(engine, p)
        state[key].copy_(value.reshape(state[key].shape).to(state[key].dtype))
