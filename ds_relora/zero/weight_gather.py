"""ZeRO-1/2's gather of the updated weights after each step, in buckets where gloo would stage a
copy of the whole model.

DeepSpeed 0.19's ZeRO-1/2 step (and its bf16 optimizer's) ends by gathering every rank's
updated partition into the flat weights (``runtime/utils.all_gather_dp_groups``). Where torch has
``all_gather_into_tensor`` that is one call per param group, for the whole group: NCCL writes
it in place, but gloo (CPU ranks) gathers into a new buffer of the output's size and then copies
it over, the model's weights once more for a moment (4 bytes per param in fp32: 2.5 GiB per
rank at two layers of the 7B shape; measured as the ZeRO-2 steps' peak). DeepSpeed's own
bucketed path (``allgather_bucket_size``) is taken only where ``all_gather_into_tensor`` is
missing altogether. On gloo :func:`gather_in_buckets` gathers the same elements into the same
places, at most ``allgather_bucket_size`` of them at a time; other backends keep DeepSpeed's call.
"""

from __future__ import annotations

import torch

# DeepSpeed's modules that import the gather by name (each call looks it up in its own module).
CALLERS = ("deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.bf16_optimizer")


def gather_weights_in_buckets_on_gloo() -> None:
    """Route DeepSpeed's ZeRO-1/2 weight gather through :func:`gather_in_buckets` when the group
    is gloo's. Once per process; harmless for engines that do not use it (ZeRO-0, ZeRO-3)."""
    import importlib  # noqa: PLC0415  (only engine builds reach here)

    for name in CALLERS:
        module = importlib.import_module(name)
        original = module.all_gather_dp_groups
        if getattr(original, "gathers_in_buckets_on_gloo", False):
            continue
        module.all_gather_dp_groups = _routed(original)


def _routed(original):
    def all_gather_dp_groups(groups_flat, partitioned_param_groups, dp_process_group, start_alignment_factor,
                             allgather_bucket_size):
        if not _on_gloo(dp_process_group):
            return original(groups_flat, partitioned_param_groups, dp_process_group, start_alignment_factor,
                            allgather_bucket_size)
        return gather_in_buckets(partitioned_param_groups, dp_process_group, start_alignment_factor,
                                 allgather_bucket_size)

    all_gather_dp_groups.gathers_in_buckets_on_gloo = True
    return all_gather_dp_groups


def _on_gloo(groups) -> bool:
    return all(torch.distributed.get_backend(g) == "gloo" for g in groups)


def gather_in_buckets(partitioned_param_groups, dp_process_group, start_alignment_factor: int,
                      allgather_bucket_size: int) -> None:
    """Fill every rank's partition of each flat group (``partitioned_param_groups[i][r]``, views
    of the flat weights, equal in size) from rank ``r``, ``allgather_bucket_size`` elements at a
    time over all ranks, each piece starting on ``start_alignment_factor``."""
    from deepspeed import comm as dist  # noqa: PLC0415  (DeepSpeed's wrapper: its comms logger sees the calls)

    for parts, group in zip(partitioned_param_groups, dp_process_group, strict=True):
        world = dist.get_world_size(group=group)
        if world == 1:
            continue
        rank = dist.get_rank(group=group)
        numel = parts[rank].numel()
        align = max(1, int(start_alignment_factor))
        piece = max(align, int(allgather_bucket_size) // world // align * align)
        for start in range(0, numel, piece):
            count = min(piece, numel - start)
            pieces = [p.narrow(0, start, count) for p in parts]
            dist.all_gather(pieces, pieces[rank], group=group)
