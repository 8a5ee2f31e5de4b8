"""LoRA (adapters, never merged) and ReLoRA (merge-and-reinit every ``relora.reset_every``)."""

from __future__ import annotations

from ..relora.layer import wrap_model
from ..weights import merge_adapters
from .base import Method, register


@register
class LoRAMethod(Method):
    """``train.method: lora``: ``y = W x + s B A x`` on the targets, W frozen, never merged."""

    name = "lora"
    adapters = True
    resume_keys = ("relora.rank", "relora.target_modules")

    def wrap(self, model, cfg, seed: int):
        r = cfg.relora
        self.layers = wrap_model(model, rank=r.rank, alpha=r.alpha, dropout=r.dropout, target_modules=r.target_modules,
                                 freeze_modules=r.freeze_modules, seed=seed, fuse_shared_inputs=r.fuse_shared_inputs)
        return self.layers

    def meta(self, cfg) -> dict:
        return {"lora_scale": cfg.relora.alpha / cfg.relora.rank}

    def fold(self, state, meta):
        return merge_adapters(state, meta.get("lora_scale") or 0.0)


@register
class ReLoRAMethod(LoRAMethod):
    """``train.method: relora``: LoRA plus merge-and-reinit, optimizer reset and jagged LR."""

    name = "relora"
    merges = True
