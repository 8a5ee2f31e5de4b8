"""GaLore (Zhao et al. 2024) as a frozen-projection adapter.

Design choice (issue 10 allows an optimizer-side design too): between two projector updates the
projector is constant, so for a linear with weight W (m x n)

* ``m < n``:  ``W = W0 + s * P C``, P (m x r) frozen (``galore_proj``), C (r x n) trainable;
* ``m >= n``: ``W = W0 + s * C Q``, Q (r x n) frozen (``galore_proj``), C (m x r) trainable;

with C = 0 right after each update. ``dL/dC = s P^T G`` (or ``s G Q^T``) is GaLore's projected
gradient times s, and Adam on C moves W by ``s P ΔC``: GaLore's update. Why this and not a
projection inside the ZeRO optimizer: C is an ordinary parameter that DeepSpeed partitions,
reduces and checkpoints on every stage; W0 is frozen like ReLoRA's W, so the merge reuses the
ZeRO-exact per-shard row update (:meth:`GaLoreLinear.delta_rows`); there is no weight-gradient
GEMM for W0 and no full-size gradient buffer between updates (C-sized gradient traffic).

What galore-torch's ``GaLoreAdamW`` does and how we reproduce it (checked against its source,
``galore_torch/adamw.py`` and ``galore_projector.py``, version 1.0):

* the projector is recomputed when the param's update count (before this update) is a
  multiple of ``update_proj_gap``, from *this* step's gradient, ``torch.linalg.svd(G,
  full_matrices=False)`` in fp32: ``Q = Vh[:r]`` when ``m >= n``, else ``P = U[:, :r]``. We take
  G from a probe forward/backward on the step's micro-batches (:func:`probe_activations`), merge
  ``W0 += s P C``, zero C and install the new projector, then run the normal step. Unlike
  galore-torch, G is summed and reduced in fp64, its singular vectors come from an fp64
  eigendecomposition of the smaller side's Gram matrix (the same vectors as the fp64 SVD to
  the fp32 result's last bit, at a quarter of the flops and a few k x k arrays of workspace) and
  their signs are canonical (:func:`projector`): the projector is then a function of the global
  batch, not of the world size, the ZeRO stage or the CPU's kernels;
* the Adam moments live in the projected shape and are kept across updates (C's moments are
  kept: nothing to do), the step counter goes on;
* its Adam is HF's old AdamW: ``p -= lr * sqrt(bc2) / bc1 * m / (sqrt(v) + eps)``, eps *inside*
  the bias correction (default 1e-6). torch's AdamW computes ``m / (sqrt(v) / sqrt(bc2) + eps)``,
  so setting ``eps_t = eps / sqrt(bc2_t)`` each step makes them equal; for C, whose gradient is
  s times the projected one (so is sqrt(v)), ``eps_t = eps * s / sqrt(bc2_t)``
  (:func:`adam_eps`);
* its decoupled weight decay acts on the full p after the update. W0 is frozen here, so
  ``weight_decay > 0`` is refused for now (exact form: a per-layer scalar folded into W0 at
  each merge; C its own decay).
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ds_relora.errors import ConfigError
from ds_relora.methods.base import AdapterMethod, adapter_rank, register, wrap_targets
from ds_relora.methods.fold import fold_rows
from ds_relora.methods.galore_probe import AliveCount, full_gradients, layer_gradient, probe_activations  # noqa: F401  (full_gradients re-exported: the oracle tests' one-process G)
from ds_relora.methods.merging import merge_and_reinit
from ds_relora.zero.owner_reduce import owner_of, reduce_apply_broadcast
from ds_relora.zero.projection import canonical_signs, gram, projector, projector_from_gram

__all__ = ["canonical_signs", "projector"]  # re-exported: the tests and older callers read them here


def check_layer(name: str, out_features: int, in_features: int, rank: int) -> None:
    limit = min(out_features, in_features)
    if rank < 1 or rank > limit:
        raise ConfigError(
            f"galore.rank={rank} does not fit layer '{name}' ({out_features}x{in_features}): "
            f"set galore.rank between 1 and {limit}"
        )


def side_of(out_features: int, in_features: int) -> str:
    """'right' (Q, r x n) when m >= n, else 'left' (P, m x r): galore-torch's proj_type 'std'."""
    return "right" if out_features >= in_features else "left"


