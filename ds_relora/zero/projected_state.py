"""The projected optimizer's state as whole tensors, for the checkpoint's moments set, and back.

A checkpoint must not depend on the ZeRO stage or world size that wrote it (elastic resume), so
every piece is saved whole, by name, and each rank takes its part back on load:

* ``<param>.exp_avg`` / ``.exp_avg_sq`` of every non-projected trainable parameter: the names
  AdamW's moments have (``checkpoint/state_io.py`` asks ``zero/state.get_moment``, which comes
  here for this optimizer); a projected matrix has none, and none are written for it
  (:func:`is_projected`): its state is R-shaped, below;
* per projected matrix ``<param>.proj_exp_avg`` / ``.proj_exp_avg_sq`` (R's moments, m x r or
  r x n), ``<param>.proj_projector`` (r x n or m x r), ``<param>.proj_counters`` (int64: updates
  done, the next random-projector seed) and ``<param>.proj_limiter`` (the limiter's previous
  norm, NaN before the first step).

Gathers are sums over ranks of zero-padded buffers in which each element (each R row) is filled
by exactly one rank, so the sum is exact. Every call is collective where the layout is
partitioned: all ranks ask for the same names in the same order."""

from __future__ import annotations

import torch
import torch.distributed as dist

SUFFIXES = ("proj_exp_avg", "proj_exp_avg_sq", "proj_projector", "proj_counters", "proj_limiter")
_MOMENT_KEYS = {"exp_avg": "proj_exp_avg", "exp_avg_sq": "proj_exp_avg_sq"}


def _sum(opt, t: torch.Tensor) -> torch.Tensor:
    if opt.partitioned:
        buf = t.to(opt.comm_device)
        dist.all_reduce(buf)
        return buf.cpu()
    return t.cpu()


def _plain_slots(opt, p):
    """[(state key, local segment, offset of the segment in the unit's concatenated plain run)]."""
    out = []
    for unit, segs in opt.layout.values():
        at = 0
        for s in segs:
            if s.matrix is None:
                if s.param is p:
                    out.append((unit, s, at))
                at += s.numel
    return out


def plain_moment(opt, p, key: str, numel: int) -> torch.Tensor | None:
    """Whole moment ``key`` of non-projected ``p`` (flattened); None for a projected matrix or
    before the first step (the same answer on every rank)."""
    if any(m.param is p for m in opt.matrices) or not opt.plain_state:
        return None
    whole = torch.zeros(numel, dtype=torch.float32)
    for unit, s, at in _plain_slots(opt, p):
        st = opt.plain_state.get(unit)
        if st is not None and key in st:
            whole[s.start: s.start + s.numel] = st[key].reshape(-1)[at: at + s.numel].float().cpu()
    return _sum(opt, whole)


def plain_moment_pieces(opt, p, key: str) -> list[tuple[int, torch.Tensor]] | None:
    """This rank's pieces of :func:`plain_moment` (``[(start, flat values)]``, views; none for a
    projected matrix or before the first step) where the layout is partitioned, else None."""
    if not opt.partitioned:
        return None
    if any(m.param is p for m in opt.matrices) or not opt.plain_state:
        return []
    out = []
    for unit, s, at in _plain_slots(opt, p):
        st = opt.plain_state.get(unit)
        if st is not None and key in st:
            out.append((s.start, st[key].reshape(-1)[at: at + s.numel]))
    return out


def set_plain_moment(opt, p, key: str, value: torch.Tensor, step: int) -> None:
    """Each rank writes its elements of ``p``'s whole moment ``value`` into its plain state."""
    if any(m.param is p for m in opt.matrices):
        return
    flat = value.reshape(-1)
    for unit, s, at in _plain_slots(opt, p):
        segs = next(segs for u, segs in opt.layout.values() if u == unit)
        total = sum(x.numel for x in segs if x.matrix is None)
        st = opt.plain_state.setdefault(unit, {"step": step})
        st["step"] = step
        for k in ("exp_avg", "exp_avg_sq"):
            if k not in st:
                st[k] = torch.zeros(total, dtype=torch.float32, device=opt.unit_devices[unit])
        st[key].reshape(-1)[at: at + s.numel].copy_(flat[s.start: s.start + s.numel])


