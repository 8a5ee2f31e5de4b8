"""ZeRO-1/2 gradients kept in partition order, so that DeepSpeed's step uses them where they lie.

DeepSpeed 0.19's ZeRO-1/2 optimizer (``stage_1_and_2.py``, contiguous gradients, no offload)
copies each reduced gradient of this rank's partition into one buffer in the order backward
produces them, which is roughly the reverse of the partition's. Its ``step`` therefore
concatenates them into a new tensor of the whole partition (``self.flatten``) before the
optimizer runs: 4 bytes per trainable param / N for a moment, 1.2 GiB per rank at two layers of
the 7B shape on 2 ranks, more than a decoder layer's fp32 weights. Its step skips that copy when
the gradient group carries ``flat_partition``, one view of the whole partition
(``_get_preflattened_grad_partition``: DeepSpeed's own compact mode, bf16 with fp32 gradient
accumulation, and DeepCompile build one).

``write_grads_in_partition_order`` gives the plain mode the same: each parameter's gradient is
copied to its own offset in its group's buffer, in partition order (the whole parameter, as
DeepSpeed does, so a boundary parameter's foreign part lies before or after the partition),
with zeros after a group's last parameter where the partition is padded. The group handed to
``step`` is then those same elements as one view. Each group has a buffer of its own, let go at
the end of the backward as DeepSpeed lets go of its one, so the step frees each group's
gradients once it has stepped that group. The sums are DeepSpeed's: only where the reduced
values are copied to changes. Wherever a group's gradients are not exactly that layout (a
parameter that got no gradient is a fresh zeros tensor of DeepSpeed's), DeepSpeed's own list is
used and the step flattens as before."""

from __future__ import annotations

import torch

# Buffers this rank allocated, by address: data_ptr -> bytes, for the last two backward passes
# (with gradient accumulation DeepSpeed keeps the first micro-step's gradients while the next
# fill new buffers).
KEPT_PASSES = 2


def write_grads_in_partition_order(optimizer) -> bool:
    """Install the partition-order layout on a DeepSpeed ZeRO-1/2 optimizer; False (nothing
    changed) where DeepSpeed does not flatten plain contiguous gradients: optimizer offload,
    its compact bf16/fp32 mode, round-robin padded groups, Muon, or another optimizer.

    Each param group gets a buffer of its own (DeepSpeed's is one for all groups): the step
    frees a group's gradients after stepping it, and with one shared buffer the groups stepped
    first would stay alive until the last one is done."""
    if not _eligible(optimizer):
        return False
    offsets, pads, sizes = _layout(optimizer)
    original_flat_partition = optimizer.get_flat_partition
    ours: dict[int, int] = {}
    buffers: dict[int, torch.Tensor] = {}

    def buffer_for(group_idx: int, device) -> torch.Tensor:
        if optimizer.grads_in_partition is None:  # a new backward (DeepSpeed drops it at each epilogue)
            buffers.clear()
        if group_idx not in buffers:
            buffer = torch.empty(sizes[group_idx], dtype=optimizer.dtype, device=device)
            for start, count in pads[group_idx]:
                buffer.narrow(0, start, count).zero_()
            while len(ours) >= KEPT_PASSES * len(sizes):
                ours.pop(next(iter(ours)))
            ours[buffer.data_ptr()] = buffer.untyped_storage().nbytes()
            buffers[group_idx] = buffer
            optimizer.grads_in_partition = buffer  # only its None-ness is read elsewhere
        return buffers[group_idx]

    def copy_grads_in_partition(param, group_idx=None):
        group_idx = optimizer._get_param_group_idx(param) if group_idx is None else group_idx
        grad = optimizer.get_gradient_for_reduction(param)
        dest = buffer_for(group_idx, grad.device).narrow(0, offsets[optimizer.get_param_id(param)], param.numel())
        dest.copy_(grad.view(-1))
        grad.data = dest.data.view_as(grad)

    def get_flat_partition(tensor_list, first_offset, partition_size, dtype, device, param_group_idx,
                           return_tensor_list=False):
        pieces = original_flat_partition(tensor_list, first_offset, partition_size, dtype, device, param_group_idx,
                                         return_tensor_list)
        if not return_tensor_list:
            return pieces
        flat = _partition_view(optimizer.all_grad_tensors[param_group_idx], int(first_offset), int(partition_size), ours)
        return pieces if flat is None else _views_of(flat, pieces, len(tensor_list))

    original_release = optimizer._release_ipg_buffers

    def release_ipg_buffers():
        # The end of a backward, where DeepSpeed drops its own buffer: from here only the
        # gradients' views keep each group's buffer, so the step frees it with them.
        original_release()
        buffers.clear()

    optimizer.copy_grads_in_partition = copy_grads_in_partition
    optimizer.get_flat_partition = get_flat_partition
    optimizer._release_ipg_buffers = release_ipg_buffers
    return True


