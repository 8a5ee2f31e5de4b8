"""Moving a run's whole-tensor state between an engine of any ZeRO stage and the checkpoint's
tensor sets, one parameter at a time, so that no rank ever holds the whole model.

* :func:`write_state` (a save): every parameter's fp32 value (the optimizer's master of a
  trainable one, the module tensor of a frozen one) and its Adam moments are gathered in turn
  for the rank that owns it (contiguous runs of about equal bytes, one per rank), which queues
  it for its own shard's background writer: a partitioned value (ZeRO-3, the projected
  optimizer's moments) is sent to the owner alone, piece by piece into the buffer it writes from
  (``zero/owner_gather.py``); a replicated one (ZeRO 0-2) is gathered by every rank and dropped
  by the others. The gathers interleave the owners, so every rank writes at the same time. Peak
  extra host memory per rank: a few parameters (:func:`save_budget`).
* :func:`load_weights` (warm start, elastic resume, continued pre-training): each parameter is
  read from the memory-mapped set and every rank writes only its own shard (module and master).
* :func:`write_local` / :func:`write_whole`: one param's new value, each rank its own part
  (module and master), as loads and the switch's snapshot (``checkpoint/snapshot.py``) write it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

from ds_relora.checkpoint.format import MOMENTS_SET, WEIGHTS
from ds_relora.disk import is_disk_error
from ds_relora.errors import CheckpointError
from ds_relora.methods import adapter_buffers
from ds_relora.row_blocks import reader, whole_names
from ds_relora.tensor_files import BackgroundWriter, StreamingWriter, nbytes, owners_by_bytes, shard_name, write_index
from ds_relora.zero import projected_state
from ds_relora.zero.owner_gather import gather_to_owner
from ds_relora.zero.state import (
    MOMENTS,
    _z3_local_slice,
    full_shape,
    get_master,
    get_moment,
    is_zero3_param,
    master_pieces,
    moment_pieces,
    projected,
    set_master,
    set_module_value,
    set_moment,
)


def _owner_value(engine, pieces: list, shape: tuple[int, ...], owner: int, background) -> torch.Tensor | None:
    """The whole fp32 value of a partitioned tensor on ``owner`` (None elsewhere), from every
    rank's ``pieces``: only the owner holds it, so only it reserves the bytes (collective)."""
    if dist.get_rank() == owner:
        background.reserve(nbytes(shape, torch.float32))
    whole = gather_to_owner(pieces, math.prod(shape), torch.float32, owner, engine.device)
    return None if whole is None else whole.view(shape)


def _full_value(engine, p, wanted: bool, background, size: int) -> torch.Tensor | None:
    """``p``'s whole fp32 value on the ranks that want it, where ZeRO keeps no partition of it
    (replicated: ZeRO 0-2, ZeRO-3's persistent params); collective where ZeRO needs it. Every
    rank may hold it for a moment: each reserves its ``size`` bytes."""
    import deepspeed  # noqa: PLC0415  (deepspeed takes seconds to import and patches torch; only code that builds an engine needs it)

    background.reserve(size)
    if p.requires_grad:
        if wanted or is_zero3_param(p) or hasattr(p, "_hp_mapping"):
            value = get_master(engine, p)
            return value if wanted else None
        return None
    with deepspeed.zero.GatheredParameters([p], modifier_rank=None, enabled=is_zero3_param(p)):
        return p.data.detach().float().reshape(full_shape(p)).clone() if wanted else None


def _buffer_value(buf: torch.Tensor) -> torch.Tensor:
    return (buf.float() if buf.is_floating_point() else buf).detach()


def _visit_order(sizes: list[int], owners: list[int], world: int) -> list[int]:
    """The order every rank gathers the tensors in: each owner's own ones in their file order,
    interleaved so that the next tensor is always one of the owner with the fewest bytes so far.
    Every rank then has its next write queued while the others gather theirs, and all ranks
    write at once (the owners' runs are contiguous, so file order alone would let them write in
    turn)."""
    queues = [[i for i, o in enumerate(owners) if o == r] for r in range(world)]
    done, order = [0] * world, []
    while any(queues):
        r = min((r for r in range(world) if queues[r]), key=lambda r: (done[r], r))
        i = queues[r].pop(0)
        done[r] += sizes[i]
        order.append(i)
    return order


