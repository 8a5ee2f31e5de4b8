"""Where ZeRO-3 keeps ReLoRA's frozen base weights: ``partition`` (DeepSpeed's default) or
``replicate``.

ZeRO-3 partitions every parameter, frozen or not, and all-gathers it for the forward and again
for the backward of its module: for ReLoRA that traffic is the *whole* model every micro-step,
exactly as for full-rank training, although W only changes at a merge. ``replicate`` marks every
frozen parameter persistent (``ds_persist``, DeepSpeed's own mechanism for small params): it is
gathered once and then stays whole on every rank through forward and backward, and its shard
(``ds_tensor``) stays the checkpointed copy. DeepSpeed's ``step()`` partitions all parameters and
re-gathers the persistent ones (one coalesced all-gather per optimizer step instead of two or more
gathers per micro-step).

Memory: each rank then holds the whole frozen W (e bytes per frozen param) plus its shard, as on
ZeRO-2, while the trainable states stay partitioned; ``ds-relora estimate-memory`` says when it
fits. The merge (``merge._add_delta_to_base``) already updates both copies of a persistent W (the
shard rows of this rank and the gathered ``param.data``), so no copy keeps the old W.
"""

from __future__ import annotations

import torch

FROZEN_BASE_MODES = ("partition", "replicate")


def frozen_zero3_params(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The module's frozen ZeRO-3 parameters in a fixed order (the same on every rank)."""
    return [p for _, p in module.named_parameters() if hasattr(p, "ds_id") and not p.requires_grad]


def apply_zero3_frozen_base(engine, mode: str) -> int:
    """Apply ``mode`` to a freshly built ZeRO-3 engine (before its first forward); returns the
    number of parameters made persistent. Collective on ``replicate``: call on every rank."""
    if mode not in FROZEN_BASE_MODES:
        raise ValueError(f"zero3 frozen base mode {mode!r}: use one of {FROZEN_BASE_MODES}")
    if mode == "partition":
        return 0
    persistent = getattr(engine.optimizer, "persistent_parameters", None)
    if persistent is None:
        raise RuntimeError("replicate needs a ZeRO-3 engine (its optimizer has no persistent_parameters)")
    params = [p for p in frozen_zero3_params(engine.module) if not p.ds_persist]
    if not params:
        return 0
    for p in params:
        p.ds_persist = True
    # The same list object is held by the parameter coordinator's owner (parameter_offload) and
    # by the optimizer, whose _post_step re-gathers it after every step's partition_all.
    persistent.extend(params)
    params[0].all_gather(params)
    return len(params)
