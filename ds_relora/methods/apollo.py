"""APOLLO and APOLLO-Mini (Zhu et al. 2024, ``apollo-torch``), and the seam every projection
method shares (:class:`ProjectionMethod`; Fira in ``fira.py`` is the third).

Unlike the adapter methods, these keep every W trainable and change the *optimizer*: the target
linears' weights (``relora.target_modules``) go into one param group that
``zero/projected_adam.ProjectedAdamW`` steps with a projected Adam (its docstring has the
algorithm, checked within 1e-6 against ``apollo-torch``'s ``APOLLOAdamW``); everything else
trains with the same HF-style AdamW (eps inside, decoupled decay after the update), as the
reference does. Nothing is wrapped, nothing is folded: a checkpoint's weights are the model.

* ``apollo``: rank-r random projection (``apollo.proj: random``; ``svd`` for GaLore's SVD
  projector), channel-wise scaling, norm-growth limiter, scale 1;
* ``apollo_mini``: rank 1, tensor-wise scaling, scale 128 (the update is multiplied by
  sqrt(scale), as apollo-torch does): its optimizer state per projected m x n matrix is the
  moments of a 1 x n (or m x 1) R, O(max side) not O(mn)."""

from __future__ import annotations

from typing import ClassVar

from ds_relora.errors import ConfigError
from ds_relora.methods.base import Method, adapter_rank, default_param_groups, register, target_linears
from ds_relora.zero.projected_adam import ProjectedAdamW
from ds_relora.zero.state import full_shape


def projected_optimizer(engine) -> ProjectedAdamW:
    """The engine's client optimizer (DeepSpeed's ZeRO and bf16 wrappers hold it as ``optimizer``)."""
    opt = engine.optimizer
    opt = opt if isinstance(opt, ProjectedAdamW) else getattr(opt, "optimizer", None)
    if not isinstance(opt, ProjectedAdamW):
        raise RuntimeError(f"the engine's optimizer is {type(engine.optimizer).__name__}, not the projected "
                           "optimizer a projection method needs: build the engine with the method's param groups")
    return opt


class ProjectionMethod(Method):
    """A method that projects the target matrices' gradients inside the optimizer. It trains a
    phase of its own (``projects``: the trainer and the plan treat it like an adapter method's
    phase, so a warm start switches into it), with nothing wrapped."""

    projects = True
    section: ClassVar[str] = ""
    residual: ClassVar[bool] = False   # Fira: add the projected-back Adam direction to the scaled residual

    def options(self, cfg) -> dict:
        """The projection keys of the projected param group (``projected_adam.PROJECTION_KEYS``)."""
        raise NotImplementedError

    def validate(self, cfg, zero_stage: int) -> None:
        sec = getattr(cfg, self.section)
        if adapter_rank(cfg, self.section) < 1:
            raise ConfigError(f"{self.section}.rank={adapter_rank(cfg, self.section)} must be at least 1")
        if sec.update_proj_gap < 1:
            raise ConfigError(f"{self.section}.update_proj_gap={sec.update_proj_gap} must be at least 1")

    def check_shapes(self, cfg, shapes) -> None:
        rank = adapter_rank(cfg, self.section)
        for name, out_features, in_features in sorted(shapes, key=lambda s: min(s[1], s[2])):
            limit = min(out_features, in_features)
            if rank > limit:
                raise ConfigError(f"{self.section}.rank={rank} does not fit layer '{name}' ({out_features}x{in_features}): "
                                  f"set {self.section}.rank between 1 and {limit}")

    def wrap(self, model, cfg, seed: int):
        """Nothing is wrapped: finds the targets (the same regexes as the adapter methods) and
        checks the rank against each; returns no layers."""
        targets = target_linears(model, cfg.relora.target_modules, "relora")
        self.check_shapes(cfg, [(n, t.out_features, t.in_features) for n, t in targets])
        self.targets = [n for n, _ in targets]
        return []

    def param_groups(self, model, cfg) -> list[dict]:
        """The targets' weights in one projected group (decayed like every matrix); the rest as
        the full-rank default (matrices decay, vectors do not)."""
        targets = target_linears(model, cfg.relora.target_modules, "relora")
        for name, t in targets:
            if len(full_shape(t.weight)) != 2:
                raise ConfigError(f"relora.target_modules matches '{name}', whose weight is not 2-D: projection "
                                  "methods project matrices only")
        weights = [t.weight for _, t in targets if t.weight.requires_grad]
        ids = {id(w) for w in weights}
        rest = [g for g in default_param_groups(model, cfg.optim.weight_decay) if g["params"]]
        for g in rest:
            g["params"] = [p for p in g["params"] if id(p) not in ids]
        rest = [g for g in rest if g["params"]]
        return rest + [{"params": weights, "weight_decay": cfg.optim.weight_decay, **self.options(cfg)}]

    def adapter_counts(self, out_features: int, in_features: int, rank: int) -> tuple[int, int]:
        return 0, 0

    def start_phase(self, cfg, start: int, offset: int) -> None:
        self.gap, self.counted = getattr(cfg, self.section).update_proj_gap, 0

    def before_step(self, engine, step: int, micro_batches) -> dict | None:
        """Before each update that gets a new projector (every ``update_proj_gap``-th): an event
        with how many matrix projections the optimizer ran since the last one (``gap x
        matrices`` unless a step skipped a matrix: the tests hold it to that), the matrices'
        logical shapes as the optimizer sees them, its layout kind, whether DeepSpeed offloads
        the optimizer to host memory, and how many rows of tall
        matrices are cut between ranks (their R rows travel in the step's all-reduce)."""
        if step % self.gap:
            return None
        opt = projected_optimizer(engine)
        done, self.counted = opt.projections - self.counted, opt.projections
        return {"event": "projection", "step": step, "matrices": len(opt.matrices), "projections": done,
                "layout": opt.layout_kind, "offload": opt.offloaded, "shapes": sorted({m.shape for m in opt.matrices}),
                "split_rows": sum(len(m.split_rows) for m in opt.matrices)}


class _Apollo(ProjectionMethod):
    def options(self, cfg) -> dict:
        a = getattr(cfg, self.section)
        return {"proj_rank": adapter_rank(cfg, self.section), "proj_kind": a.proj, "scale_type": a.scale_type,
                "update_proj_gap": a.update_proj_gap, "proj_scale": a.scale, "residual": False, "limiter": a.limiter}

    def validate(self, cfg, zero_stage: int) -> None:
        super().validate(cfg, zero_stage)
        if getattr(cfg, self.section).scale <= 0:
            raise ConfigError(f"{self.section}.scale={getattr(cfg, self.section).scale} must be positive: e.g. 1 (128 for apollo_mini)")


@register
class ApolloMethod(_Apollo):
    """``train.method: apollo`` (section ``apollo``)."""

    name = "apollo"
    section = "apollo"
    resume_keys = ("apollo.rank", "apollo.proj", "apollo.scale_type", "relora.rank", "relora.target_modules")


@register
class ApolloMiniMethod(_Apollo):
    """``train.method: apollo_mini`` (section ``apollo_mini``: rank 1, tensor scaling, scale 128)."""

    name = "apollo_mini"
    section = "apollo_mini"
    default_rank = 1
    resume_keys = ("apollo_mini.rank", "apollo_mini.proj", "apollo_mini.scale_type", "relora.target_modules")
