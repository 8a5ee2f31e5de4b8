"""LoRA (adapters, never merged) and ReLoRA (merge-and-reinit every ``relora.reset_every``)."""

from __future__ import annotations

import torch

from ds_relora.errors import ConfigError
from ds_relora.methods.base import AdapterMethod, register
from ds_relora.methods.fold import fold_rows
from ds_relora.methods.lora_layer import check_lora_shapes, wrap_model
from ds_relora.methods.merging import MergingMethod


@register
class LoRAMethod(AdapterMethod):
    """``train.method: lora``: ``y = W x + s B A x`` on the targets, W frozen, never merged."""

    name = "lora"
    resume_keys = ("relora.rank", "relora.target_modules")

    def check_shapes(self, cfg, shapes) -> None:
        check_lora_shapes(cfg.relora.rank, shapes)

    def check_model(self, cfg, hf_config) -> None:
        """The rank against the model's smallest wrapped dimension (hidden or intermediate size)."""
        dims = [getattr(hf_config, k, None) for k in ("hidden_size", "intermediate_size")]
        limit = min(d for d in dims if d) if any(dims) else None
        if limit is not None and cfg.relora.rank > limit:
            raise ConfigError(
                f"relora.rank={cfg.relora.rank} exceeds the smallest wrapped dimension ({limit}) of this model: "
                f"set relora.rank to at most {limit}"
            )

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
class ReLoRAMethod(MergingMethod, LoRAMethod):
    """``train.method: relora``: LoRA plus merge-and-reinit, optimizer reset and jagged LR."""

    name = "relora"


def merge_adapters(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Fold every ``X.lora_B @ X.lora_A`` (times ``scale``) into ``X.weight`` (fp64, row blocks:
    :func:`~ds_relora.methods.fold.fold_rows`); drop the adapters."""
    merged = {}
    for name, tensor in state.items():
        if name.endswith(".lora_A") or name.endswith(".lora_B"):
            continue
        if name.endswith(".weight") and name[: -len(".weight")] + ".lora_A" in state:
            prefix = name[: -len(".weight")]
            a = state[prefix + ".lora_A"].double()
            b = state[prefix + ".lora_B"].double()
            tensor = fold_rows(tensor, lambda r0, r1, a=a, b=b: scale * (b[r0:r1] @ a))
        merged[name] = tensor
    return merged