def _eligible(optimizer) -> bool:
    needed = ("copy_grads_in_partition", "get_flat_partition", "_release_ipg_buffers", "params_in_partition", "first_offset",
              "partition_size", "all_grad_tensors", "grads_in_partition", "round_robin_bit16_padding")
    if type(optimizer).__name__ != "DeepSpeedZeroOptimizer" or not all(hasattr(optimizer, n) for n in needed):
        return False
    if optimizer.cpu_offload or not optimizer.contiguous_gradients:
        return False
    for i, params in enumerate(optimizer.params_in_partition):
        if optimizer._use_compact_grad_partition_buffer(i) or any(optimizer.round_robin_bit16_padding[i]):
            return False
        if params and optimizer._is_muon_group(params):
            return False
    return True


def _layout(optimizer) -> tuple[dict[int, int], list[list[tuple[int, int]]], list[int]]:
    """Each param's offset in its group's buffer (by DeepSpeed's param id), in partition order;
    per group, where zeros stand in for a padded partition's tail, and the buffer's size."""
    offsets, pads, sizes = {}, [], []
    for i, params in enumerate(optimizer.params_in_partition):
        end = 0
        for p in params:
            offsets[optimizer.get_param_id(p)] = end
            end += p.numel()
        short = int(optimizer.first_offset[i]) + int(optimizer.partition_size[i]) - end
        pads.append([(end, short)] if params and short > 0 else [])
        sizes.append(end + max(short, 0) if params else 0)
    return offsets, pads, sizes


def _partition_view(grads, first_offset: int, partition_size: int, ours: dict[int, int]):
    """The partition as one view when ``grads`` lie back to back in one storage, in order, and
    any padding after them is one of our buffers' zeros; else None."""
    if not grads:
        return None
    first = grads[0]
    storage = first.untyped_storage()
    position = first.storage_offset()
    for g in grads:
        if not g.is_contiguous() or g.untyped_storage().data_ptr() != storage.data_ptr() \
                or g.storage_offset() != position or g.dtype != first.dtype:
            return None
        position += g.numel()
    start = first.storage_offset() + first_offset
    end = start + partition_size
    if end * first.element_size() > storage.nbytes():
        return None
    if end > position and ours.get(storage.data_ptr()) != storage.nbytes():
        return None  # the tail would be someone else's memory, not our zeros
    return first.as_strided((partition_size,), (1,), start)


def _views_of(flat, pieces, n_params):
    """DeepSpeed's list of pieces (one per param, then the padding) as views of ``flat``, checked
    to be the very elements DeepSpeed listed; DeepSpeed's own list if any piece is not."""
    from deepspeed.runtime.zero.stage_1_and_2 import GradPartitionBufferGroup  # noqa: PLC0415  (deepspeed takes seconds to import; only a built engine reaches here)

    views, position = [], 0
    for k, piece in enumerate(pieces):
        view = flat.narrow(0, position, piece.numel()).view(piece.shape)
        if k < n_params and (piece.data_ptr() != view.data_ptr() or piece.dtype != view.dtype):
            return pieces
        if k >= n_params:
            view._zero_padding = True
        views.append(view)
        position += piece.numel()
    if position != flat.numel():
        return pieces
    return GradPartitionBufferGroup(views, flat)