def _moment_entries(opt, name: str, p) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The moments set's entries of trainable ``p``: AdamW's two moments, or, for a matrix the
    projected optimizer (APOLLO, Fira) steps, its R-shaped state instead (it has no others)."""
    if projected_state.is_projected(opt, p):
        return projected_state.entries(opt, p, name)
    return [(f"{name}.{k}", torch.float32, full_shape(p)) for k in MOMENTS]


def _units(module, params: list, param_moments: list) -> tuple[list[list[int]], list, list]:
    """The sets' tensors: ``[param indices]`` of each (one param, or a row-blocked weight's
    blocks in row order), its weights entry and its moments entries, named as HF names them."""
    blocks = whole_names(module)
    units, weights, moments = [], [], []
    for i, (name, p) in enumerate(params):
        if name not in blocks:
            units.append([i])
            weights.append((name, torch.float32, full_shape(p)))
            moments.append(param_moments[i])
            continue
        whole, start, _, rows = blocks[name]
        if start:  # a later block of the unit before it
            units[-1].append(i)
            continue
        if [n.rsplit(".", 1)[1] for n, _, _ in param_moments[i]] not in ([], list(MOMENTS)):
            raise CheckpointError(f"{name} is a row block (model.split_vocab) that a projection optimizer steps: "
                                  "its state has no whole form; leave the head out of the method's target_modules")
        shape = (rows, *full_shape(p)[1:])
        units.append([i])
        weights.append((whole, torch.float32, shape))
        moments.append([(f"{whole}.{n.rsplit('.', 1)[1]}", d, shape) for n, d, _ in param_moments[i]])
    return units, weights, moments


@torch.no_grad()
def save_budget(weight_entries: list, moment_entries: list) -> int:
    """Bytes of tensors a rank may hold at once while saving (gathered, queued, being written):
    one layer's fp32 weights (the largest of a decoder layer's params together and any single
    tensor, the embedding), so the save's transient stays within one layer while small tensors
    still overlap their gathers with the writes before them."""
    layers: dict[str, int] = {}
    largest = 0
    for (name, dtype, shape), moments in zip(weight_entries, moment_entries):
        size = nbytes(shape, dtype)
        largest = max([largest, size] + [nbytes(s, d) for _, d, s in moments])
        head, _, rest = name.partition(".layers.")
        if rest:
            key = head + ".layers." + rest.split(".", 1)[0]
            layers[key] = layers.get(key, 0) + size
    return max([largest] + list(layers.values()))


def write_state(engine, folder: Path, *, with_moments: bool, digests: dict | None = None,
                errors: list | None = None, depth: int = 1) -> dict[str, list[str]]:
    """Collective: write the weights set (and the moments set) into ``folder``; returns the
    shard files this rank wrote. Rank 0 writes the two index files. Each shard's size and hash
    go into ``digests``. With ``errors`` given, a disk error (no space, read-only) is appended
    there and this rank stops writing but keeps taking part in the gathers: a rank that left
    them would hang the others; the caller agrees on the errors afterwards.

    Each rank writes its own shards from a background thread (:class:`BackgroundWriter`, a queue
    of ``depth`` tensors) while the gathers go on in :func:`_visit_order`, so every rank's disk is
    busy at once. Peak extra host memory per rank: what is queued, being written and being
    gathered, bounded by :func:`save_budget` (one layer's fp32 weights: each gather waits until
    it fits), the figure ``estimate-memory`` plans for the save."""

    rank, world = dist.get_rank(), dist.get_world_size()
    params = list(engine.module.named_parameters())
    if any(is_zero3_param(p) for _, p in params):
        # ZeRO-3 may still hold params gathered for the next step, or being gathered (a prefetch in
        # flight, which GatheredParameters cannot re-partition: seen after GaLore's probe at the 1.3B
        # shape). Released first, they are neither in the way nor held through the save.
        engine.empty_partition_cache()
    buffers = list(adapter_buffers(engine.module).items())
    opt = projected(engine)
    param_moments = [_moment_entries(opt, n, p) if with_moments and p.requires_grad else [] for n, p in params]
    budget = save_budget([(n, torch.float32, full_shape(p)) for n, p in params], param_moments)
    # A tensor of the sets is one param, or the row blocks of one (``row_blocks``: written whole,
    # under its own name, one block at a time).
    units, weight_entries, moment_entries = _units(engine.module, params, param_moments)
    weight_entries += [(n, _buffer_value(b).dtype, tuple(b.shape)) for n, b in buffers]
    moment_entries += [[] for _ in buffers]
    sizes = [nbytes(shape, dtype) + sum(nbytes(s, d) for _, d, s in moments)
             for (_, dtype, shape), moments in zip(weight_entries, moment_entries)]
    owners = owners_by_bytes(sizes, world)
    shard_of = {owner: i for i, owner in enumerate(sorted(set(owners)))}
    count = len(shard_of)
    mine = [i for i, o in enumerate(owners) if o == rank]

    def disk_error(exc: BaseException, path) -> bool:
        """Record a disk error (the caller agrees on it); False for anything else (raised)."""
        if errors is None or not isinstance(exc, OSError) or not is_disk_error(exc):
            return False
        exc.filename = exc.filename or str(path)  # a failed write() names no file
        errors.append(exc)
        return True

    writers: dict[str, StreamingWriter] = {}
    written = {WEIGHTS: [], MOMENTS_SET: []}
    opened = True
    try:
        if mine:
            name = shard_name(WEIGHTS, shard_of[rank], count)
            writers[WEIGHTS] = StreamingWriter(folder / name, [weight_entries[i] for i in mine], {"format": "pt"}, digests)
            written[WEIGHTS].append(name)
            own_moments = [e for i in mine for e in moment_entries[i]]
            if own_moments:
                name = shard_name(MOMENTS_SET, shard_of[rank], count)
                writers[MOMENTS_SET] = StreamingWriter(folder / name, own_moments, {"format": "pt"}, digests)
                written[MOMENTS_SET].append(name)
    except OSError as exc:
        for w in writers.values():
            w.abort()
        if not disk_error(exc, folder):
            raise
        writers, opened = {}, False
    background = BackgroundWriter(writers, depth, max_bytes=budget)

    def put(key: str, name: str, value: torch.Tensor) -> None:
        if opened:
            background.put(key, name, value.detach().to("cpu"))  # a GPU value leaves the device here

    try:
        for i in _visit_order(sizes, owners, world):
            keep = owners[i] == rank
            if i >= len(units):  # an adapter buffer: every rank holds it whole, its owner writes it
                if keep:
                    put(WEIGHTS, weight_entries[i][0], _buffer_value(buffers[i - len(units)][1]))
                continue
            members = [params[j][1] for j in units[i]]
            for p in members:
                pieces = master_pieces(p)
                value = (_owner_value(engine, pieces, full_shape(p), owners[i], background) if pieces is not None
                         else _full_value(engine, p, keep, background, nbytes(full_shape(p), torch.float32)))
                if keep:
                    put(WEIGHTS, weight_entries[i][0], value)
                del value
            for key_name, dtype, shape in moment_entries[i]:
                key = key_name.rsplit(".", 1)[1]
                for p in members:
                    part = shape if len(members) == 1 else full_shape(p)
                    pieces = moment_pieces(engine, p, key)
                    if pieces is not None:
                        moment = _owner_value(engine, pieces, part, owners[i], background)
                    else:
                        background.reserve(nbytes(part, dtype))  # every rank holds the gathered value for a moment
                        moment = get_moment(engine, p, key)
                    if keep:
                        put(MOMENTS_SET, key_name, moment if moment is not None else torch.zeros(full_shape(p)))
                    del moment
    except BaseException:
        background.finish(abort=True)
        raise
    error = background.finish()
    if error is not None:
        if not disk_error(error, folder):
            raise error
        return written
    if not opened:
        return written
    if rank == 0:
        try:
            for prefix, entries in ((WEIGHTS, [[e] for e in weight_entries]), (MOMENTS_SET, moment_entries)):
                weight_map = {n: shard_name(prefix, shard_of[owners[i]], count) for i, group in enumerate(entries) for n, _, _ in group}
                if weight_map:
                    total = sum(nbytes(s, d) for group in entries for _, d, s in group)
                    write_index(folder, prefix, weight_map, total)
        except OSError as exc:
            if not disk_error(exc, folder):
                raise
    return written


def restore_projected(engine, moments) -> bool:
    """Load the projected optimizer's state (``zero/projected_state.py``) from a checkpoint's
    moments set, each rank its part (collective); False when the engine has none."""
    opt = projected(engine)
    if opt is None:
        return False
    names = {id(p): n for n, p in engine.module.named_parameters()}
    projected_state.load(opt, lambda name: moments[name], names)
    for name, p in engine.module.named_parameters():
        if p.requires_grad and not projected_state.is_projected(opt, p):
            for key in MOMENTS:
                set_moment(engine, p, key, moments[f"{name}.{key}"])
    return True


def partitioned(p) -> bool:
    """A ZeRO-3 param that is not held whole (not persistent)."""
    return is_zero3_param(p) and p.data.numel() != p.ds_numel


def write_local(p, local: torch.Tensor, with_master: bool) -> None:
    """Write this rank's flat fp32 shard of a partitioned ZeRO-3 param (module and master)."""
    from deepspeed.utils import safe_set_local_fp32_param  # noqa: PLC0415  (deepspeed takes seconds to import and patches torch; only code that builds an engine needs it)

    part = p.ds_tensor
    part.data.copy_(local.to(part.device, part.dtype))
    if with_master:
        safe_set_local_fp32_param(p, local.to(part.device))


