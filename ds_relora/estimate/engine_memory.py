"""What a live DeepSpeed engine holds, measured: the model-state bytes per category (lp weights,
gradients, fp32 master, Adam moments) read from the engine's own tensors, each storage counted
once, to hold :mod:`ds_relora.estimate.memory`'s analytic figures against (tests/workers/mem_worker.py)."""

from __future__ import annotations

import math

import torch


class _Ledger:
    """Bytes per category, each storage counted once, by the first category that claims it."""

    def __init__(self):
        self.owner: dict[int, str] = {}
        self.bytes: dict[str, int] = {}
        self.host: dict[str, int] = {}

    def add(self, category: str, tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0 or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        if storage.data_ptr() in self.owner:
            return
        self.owner[storage.data_ptr()] = category
        self.bytes[category] = self.bytes.get(category, 0) + storage.nbytes()
        if tensor.device.type == "cpu":
            self.host[category] = self.host.get(category, 0) + storage.nbytes()


def _tensors(obj):
    """Tensors inside nested lists, tuples and dict values (dict keys are not searched)."""

    if isinstance(obj, torch.Tensor):
        yield obj
        flat = getattr(obj, "flat_partition", None)
        if flat is not None:
            yield flat
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        flat = getattr(obj, "flat_partition", None)  # GradPartitionBufferGroup: a list with a flat buffer
        if flat is not None:
            yield flat
        for v in obj:
            yield from _tensors(v)


def model_state_bytes_from_engine(engine) -> dict[str, int]:
    """Bytes of the model states a DeepSpeed engine holds on this rank, found in its tensors.

    Categories: ``weights`` (module params; ZeRO-3: ``p.ds_tensor``), ``weights_gathered``
    (ZeRO-3 full params that are resident now: persistent small params or ones in flight),
    ``master`` (the inner optimizer's params when they are not the module's), ``adam`` (the
    inner optimizer's state), ``grads`` (``p.grad``, the ZeRO partition buffers
    ``grads_in_partition`` / ``averaged_gradients`` / ``grad_partitions_flat_buffer``, the
    BF16_Optimizer flat fp32 gradients, the masters' ``.grad``), ``buckets`` (reduce buckets,
    not model states), ``other`` (any further tensor the optimizer wrapper holds directly, so
    that a buffer this function does not know still shows up), ``total`` = weights + grads +
    master + adam, and ``host``: the part of ``total`` in CPU memory (everything on a CPU run;
    the offloaded states on a GPU run, to compare with ``MemoryEstimate.cpu``). Storage is counted
    whole and once, so partition alignment padding is included (a few elements per group).
    Call it between backward and ``step()`` to see the gradients: ZeRO frees them in the step.
    """
    ledger = _Ledger()
    opt = engine.optimizer
    # Buckets first: stage-1/2 gradients are views into them while in flight, and claiming the
    # buffer keeps such views out of ``grads``.
    for bucket in (getattr(opt, "ipg_buckets", None) or {}).values():
        for t in _tensors(getattr(bucket, "buffer", None)):
            ledger.add("buckets", t)
    for name in ("ipg_bucket_flat_buffer", "temp_grad_buffer_for_cpu_offload", "temp_grad_buffer_for_gpu_offload"):
        for t in _tensors(getattr(opt, name, None)):
            ledger.add("buckets", t)

    module_params = list(engine.module.parameters())
    for p in module_params:
        if hasattr(p, "ds_tensor"):
            ledger.add("weights", p.ds_tensor)
    for p in module_params:
        ledger.add("weights_gathered" if hasattr(p, "ds_tensor") else "weights", p.data)

    inner = getattr(opt, "optimizer", None) if opt is not None else None
    if inner is None or not hasattr(inner, "state"):
        inner = opt  # stage 0 in fp32: the client optimizer itself, whose params are the module's
    masters = []
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups",
                 "fp32_groups_flat_partition"):
        masters += list(_tensors(getattr(opt, name, None)))
    if inner is not None:
        # ZeRO-3 fills the inner param_groups only inside step(); its state keys are the masters.
        masters += [p for group in inner.param_groups for p in group["params"]] + list(inner.state)
    for p in masters:
        ledger.add("master", p)  # a module param (stage 0, fp32) was claimed as ``weights`` above
    if inner is not None:
        for state in inner.state.values():
            for t in _tensors(state):
                ledger.add("adam", t)
        # The projected optimizer (APOLLO, Fira) keeps its state beside ``state``.
        for t in getattr(inner, "state_tensors", list)():
            ledger.add("adam", t)
    for p in masters:
        ledger.add("grads", p.grad)

    for p in module_params:
        ledger.add("grads", p.grad)
        ledger.add("grads", getattr(p, "grad_accum", None))
    for name in ("grads_in_partition", "averaged_gradients", "all_grad_tensors", "grad_partitions_flat_buffer",
                 "fp32_groups_gradients_flat", "accumulated_grads_in_cpu"):
        for t in _tensors(getattr(opt, name, None)):
            ledger.add("grads", t)
    if opt is not None:
        for value in vars(opt).values():
            for t in _tensors(value):
                ledger.add("other", t)

    keys = ("weights", "weights_gathered", "grads", "master", "adam", "buckets", "other")
    out = {k: ledger.bytes.get(k, 0) for k in keys}
    states = ("weights", "grads", "master", "adam")
    out["total"] = sum(out[k] for k in states)
    out["host"] = sum(ledger.host.get(k, 0) for k in states)
    return out


def relative_error(measured: int, expected: int) -> float:
    """|measured - expected| / expected (0 when both are 0)."""
    if expected == 0:
        return 0.0 if measured == 0 else math.inf
    return abs(measured - expected) / expected