def adam_eps(update: int, eps: float, beta2: float, grad_scale: float = 1.0) -> float:
    """torch-AdamW eps for 1-based update ``update`` that reproduces galore-torch's eps placement."""
    return eps * grad_scale / math.sqrt(1.0 - beta2 ** update)


def set_galore_eps(optimizer: torch.optim.Optimizer, update: int, eps: float) -> None:
    """Before 1-based update ``update``: every group's eps from its ``eps_scale`` (default 1)."""
    for group in optimizer.param_groups:
        group["eps"] = adam_eps(update, eps, group["betas"][1], group.get("eps_scale", 1.0))


class GaLoreLinear(nn.Module):
    """A linear whose W = W0 + s * (P C or C Q): W0 frozen (``weight``), projector ``galore_proj``
    (a saved buffer, zero until the first update), C trainable (``galore_C``, zero)."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, name: str = "layer"):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        check_layer(name, self.out_features, self.in_features, rank)
        self.rank, self.scale = rank, scale
        self.side = side_of(self.out_features, self.in_features)
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias  # stays as trainable as it was: GaLore trains biases with plain Adam
        device, dtype = base.weight.device, base.weight.dtype
        if self.side == "left":
            proj_shape, c_shape = (self.out_features, rank), (rank, self.in_features)
        else:
            proj_shape, c_shape = (rank, self.in_features), (self.out_features, rank)
        # At least fp32 whatever W's dtype: under ZeRO-3's zero.Init with bf16, W is already bf16
        # here, while on ZeRO 0-2 W is still fp32 and DeepSpeed keeps buffers fp32. One projector
        # precision on every stage keeps merges and elastic resumes between stages exact.
        proj_dtype = torch.promote_types(dtype, torch.float32)
        self.register_buffer("galore_proj", torch.zeros(proj_shape, device=device, dtype=proj_dtype))
        self.galore_C = nn.Parameter(torch.zeros(c_shape, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        # The projector stays fp32 (see __init__); the GEMMs run in the activations' dtype.
        proj = self.galore_proj.to(x.dtype)
        if self.side == "left":
            low = F.linear(F.linear(x, self.galore_C), proj)
        else:
            low = F.linear(F.linear(x, proj), self.galore_C)
        return y + self.scale * low

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"galore_C": self.galore_C}

    def delta_rows(self, values: dict[str, torch.Tensor], row0: int, row1: int) -> torch.Tensor:
        """Rows of ``s P C`` / ``s C Q`` from the full fp32 C (its master) and the projector."""
        c = values["galore_C"]
        work = torch.promote_types(c.dtype, torch.float32)
        c = c.to(work)
        proj = values.get("galore_proj", self.galore_proj).to(c.device, work)
        if self.side == "left":
            return (proj[row0:row1] @ c).mul_(self.scale)
        return (c[row0:row1] @ proj).mul_(self.scale)

    def reset_values(self, values: dict[str, torch.Tensor], generator=None) -> dict[str, torch.Tensor]:
        return {"galore_C": torch.zeros_like(values["galore_C"])}

    def adapter_buffers(self) -> dict[str, torch.Tensor]:
        return {"galore_proj": self.galore_proj}

    def load_adapter_buffers(self, values: dict[str, torch.Tensor]) -> None:
        self.galore_proj.copy_(values["galore_proj"])

    @torch.no_grad()
    def update_projection_local(self, grad: torch.Tensor) -> None:
        """Single-process projector update: ``W0 += s P C`` (fp32), C = 0, projector from ``grad``."""
        work = torch.promote_types(self.weight.dtype, torch.float32)
        delta = self.delta_rows({"galore_C": self.galore_C.detach().to(work)}, 0, self.out_features)
        self.weight.copy_((self.weight.to(work) + delta).to(self.weight.dtype))
        self.galore_C.zero_()
        self.galore_proj.copy_(projector(grad, self.rank).to(self.galore_proj.dtype))


def fold_state(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Fold every ``X.galore_C`` with its ``X.galore_proj`` into ``X.weight`` (fp64, row blocks:
    :func:`~ds_relora.methods.fold.fold_rows`); drop both."""
    folded = {}
    for name, tensor in state.items():
        if name.endswith(".galore_C") or name.endswith(".galore_proj"):
            continue
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix is not None and prefix + ".galore_C" in state:
            c, proj = state[prefix + ".galore_C"].double(), state[prefix + ".galore_proj"].double()
            if side_of(*tensor.shape) == "left":
                tensor = fold_rows(tensor, lambda r0, r1, c=c, proj=proj: scale * (proj[r0:r1] @ c))
            else:
                tensor = fold_rows(tensor, lambda r0, r1, c=c, proj=proj: scale * (c[r0:r1] @ proj))
        folded[name] = tensor
    return folded