def write_whole(engine, p, value: torch.Tensor, with_master: bool) -> None:
    """Write a param's whole fp32 value (each rank its own part of it) and its master."""
    if engine is not None:
        value = value.to(engine.device)
    set_module_value(p, value)
    if with_master:
        set_master(engine, p, value)


def _read_local(tensors, name: str, p) -> torch.Tensor:
    """This rank's padded flat shard ``[r*S, (r+1)*S)`` of a saved tensor, reading only its bytes
    from a TensorSet (a dict holds the whole value already)."""
    if not hasattr(tensors, "get_flat"):
        return _z3_local_slice(p, tensors[name])
    size = p.ds_tensor.numel()
    start = dist.get_rank(group=p.ds_process_group) * size
    local = torch.zeros(size, dtype=torch.float32)
    chunk = tensors.get_flat(name, start, start + size)
    local[: chunk.numel()] = chunk.float()
    return local


@torch.no_grad()
def load_weights(module, tensors, *, source: str, engine=None, skip: set[str] = frozenset()) -> None:
    """Write every parameter of ``module`` from ``tensors`` (a TensorSet or a dict of whole
    values): each rank its own shard (under ZeRO-3 reading only that shard's bytes); with
    ``engine`` (whose module it is) the trainable params' fp32 masters too. Params named in
    ``skip`` (new adapters) keep their values. A missing or misshapen parameter is one line
    naming ``source``. A row-blocked weight (``row_blocks``) reads its rows of the whole tensor."""
    tensors = reader(tensors, module)
    for name, p in module.named_parameters():
        if name in skip:
            continue
        if name not in tensors:
            raise CheckpointError(f"{source} has no {name}: it holds another model or method; use a checkpoint "
                                  "of the same model shape")
        shape = tensors.shape(name) if hasattr(tensors, "shape") else tuple(tensors[name].shape)
        if tuple(shape) != full_shape(p):
            raise CheckpointError(f"{source}: {name} has shape {tuple(shape)}, this model's is {full_shape(p)}: "
                                  "use a checkpoint of the same model shape")
        with_master = engine is not None and p.requires_grad
        if partitioned(p):
            write_local(p, _read_local(tensors, name, p), with_master)
            continue
        write_whole(engine, p, tensors[name].float(), with_master)
