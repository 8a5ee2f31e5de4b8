"""Building the DeepSpeed engine around a (possibly ReLoRA-wrapped) model."""

from __future__ import annotations

import torch

from ..relora.schedule import JaggedCosine, make_scheduler


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices decay, vectors (norms, biases) do not. Frozen params are left out."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_engine(model, ds_config: dict, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, schedule: JaggedCosine):
    """``deepspeed.initialize`` with a client AdamW and the jagged LambdaLR (stepped by DeepSpeed
    once per successful optimizer step)."""
    import deepspeed

    fused = torch.cuda.is_available() and not _offloads_optimizer(ds_config)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps,
                                  fused=fused or None)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: make_scheduler(opt, schedule),
        config=ds_config,
    )
    return engine


def _offloads_optimizer(ds_config: dict) -> bool:
    zero = ds_config.get("zero_optimization", {})
    return zero.get("offload_optimizer", {}).get("device", "none") not in (None, "none")
