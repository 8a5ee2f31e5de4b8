"""Fira (Chen et al. 2024, the ``fira`` package's ``FiraAdamW``): GaLore's SVD projector with
Adam on the projected gradient R, plus the part of the gradient the projection drops:

    u = a P N + (G - a P R) * s,   s = ||N||_d / (||R||_d + 1e-8) per row (tall) or column (wide),

with the norm-growth limiter on the second term only, a = ``fira.alpha``. The optimizer is the
shared ``zero/projected_adam.ProjectedAdamW`` (residual form), checked within 1e-6 against
``FiraAdamW`` with its SVD given our fp64 canonical-sign rule (see ``methods/apollo.py`` for the
method seam these share)."""

from __future__ import annotations

from ds_relora.errors import ConfigError
from ds_relora.methods.apollo import ProjectionMethod
from ds_relora.methods.base import adapter_rank, register


@register
class FiraMethod(ProjectionMethod):
    """``train.method: fira`` (section ``fira``)."""

    name = "fira"
    section = "fira"
    residual = True
    resume_keys = ("fira.rank", "fira.alpha", "relora.rank", "relora.target_modules")

    def options(self, cfg) -> dict:
        f = cfg.fira
        return {"proj_rank": adapter_rank(cfg, "fira"), "proj_kind": "svd", "scale_type": "channel",
                "update_proj_gap": f.update_proj_gap, "proj_scale": f.alpha, "residual": True, "limiter": True}

    def validate(self, cfg, zero_stage: int) -> None:
        super().validate(cfg, zero_stage)
        if cfg.fira.alpha <= 0:
            raise ConfigError(f"fira.alpha={cfg.fira.alpha} must be positive: e.g. 1 (the package's default) or 0.25")