# ----------------------------------------------------------------------------- the method
def _update_projectors(engine, layers, acts, rank: int, step: int) -> dict:
    """For every layer, in the same order on every rank, through the merging methods' own
    ZeRO-exact :func:`merge_and_reinit`: ``W0 += s P C`` with the old projector (this rank's rows
    of W0 only on ZeRO-3), C = 0 in the module and the master (``optimizer_reset="none"``: its
    Adam moments are kept, as galore-torch keeps them), then the new projector.

    The projector of layer i: every rank makes its G_i (fp64, from the probe's activations),
    ``dist.reduce``s it to owner ``i mod world`` and frees it; the owner turns G into its k x k
    Gram matrix (k the smaller side), frees G, runs the eigendecomposition and broadcasts the
    r x n (or m x r) projector (:func:`reduce_apply_broadcast`). So a rank holds at most one
    layer's full G at a time, never next to the decomposition's workspace (a few k x k fp64
    arrays), and the decompositions are spread over the ranks. They still run one after the
    other: overlapping them would keep a second G alive on each owner. Returns the rank's
    ``svd_layers`` and ``peak_full_gradients`` (the most G buffers alive at once: 1)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    where = {id(layer): (index, name) for index, (name, layer) in enumerate(layers)}
    alive, svds = AliveCount(), []

    def install_projector(layer) -> None:
        index, name = where[id(layer)]
        pairs = acts.pop(name)  # this layer's activations go with its G
        tall = layer.side == "right"

        def decompose(gram_matrix: torch.Tensor) -> torch.Tensor:
            svds.append(1)
            return projector_from_gram(gram_matrix, rank, tall)

        # The owner turns G into its Gram matrix and frees G before the eigendecomposition.
        new = reduce_apply_broadcast(lambda: alive.make(lambda: layer_gradient(pairs)), owner_of(index, world), decompose,
                                     tuple(layer.galore_proj.shape), torch.float32, condense=gram)
        layer.galore_proj.copy_(new.to(layer.galore_proj.dtype))

    # C's reset draws nothing (zeros): the seed only feeds merge_and_reinit's unused generators.
    merge_and_reinit(engine, layers, seed=0, step=step, optimizer_reset="none", after_merge=install_projector)
    return {"svd_layers": len(svds), "peak_full_gradients": alive.peak}


@register
class GaLoreMethod(AdapterMethod):
    """``train.method: galore``: GaLoreLinear layers on ``relora.target_modules``, a projector
    update before every ``update_proj_gap``-th update of the phase, embeddings/norms/head with
    plain Adam. A frozen-projection adapter, not an optimizer wrapper: see the module docstring."""

    name = "galore"
    writes_base = True  # each projector change merges C into W
    full_gradient_probe = True  # one layer's fp64 G, then its Gram matrix's eigendecomposition, per rank at a time
    resume_keys = ("galore.rank", "galore.scale", "relora.rank", "relora.target_modules")

    def validate(self, cfg, zero_stage: int) -> None:
        g = cfg.galore
        if g.update_proj_gap < 1:
            raise ConfigError(f"galore.update_proj_gap={g.update_proj_gap} must be at least 1")
        if g.proj_type != "std":
            raise ConfigError(f"galore.proj_type='{g.proj_type}' is not supported: use std (the smaller side)")
        if adapter_rank(cfg, "galore") < 1:
            raise ConfigError(f"galore.rank={adapter_rank(cfg, 'galore')} must be at least 1")
        if cfg.optim.weight_decay:
            raise ConfigError(
                f"optim.weight_decay={cfg.optim.weight_decay} cannot be honoured by train.method=galore yet "
                "(the frozen W0 is not decayed): set optim.weight_decay=0"
            )
        if cfg.relora.keep_base_fp32:
            raise ConfigError("relora.keep_base_fp32 is not supported by train.method=galore: set it to false")

    def check_shapes(self, cfg, shapes) -> None:
        # Smallest layer first: its bound is the one every layer meets, so one fix is enough.
        for name, out_features, in_features in sorted(shapes, key=lambda s: min(s[1], s[2])):
            check_layer(name, out_features, in_features, adapter_rank(cfg, "galore"))

    def wrap(self, model, cfg, seed: int):
        g = cfg.galore
        self.rank, self.gap, self.eps = adapter_rank(cfg, "galore"), g.update_proj_gap, cfg.optim.eps
        self.layers = wrap_targets(model, cfg.relora.target_modules, cfg.relora.freeze_modules,
                                   lambda name, base: GaLoreLinear(base, self.rank, g.scale, name),
                                   lambda shapes: self.check_shapes(cfg, shapes))
        return self.layers

    def adapter_counts(self, out_features: int, in_features: int, rank: int) -> tuple[int, int]:
        """C, ``r max(out, in)``, trained; the projector, ``r min(out, in)``, a frozen buffer."""
        return rank * max(out_features, in_features), rank * min(out_features, in_features)

    def param_groups(self, model, cfg) -> list[dict]:
        """C's group gets ``eps_scale = scale`` (its gradient is scale x GaLore's projected one)."""
        cs = [m.galore_C for m in model.modules() if isinstance(m, GaLoreLinear)]
        ids = {id(c) for c in cs}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": rest, "weight_decay": 0.0, "eps_scale": 1.0}] if rest else []
        return groups + [{"params": cs, "weight_decay": 0.0, "eps_scale": cfg.galore.scale}]

    def before_step_phase(self, step: int) -> str | None:
        return "projector update" if step % self.gap == 0 else None

    def before_step(self, engine, step: int, micro_batches):
        """Before the phase's update ``step`` (0-based): galore-torch's eps for it, and on every
        ``update_proj_gap``-th one a probe forward/backward on this step's micro-batches (the
        gradient of W at the current weights: what galore-torch projects), then the update."""
        set_galore_eps(engine.optimizer, step + 1, self.eps)
        if step % self.gap:
            return None
        started = time.perf_counter()
        device = engine.device
        # engine.module, not engine(...): DeepSpeed's forward hangs backward hooks on the loss that
        # start its gradient reduction (ZeRO 1/2 epilogue) when any backward runs; the probe
        # differentiates w.r.t. layer outputs only and must leave the optimizer's state alone.
        # ZeRO-3's parameter gathers are module hooks, so they still run.
        acts = probe_activations(engine.module, self.layers, micro_batches,
                                 lambda model, mb: model(input_ids=mb.to(device), labels=mb.to(device)).loss)
        stats = _update_projectors(engine, self.layers, acts, self.rank, step)
        return {"event": "projection", "step": step, "modules": len(self.layers), **stats,
                "seconds": time.perf_counter() - started}

    def meta(self, cfg) -> dict:
        return {"galore_scale": cfg.galore.scale}

    def fold(self, state, meta):
        return fold_state(state, meta.get("galore_scale", 0.25))
