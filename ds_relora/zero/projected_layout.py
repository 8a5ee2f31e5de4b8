"""Where each projected matrix's elements sit in the flat fp32 partitions DeepSpeed hands its
client optimizer, on every ZeRO stage (DeepSpeed 0.19; read from its source):

* ZeRO-0 fp32: the optimizer steps the module's own parameters, whole on every rank (the
  gradients are all-reduced before ``step``): nothing to map, no collectives;
* ZeRO-1/2 (``stage_1_and_2.py``) and bf16 on ZeRO-0 (``bf16_optimizer.py``): group ``i``'s
  optimizer tensor is this rank's flat fp32 partition (``single_partition_of_fp32_groups[i]`` /
  ``fp32_groups_flat_partition[i]``); a parameter with elements in it carries ``_hp_mapping``
  (``utils/tensor_fragment.py``): ``lp_fragment_address.start`` is the first element's offset in
  the flattened parameter, ``hp_fragment_address`` the offset and count in the partition. ZeRO-1/2
  call ``step()`` once per group (``_optimizer_step`` narrows ``param_groups`` to it);
* ZeRO-3 (``stage3.py``): sub-group ``i``'s tensor ``fp32_partitioned_groups_flat[i]`` is the
  concatenation of its parameters' ``ds_tensor`` (``partition_numel()`` each, padded), and rank r
  holds elements ``[r P, r P + P)`` of each, clipped to ``ds_numel``; ``_optimizer_step`` puts one
  sub-group's tensor into its group's ``params`` and calls ``step()`` once per sub-group.

Each rank's element range of every matrix is exchanged once (``all_gather_object``), so every rank
knows which rows are cut between ranks (``projected_adam.split_rows``)."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist


@dataclasses.dataclass
class Matrix:
    """One projected matrix: its logical shape, its options, where its elements sit."""

    index: int                 # position among the projected matrices (same on every rank)
    param: torch.nn.Parameter  # the module's parameter (the layout is built from it)
    shape: tuple[int, int]
    group: dict                # its param group (lr, betas, eps, weight_decay, the projection keys)
    seed: int                  # first random-projector seed: its 1-based position in the groups
    unit: object = None        # which step() call steps it (ZeRO-1/2 group, ZeRO-3 sub-group)
    ranges: list = dataclasses.field(default_factory=list)  # [(a, b)] per rank, flattened elements
    split_rows: list = dataclasses.field(default_factory=list)  # rows cut between ranks

    @property
    def tall(self) -> bool:
        return self.shape[0] >= self.shape[1]


@dataclasses.dataclass
class Segment:
    """``numel`` elements at ``offset`` of a flat tensor: elements ``start..`` of ``param``."""

    offset: int
    numel: int
    start: int
    param: torch.nn.Parameter
    matrix: Matrix | None


def split_rows(ranges: list[tuple[int, int]], cols: int) -> list[int]:
    """Rows whose elements are held by more than one rank (a range boundary inside the row)."""
    rows = set()
    for a, b in ranges:
        for edge in (a, b):
            if b > a and edge % cols:
                rows.add(edge // cols)
    return sorted(rows)



def attach_layout(engine, optimizer) -> str:
    """Tell ``optimizer`` (the engine's client ``projected_adam.ProjectedAdamW``) its layout;
    returns the kind found."""
    wrapper = engine.optimizer
    if wrapper is optimizer or getattr(wrapper, "optimizer", None) is None:
        optimizer.attach(optimizer.layout, partitioned=False)
        return "whole"
    by_param = {id(m.param): m for m in optimizer.matrices}
    layout: dict = {}
    devices: dict = {}
    if hasattr(wrapper, "fp32_partitioned_groups_flat"):
        kind, rank = "zero3", dist.get_rank()
        for i, (params, flat) in enumerate(zip(wrapper.fp16_groups, wrapper.fp32_partitioned_groups_flat)):
            devices[(kind, i)] = flat.device
            if flat.numel() == 0 and any(p.partition_numel() for p in params):
                raise RuntimeError("projection methods cannot step ZeRO-3 sub-groups swapped to NVMe: "
                                   "turn off offload_optimizer.device=nvme")
            segs, offset = [], 0
            for p in params:
                size = p.partition_numel()
                start, end = rank * size, min(rank * size + size, p.ds_numel)
                matrix = by_param.get(id(p))
                if matrix is not None:
                    matrix.unit = (kind, i)
                if end > start:
                    segs.append(Segment(offset, end - start, start, p, matrix))
                offset += size
            layout[id(flat)] = ((kind, i), segs)
    else:
        kind = "zero12"
        lp_groups = getattr(wrapper, "bit16_groups", None) or getattr(wrapper, "bf16_groups", None)
        flats = getattr(wrapper, "single_partition_of_fp32_groups", None) or getattr(wrapper, "fp32_groups_flat_partition", None)
        if lp_groups is None or flats is None:
            raise RuntimeError(f"projection methods do not know DeepSpeed's {type(wrapper).__name__}: they run "
                               "on ZeRO 0-3 with fp32 or bf16 (fp16 loss scaling is not supported)")
        for i, (params, flat) in enumerate(zip(lp_groups, flats)):
            devices[(kind, i)] = flat.device
            segs = []
            for p in params:
                matrix = by_param.get(id(p))
                if matrix is not None:
                    matrix.unit = (kind, i)
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is not None:
                    hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
                    segs.append(Segment(hp.start, hp.numel, lp.start, p, matrix))
            layout[id(flat)] = ((kind, i), segs)
    mine = [(0, 0)] * len(optimizer.matrices)
    for _, segs in layout.values():
        for s in segs:
            if s.matrix is not None:
                mine[s.matrix.index] = (s.start, s.start + s.numel)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for m in optimizer.matrices:
        if m.unit is None:
            raise RuntimeError(f"projected matrix {m.index} {m.shape} is in none of DeepSpeed's parameter groups")
        m.ranges = [ranges[m.index] for ranges in everyone]
        m.split_rows = split_rows(m.ranges, m.shape[1]) if m.tall else []
    # With optimizer offload (ZeRO-1/2 ``cpu_offload``, ZeRO-3 ``offload_optimizer``) DeepSpeed steps
    # the client optimizer on host-memory partitions: the same layout, recorded so runs show which ran.
    offloaded = bool(getattr(wrapper, "cpu_offload", False) or getattr(wrapper, "offload_optimizer", False))
    optimizer.attach(layout, partitioned=True, comm_device=engine.device, kind=kind, devices=devices, offloaded=offloaded)
    return kind