def is_projected(opt, p) -> bool:
    """Whether ``p`` is one of ``opt``'s projected matrices (no param-shaped Adam moments)."""
    return opt is not None and any(m.param is p for m in opt.matrices)


def entries(opt, p, name: str) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of the extra tensors of ``p`` (none unless it is projected)."""
    out = []
    for m in (m for m in opt.matrices if m.param is p):
        rank, (rows, cols) = m.group["proj_rank"], m.shape
        r_shape = (rows, rank) if m.tall else (rank, cols)
        p_shape = (rank, cols) if m.tall else (rows, rank)
        out += [(f"{name}.proj_exp_avg", torch.float32, r_shape), (f"{name}.proj_exp_avg_sq", torch.float32, r_shape),
                (f"{name}.proj_projector", torch.float32, p_shape), (f"{name}.proj_counters", torch.int64, (2,)),
                (f"{name}.proj_limiter", torch.float32, (1,))]
    return out


def value(opt, p, suffix: str) -> torch.Tensor:
    """The whole tensor ``suffix`` of projected ``p`` (collective where partitioned)."""
    m = next(m for m in opt.matrices if m.param is p)
    shape = next(s for n, _, s in entries(opt, p, "") if n.endswith("." + suffix))
    st = opt.proj_state.get(m.index, {})
    if suffix == "proj_counters":
        return torch.tensor([st.get("step", 0), st.get("seed", m.seed)], dtype=torch.int64)
    if suffix == "proj_limiter":
        norm = st.get("limiter_norm")
        return torch.tensor([float("nan") if norm is None else float(norm)], dtype=torch.float32)
    if suffix == "proj_projector":
        return st["proj"].float().cpu().reshape(shape) if "proj" in st else torch.zeros(shape)
    key = {"proj_exp_avg": "exp_avg", "proj_exp_avg_sq": "exp_avg_sq"}[suffix]
    if key not in st:
        return torch.zeros(shape)
    if not m.tall or not opt.partitioned:
        return st[key].float().cpu().reshape(shape)
    whole = torch.zeros(shape)
    row0, rows = st["rows"]
    cols = m.shape[1]
    a, b = m.ranges[dist.get_rank()]
    for i in range(rows):  # only rows whose first element this rank holds: each row once
        if a <= (row0 + i) * cols < b:
            whole[row0 + i] = st[key][i].float().cpu()
    return _sum(opt, whole)


def load(opt, get, names: dict[int, str]) -> int:
    """Take back every matrix's state from ``get(name)`` (whole tensors), each rank its rows;
    returns the update count (the plain elements' Adam step)."""
    for m in opt.matrices:
        name = names[id(m.param)]
        counters = get(f"{name}.proj_counters")
        st = opt.proj_state.setdefault(m.index, {})
        st["step"], st["seed"] = int(counters[0]), int(counters[1])
        limiter = float(get(f"{name}.proj_limiter")[0])
        if limiter == limiter:  # not NaN
            st["limiter_norm"] = torch.tensor(limiter, dtype=torch.float32)
        device = opt.unit_devices[m.unit]
        if st["step"] > 0:
            st["proj"] = get(f"{name}.proj_projector").float().to(device)
        cols = m.shape[1]
        a, b = m.ranges[dist.get_rank()] if opt.partitioned else (0, m.shape[0] * cols)
        row0 = a // cols
        row1 = (b - 1) // cols + 1 if b > a else row0
        for key in ("exp_avg", "exp_avg_sq"):
            whole = get(f"{name}.{_MOMENT_KEYS[key]}").float()
            st[key] = (whole[row0:row1] if m.tall else whole).clone().to(device)
        st["rows"] = (row0, row1 - row0)
    return opt.update_count()
