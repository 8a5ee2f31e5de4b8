"""Memory a rank holds for a moment beyond its model states (host transients of the build, the
save, the warm-start switch; the optimizer step's and the projector update's), the figures
``estimate-memory`` prints under its table and the lifecycle benchmark bounds each phase with."""

from __future__ import annotations

import json

from ds_relora.models import DRAW_CHUNK, Shape, linear_shapes
from ds_relora.zero.ds_config import SHIPPED


def _ceil_div(x: int, n: int) -> int:
    return -(-x // n)


# The shipped ZeRO-3 configs' sub_group_size (elements of a rank's partition per optimizer
# sub-group), read from them (tests/test_ds_configs.py checks that every zero3*.json agrees).
SUB_GROUP_SIZE = int(json.loads((SHIPPED / "zero3.json").read_text())["zero_optimization"]["sub_group_size"])


def host_transients(shape: Shape, base_params: int, largest_param: int, zero_stage: int, num_gpus: int,
                    switch: bool) -> dict[str, int]:
    """Host bytes a rank holds for a moment, beyond its model states (see ``checkpoint.state_io``):

    * init: ZeRO-3 builds partitioned (``zero.Init``), so one module is whole while it is
      constructed, and initialises each weight from a draw streamed in 16 MiB pieces
      (``models.DRAW_CHUNK``: 32 MiB above the built shards at 7B, measured); then DeepSpeed's
      engine initialisation holds 2 x the largest param for a moment (measured at the 7B and
      1.3B shapes on 2 ranks, with ``sub_group_size`` 5e7 and 1e9 alike): it gathers every
      trainable param whole to register its gradient hook (``stage3.py``,
      ``create_reduce_and_remove_grad_hooks``), and gloo's all-gather copies through a second
      full-size buffer (NCCL writes in place: one);
      other stages build the whole fp32 model on every rank (4 P);
    * save: each parameter is gathered whole in turn, its fp32 value and one moment at a time,
      while the tensors before it are queued and written; each gather waits until it fits with
      them in one layer's fp32 weights (``checkpoint.state_io.save_budget``: a decoder layer's
      params or the largest tensor). On ZeRO-3 only the rank that writes a tensor holds it (the
      pieces are sent to it: ``zero/owner_gather.py``); ZeRO 0-2's fp32 getters all-reduce a
      full-size buffer on every rank, within the same budget;
    * the warm-start switch: this rank's fp32 shards of the full-rank model (4 P / N on ZeRO-3;
      4 P on ZeRO 0-2, which hold the whole model anyway). They are the full-rank engine's own
      tensors (``checkpoint.snapshot.local_snapshot``), so they add nothing beside it; once it is freed they
      sit beside the adapter phase's build until they are written into it.
    """
    largest = 4 * largest_param  # fp32 bytes
    if zero_stage == 3:
        init, snapshot = max(2 * largest, largest + 4 * DRAW_CHUNK), 4 * _ceil_div(base_params, num_gpus)
    else:
        init, snapshot = 4 * base_params, 4 * base_params
    layer = 4 * (4 * shape.hidden**2 + 3 * shape.hidden * shape.intermediate + 2 * shape.hidden)
    return {"init_host": init, "save_host": max(largest, layer), "switch_host": snapshot if switch else 0}


def step_bytes(trainable: int, zero_stage: int, num_gpus: int, precision: str, largest_param: int) -> int:
    """Bytes DeepSpeed's optimizer step holds for a moment beyond the model states, measured at
    two layers of the 1.3B and 7B shapes and read in DeepSpeed 0.19's source. ZeRO-3 flattens
    each sub-group's gradient partition into a new tensor and casts it to fp32
    (``stage3._prepare_fp32_grad_for_sub_group``: at most ``sub_group_size`` elements plus one
    param's partition; 4 bytes per element, plus the bf16 flat copy under bf16). ZeRO-1/2 keep the
    gradients in partition order (``zero/grad_order.py``), so the step uses them where they lie;
    what remains is the gradient norm's fp64 copy of one param's piece at a time
    (``get_grad_norm_direct``), and under bf16 the fp32 cast of the rank's partition (4 bytes per
    trainable param / N). The gather of the updated weights after it goes a bucket at a time on
    gloo (``zero/weight_gather.py``) and in place on NCCL: inside the config-sized buckets.
    ZeRO-0's optimizer steps the params' own gradients: nothing. The client AdamW is fused
    (``train/engine.make_optimizer``), so the step itself adds no temporary."""
    if zero_stage == 0:
        return 0
    elements = _ceil_div(trainable, num_gpus)
    if zero_stage == 3:
        elements = min(elements, SUB_GROUP_SIZE + _ceil_div(largest_param, num_gpus))
        return elements * (4 + (2 if precision == "bf16" else 0))
    norm = 8 * min(largest_param, elements)
    return max(norm, 4 * elements if precision == "bf16" else 0)


def projection_bytes(shape: Shape) -> int:
    """Bytes a rank holds for a moment in a projector update (GaLore: ``methods/galore.py``), on
    the device the engine trains on (host memory on CPU ranks), beyond the probe's activations:
    one wrapped linear's full gradient at a time. For a linear of m x n (k = min(m, n)): G in
    fp64 (8mn) while its owner forms the k x k Gram matrix (8k^2); then, G freed, the
    eigendecomposition: the Gram matrix, LAPACK's copy that becomes the eigenvectors, and syevd's
    workspace of 2k^2 doubles (32k^2 in all). The largest over the wrapped linears; every rank
    meets the owner's figure for some layer (owners are round-robin)."""
    return max(max(8 * m * n + 8 * min(m, n) ** 2, 32 * min(m, n) ** 2) for m, n in linear_shapes(shape).values())
