"""One optimizer for the projection methods (APOLLO, APOLLO-Mini, Fira), exact on every ZeRO stage.

These methods keep W trainable and change the optimizer: Adam runs on a rank-r projection R of
each target matrix's gradient G (m x n), and W moves by G scaled by the ratio of Adam's
direction to R (per row, per column or per tensor), optionally plus the projected Adam
direction itself (the residual form). What the reference packages do, and what this class
reproduces on one process to float rounding (``tests/test_projected_adam.py`` holds it to them
within 1e-6; the plain form folds scale, limiter and step into one fused pass over W, so it
does not round exactly as they do):

* ``std`` sides: ``R = G P^T`` with P (r x n) when m >= n ("tall"), ``R = P^T G`` with P
  (m x r) otherwise ("wide"); P changes every ``update_proj_gap`` updates (counted from 0) and
  the moments of R are kept across changes;
* HF's old AdamW everywhere: ``denom = sqrt(v) + eps`` (eps inside), step size
  ``lr * sqrt(1 - b2^t) / (1 - b1^t)``, decoupled decay ``p -= lr * wd * p`` *after* the update;
* channel scaling ``s = ||N||_d / (||R||_d + 1e-8)`` with N = m / denom and d the rows (tall) or
  the columns (wide); tensor scaling uses the whole norms;
* plain form: ``u = G * s``; residual form: ``u = a P N + (G - a P R) * s`` (a: ``proj_scale``);
* the norm-growth limiter on ``G * s`` (plain) or the residual term: ``l = max(||t|| / (prev +
  1e-8), 1.01) / 1.01``, ``t /= l``, ``prev = ||t||``; the first step only records ``prev``;
* plain form only: ``u *= sqrt(scale)`` after the limiter.

Under ZeRO it is DeepSpeed's client optimizer and sees flat fp32 partitions; :meth:`attach`
(``projected_layout.py``) tells it where each matrix's element range sits on every rank. A rank
works on the rows its range touches (a row cut by a partition edge is computed partially by the
ranks sharing it). Per call: one all-reduce, batched over the call's matrices, of the cut rows'
partial ``G P^T`` (tall) and the whole partial ``P^T G`` (wide, r x n), and one of 4 partial
squared norms per matrix; every rank runs them in the same order (zeros where it holds
nothing). An SVD projector reduces G to an owner rank (round robin; fp64 Gram eigenvectors, canonical signs)
and broadcasts it; the random one is drawn from the seed chain on every rank, no communication.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ds_relora.errors import ConfigError
from ds_relora.zero.adam_kernels import adam_direction, adam_step_runs, channel_norms
from ds_relora.zero.owner_reduce import owner_of, reduce_apply_broadcast
from ds_relora.zero.projected_layout import Matrix, Segment
from ds_relora.zero.projection import gram, next_seed, projector, projector_from_gram, random_projector
from ds_relora.zero.state import full_shape

# Group keys a projection method puts on its param group (see ``methods/apollo.py``, ``fira.py``).
PROJECTION_KEYS = ("proj_rank", "proj_kind", "scale_type", "update_proj_gap", "proj_scale", "residual", "limiter")
LIMIT_GROWTH = 1.01  # the norm-growth limiter's bound on ||t_k|| / ||t_k-1||
NORM_EPS = 1e-8      # the references' eps in the scaling ratio and the limiter


class ProjectedAdamW(torch.optim.Optimizer):
    """HF-style AdamW for every group; groups with ``proj_rank`` are projected (see module doc)."""

    def __init__(self, groups, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0):
        super().__init__(groups, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.matrices: list[Matrix] = []
        position = 0
        for group in self.param_groups:
            for p in group["params"]:
                position += 1
                if "proj_rank" not in group:
                    continue
                shape = full_shape(p)
                if len(shape) != 2:
                    raise ConfigError(f"a projected parameter has shape {tuple(shape)}: projection methods project "
                                      "2-D weights only; restrict relora.target_modules to linear layers")
                self.matrices.append(Matrix(len(self.matrices), p, (int(shape[0]), int(shape[1])), group, position))
        self.proj_state: dict[int, dict] = {}   # per matrix: step, seed, proj, exp_avg, exp_avg_sq, limiter_norm
        self.plain_state: dict[object, dict] = {}  # per flat tensor's plain elements: step, exp_avg, exp_avg_sq
        self.projections = 0   # matrices projected so far (a test counts them per step)
        self.comm_device = None
        self.partitioned = False
        self.layout_kind = "whole"
        self.offloaded = False   # DeepSpeed's optimizer offload: the partitions it steps are in host memory
        self.unit_devices: dict = {}  # where each unit's flat tensor (and so its state) lives
        self.layout: dict[int, tuple[object, list[Segment]]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                self._whole(p)

    def _whole(self, p) -> None:
        """``p`` is its own tensor, whole on every rank (one process, ZeRO-0 fp32)."""
        matrix = next((m for m in self.matrices if m.param is p), None)
        if matrix is not None:
            matrix.ranges, matrix.unit = [(0, p.numel())], ("whole", id(p))
        self.layout[id(p)] = (("whole", id(p)), [Segment(0, p.numel(), 0, p, matrix)])
        self.unit_devices[("whole", id(p))] = p.device

    def attach(self, layout: dict, partitioned: bool, comm_device=None, kind: str = "whole",
               devices: dict | None = None, offloaded: bool = False) -> None:
        """Install a layout (``projected_layout.zero_layout``): ``{id(flat): (unit, [Segment])}``
        with every matrix's ``unit``, ``ranges`` and ``split_rows`` set. A projected matrix the
        layout does not place is an error: it would silently run as something else."""
        placed = {id(s.matrix) for _, segs in layout.values() for s in segs if s.matrix is not None}
        for m in self.matrices:
            if id(m) not in placed and not any(b > a for a, b in m.ranges):
                raise RuntimeError(f"projected matrix {m.index} {m.shape} is in no partition of any rank")
            if len(m.shape) != 2 or m.shape[0] * m.shape[1] != sum(b - a for a, b in m.ranges):
                raise RuntimeError(f"projected matrix {m.index}: its partitions do not cover its {m.shape} elements")
        self.layout, self.partitioned, self.comm_device = layout, partitioned, comm_device
        self.layout_kind, self.offloaded = kind, offloaded
        self.unit_devices.update(devices or {})

    def update_count(self) -> int:
        """Updates done (every matrix and every plain element step together)."""
        return max([st.get("step", 0) for st in [*self.proj_state.values(), *self.plain_state.values()]] + [0])

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor of its own state (what the memory ledger counts): kept beside
        ``self.state``, which DeepSpeed reads as per-flat-tensor Adam state."""
        states = list(self.proj_state.values()) + list(self.plain_state.values())
        return [v for st in states for v in st.values() if isinstance(v, torch.Tensor)]

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        local: dict[int, tuple[torch.Tensor, torch.Tensor, Segment]] = {}
        units: dict = {}  # unit -> its live param group (load_state_dict replaces the group dicts)
        for group in self.param_groups:
            for flat in group["params"]:
                entry = self.layout.get(id(flat))
                if entry is None:
                    raise RuntimeError("the projected optimizer got a tensor it has no layout for: ZeRO 1-3 "
                                       "partition the params and attach() was not called after deepspeed.initialize")
                unit, segs = entry
                if flat.grad is None:
                    if self.partitioned:
                        raise RuntimeError("a ZeRO partition reached the projected optimizer without a gradient")
                    continue
                units[unit] = group
                self._plain_step(group, unit, flat, [s for s in segs if s.matrix is None])
                for s in segs:
                    if s.matrix is not None:
                        local[s.matrix.index] = (flat, flat.grad, s)
        if self.partitioned:
            todo = [m for m in self.matrices if m.unit in units]
        else:
            todo = [m for m in self.matrices if m.index in local]
        for m in todo:
            m.group = units[m.unit]
        self._projected_step(todo, local)
        return loss

    def _plain_step(self, group, unit, flat, segs: list[Segment]) -> None:
        """HF AdamW on the non-projected elements of ``flat`` (moments kept as one concatenated
        run), in place on views of each segment: no copy of them is made."""
        if not segs:
            return
        grad, data = flat.grad.reshape(-1), flat.data.reshape(-1)
        runs = [(data.narrow(0, s.offset, s.numel), grad.narrow(0, s.offset, s.numel)) for s in segs]
        adam_step_runs(self.plain_state.setdefault(unit, {"step": 0}), runs, group)

    def _projected_step(self, todo: list[Matrix], local: dict) -> None:
        if not todo:
            return
        work = [self._project(m, local.get(m.index)) for m in todo]
        if self.partitioned:
            self._reduce_r(work)
        for w in work:
            self._adam_and_scale(w)
        if self.partitioned:
            self._reduce_norms(work)
        for w in work:
            self._apply(w)
        self.projections += len(todo)

    def _project(self, m: Matrix, here) -> dict:
        """Phase 1: the projector (new every gap) and this rank's (partial) R."""
        (rows_n, cols), rank = m.shape, m.group["proj_rank"]
        st = self.proj_state.setdefault(m.index, {"step": 0, "seed": m.seed})
        if here is None:
            flat, a, b, device = None, 0, 0, self.unit_devices.get(m.unit, torch.device("cpu"))
            g_loc = torch.zeros(0, device=device)  # it holds nothing of m: it takes part with zeros
        else:
            flat, grad, seg = here
            a, b = seg.start, seg.start + seg.numel
            g_loc = grad.reshape(-1).narrow(0, seg.offset, seg.numel)
            device = g_loc.device
        if "proj" not in st or st["step"] % m.group["update_proj_gap"] == 0:
            if m.group["proj_kind"] == "random":
                shape = (rank, cols) if m.tall else (rows_n, rank)
                st["proj"] = random_projector(shape, rank, st["seed"]).to(device)
                st["seed"] = next_seed(st["seed"])
            else:
                st["proj"] = self._svd_projector(m, g_loc, a, b, device)
        proj = st["proj"].to(device)
        row0 = a // cols
        row1 = (b - 1) // cols + 1 if b > a else row0
        st["rows"] = (row0, row1 - row0)
        if not self.partitioned:
            block = g_loc.view(rows_n, cols)
        else:
            block = torch.zeros((row1 - row0) * cols, device=device, dtype=g_loc.dtype)
            block[a - row0 * cols: b - row0 * cols] = g_loc
            block = block.view(row1 - row0, cols)
        r_part = block @ proj.t() if m.tall else proj[row0:row1].t() @ block
        return {"m": m, "st": st, "proj": proj, "flat": flat, "seg": here[2] if here else None, "a": a, "b": b,
                "row0": row0, "row1": row1, "block": block, "R": r_part}

    def _svd_projector(self, m: Matrix, g_loc, a: int, b: int, device) -> torch.Tensor:
        rank = m.group["proj_rank"]
        if not self.partitioned:
            return projector(g_loc.view(m.shape), rank).to(device)
        shape = (rank, m.shape[1]) if m.tall else (m.shape[0], rank)

        def whole() -> torch.Tensor:  # this rank's elements in a zero m x n: the sum is G
            g = torch.zeros(m.shape[0] * m.shape[1], device=self.comm_device, dtype=torch.float32)
            g[a:b] = g_loc.to(self.comm_device, torch.float32)
            return g.view(m.shape)

        new = reduce_apply_broadcast(whole, owner_of(m.index, dist.get_world_size()),
                                     lambda k: projector_from_gram(k, rank, m.tall), shape, torch.float32, condense=gram)
        return new.to(device)

    def _reduce_r(self, work: list[dict]) -> None:
        """The one all-reduce of R per call: split rows (tall), the whole r x n (wide)."""
        pieces = []
        for w in work:
            m, rank = w["m"], w["m"].group["proj_rank"]
            if m.tall:
                for row in m.split_rows:
                    held = w["row0"] <= row < w["row1"]
                    pieces.append(w["R"][row - w["row0"]] if held else torch.zeros(rank, device=w["R"].device))
            else:
                pieces.append(w["R"].reshape(-1))
        if not pieces:
            return
        buf = torch.cat([p.to(self.comm_device, torch.float32) for p in pieces])
        self.last_reduce_bytes = buf.numel() * buf.element_size()
        dist.all_reduce(buf)
        at = 0
        for w in work:
            m, rank = w["m"], w["m"].group["proj_rank"]
            if m.tall:
                for row in m.split_rows:
                    if w["row0"] <= row < w["row1"]:
                        w["R"][row - w["row0"]] = buf[at: at + rank].to(w["R"].device)
                    at += rank
            else:
                w["R"] = buf[at: at + w["R"].numel()].view_as(w["R"]).to(w["R"].device)
                at += w["R"].numel()

    def _adam_and_scale(self, w: dict) -> None:
        """Phase 2: Adam on R, the scaling factors, the update's terms, partial norms."""
        m, st, group, r = w["m"], w["st"], w["m"].group, w["R"]
        n, step_size = adam_direction(st, r, group)
        w["N"], w["step_size"] = n, step_size
        dim = 1 if m.tall else 0
        if group["scale_type"] == "channel":
            s = channel_norms(n, dim) / (channel_norms(r, dim) + NORM_EPS)
            w["s"] = s.unsqueeze(1) if m.tall else s
        elif not (self.partitioned and m.tall):
            w["s"] = torch.norm(n) / (torch.norm(r) + NORM_EPS)
        else:
            w["s"] = None   # tall, tensor-wise, partitioned: needs the reduced norms
        block, proj, alpha = w["block"], w["proj"], group["proj_scale"]
        if group["residual"]:
            back = (lambda x: x @ proj) if m.tall else (lambda x: proj[w["row0"]:w["row1"]] @ x)
            w["front"] = back(n) * alpha
            w["term"] = (block - back(r) * alpha) * w["s"]
            gg, tt = None, _local(w, w["term"]).pow(2).sum()
        else:
            # The plain form never materialises G * s: its norm comes from G's channel norms
            # (the block is zero outside this rank's elements, so they are this rank's share),
            # and _apply folds s, the limiter and the step into one pass over the weights.
            if group["scale_type"] == "channel":
                chan = channel_norms(block, dim)
                gg = chan.square().sum()
                tt = (chan * w["s"].reshape(-1)).square().sum()
            else:
                gg = torch.linalg.vector_norm(block).square()
                tt = None if w["s"] is None else w["s"].square() * gg
        w["tt"] = tt
        if self.partitioned:
            once = _rows_starting_here(w) if m.tall else None
            sums = torch.zeros(4, dtype=torch.float32, device=block.device)
            if once is not None and once.numel():
                sums[0], sums[1] = r[once].pow(2).sum(), n[once].pow(2).sum()
            if gg is not None:
                sums[2] = gg
            if tt is not None:
                sums[3] = tt
            w["sums"] = sums

    def _reduce_norms(self, work: list[dict]) -> None:
        buf = torch.stack([w["sums"] for w in work]).to(self.comm_device)
        dist.all_reduce(buf)
        for w, sums in zip(work, buf.cpu()):
            w["sums"] = sums

    def _apply(self, w: dict) -> None:
        """Phase 3: limiter, scale, the update and the decay of this rank's elements."""
        m, st, group = w["m"], w["st"], w["m"].group
        if self.partitioned:
            rr, nn_, gg, tt = (float(x) for x in w["sums"])
            if w["s"] is None:
                w["s"] = torch.tensor(math.sqrt(nn_) / (math.sqrt(rr) + NORM_EPS), device=w["block"].device)
                tt = float(w["s"]) ** 2 * gg
            norm = math.sqrt(tt)
        else:
            norm = math.sqrt(float(w["tt"]))
        limiter = 1.0
        if group["limiter"]:
            prev = st.get("limiter_norm")
            if prev is not None:
                limiter = max(norm / (float(prev) + NORM_EPS), LIMIT_GROWTH) / LIMIT_GROWTH
            st["limiter_norm"] = torch.tensor(norm / limiter, dtype=torch.float32)
        if w["seg"] is None:
            return
        seg = w["seg"]
        p = w["flat"].data.reshape(-1).narrow(0, seg.offset, seg.numel)
        if group["residual"]:
            update = w["front"] + w["term"] / limiter
            p.add_(_local(w, update), alpha=-w["step_size"])
        else:
            factor = w["s"] * (math.sqrt(group["proj_scale"]) / limiter)
            if not self.partitioned:   # the whole matrix: one fused pass, no m x n temporary
                p.view(m.shape).addcmul_(w["block"], factor, value=-w["step_size"])
            else:
                p.add_(_local(w, w["block"] * factor), alpha=-w["step_size"])
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])


def _local(w: dict, block: torch.Tensor) -> torch.Tensor:
    """This rank's elements ``[a, b)`` out of a row block that starts at row ``row0``."""
    cols = w["m"].shape[1]
    lo = w["a"] - w["row0"] * cols
    return block.reshape(-1)[lo: lo + w["b"] - w["a"]]


def _rows_starting_here(w: dict) -> torch.Tensor:
    """Block rows whose first element this rank holds: each row's norms are counted once."""
    cols = w["m"].shape[1]
    rows = [i - w["row0"] for i in range(w["row0"], w["row1"]) if w["a"] <= i * cols < w["b"]]
    return torch.tensor(rows, dtype=torch.long)
