"""A sweep's budgets: the token budget of each point (``budget:``) and the settings given as
fractions of the run (``derive:``), resolved per point into ``train.total_steps``, warm-up,
warm start, merge cycles and eval cadence."""

from __future__ import annotations

import dataclasses
from typing import Optional

from ds_relora.config import RunConfig
from ds_relora.config_base import doc
from ds_relora.errors import ConfigError


@dataclasses.dataclass
class BudgetSpec:
    """Token budget of each point; when set it overrides ``train.total_steps``."""

    tokens_per_param: Optional[float] = doc(None, "train tokens per parameter N of the point's full-rank model (Chinchilla: 20): total_steps = floor(tokens_per_param x N / (global batch x seq_len)); every method at one size gets the same tokens")
    tokens: Optional[float] = doc(None, "train tokens per run: total_steps = floor(tokens / (global batch x seq_len))")
    step_multiple: int = doc(1, "round a budget-derived total_steps down to a multiple of this")


@dataclasses.dataclass
class DeriveSpec:
    """Settings given as fractions of the run, resolved per point after the budget."""

    warmup_fraction: Optional[float] = doc(None, "optim.warmup_steps = max(1, round(f x total_steps))")
    warm_start_fraction: Optional[float] = doc(None, "relora.warm_start_steps = round(f x total_steps) for lora/relora points (0: no warm start)")
    cycles: Optional[int] = doc(None, "ReLoRA merges per run: relora.reset_every = (total_steps - warm start) // cycles for relora points, whose total_steps is trimmed to warm start + cycles x reset_every so the run ends on a merge")
    restart_warmup_fraction: Optional[float] = doc(None, "relora.restart_warmup_steps = max(restart_warmup_min, round(f x cycle length)) for relora points and lora points with a warm start (cycle length from `cycles`, else relora.reset_every)")
    restart_warmup_min: int = doc(2, "lower bound of a derived restart warm-up (so the ramp exists)")
    evals: Optional[int] = doc(None, "validation passes per run: train.eval_every = total_steps // evals")


def full_rank_params(cfg: RunConfig) -> int:
    """Parameters of the point's full-rank model (for control: the model it is the control of),
    counted on the meta device: nothing is allocated, exact for presets and HF configs alike."""
    import torch  # noqa: PLC0415  (torch takes seconds to import; this module is on the CLI's start-up path)
    from transformers import AutoModelForCausalLM  # noqa: PLC0415  (transformers takes seconds to import; only code that builds a model needs it)

    from ds_relora.data import read_data_meta  # noqa: PLC0415  (keeps this module's import light (no torch) for the CLI's start-up)
    from ds_relora.train.plan import build_hf_config  # noqa: PLC0415  (keeps this module's import light (no torch) for the CLI's start-up)

    full = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, method="full"))
    hf = build_hf_config(full, read_data_meta(cfg.data.path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    return sum(p.numel() for p in model.parameters())


def steps_for_tokens(tokens: float, global_batch: int, seq_len: int, multiple: int = 1) -> int:
    steps = int(tokens // (global_batch * seq_len))
    return steps - steps % max(1, multiple)


def apply_budget(cfg: RunConfig, budget: BudgetSpec, world: int) -> None:
    if budget.tokens_per_param is not None and budget.tokens is not None:
        raise ConfigError("set only one of budget.tokens_per_param and budget.tokens")
    if budget.tokens_per_param is None and budget.tokens is None:
        return
    from ds_relora.zero.ds_config import batch_layout  # noqa: PLC0415  (keeps this module's import light (no torch) for the CLI's start-up)

    _, _, global_batch = batch_layout(cfg, world)
    if budget.tokens_per_param is not None:
        tokens = budget.tokens_per_param * full_rank_params(cfg)
        what = f"budget.tokens_per_param={budget.tokens_per_param:g}"
    else:
        tokens, what = budget.tokens, f"budget.tokens={budget.tokens:g}"
    steps = steps_for_tokens(tokens, global_batch, cfg.data.seq_len, budget.step_multiple)
    if steps < 1:
        raise ConfigError(f"{what} gives {tokens:.0f} tokens, less than one step of {global_batch} x "
                          f"{cfg.data.seq_len} tokens: raise the budget or lower the batch")
    cfg.train.total_steps = steps


def apply_derive(cfg: RunConfig, d: DeriveSpec) -> None:
    t, r = cfg.train, cfg.relora
    for field in ("warmup_fraction", "warm_start_fraction", "restart_warmup_fraction"):
        value = getattr(d, field)
        if value is not None and not 0.0 <= value < 1.0:
            raise ConfigError(f"derive.{field}={value} must be in [0, 1)")
    if d.warmup_fraction is not None:
        cfg.optim.warmup_steps = max(1, round(d.warmup_fraction * t.total_steps))
    from ds_relora.methods import get_method  # noqa: PLC0415  (keeps this module's import light (no torch) for the CLI's start-up)

    method = get_method(t.method)
    adapters = method.adapters
    if d.warm_start_fraction is not None and adapters:
        r.warm_start_steps = round(d.warm_start_fraction * t.total_steps)
    # Only fields the method reads are set: full/control ignore relora.*, LoRA never merges
    # (its one restart ramp after a warm start is sized like ReLoRA's).
    warm = r.warm_start_steps if adapters else 0
    every = r.reset_every
    if d.cycles is not None:
        if d.cycles < 1:
            raise ConfigError(f"derive.cycles={d.cycles} must be at least 1")
        every = (t.total_steps - warm) // d.cycles
        if every < 1:
            raise ConfigError(f"derive.cycles={d.cycles} leaves cycles shorter than one step in "
                              f"{t.total_steps - warm} steps: lower cycles or raise the budget")
        if method.merges:
            r.reset_every = every
            t.total_steps = warm + d.cycles * every
    ramps = method.merges or (adapters and warm > 0)
    if d.restart_warmup_fraction is not None and ramps:
        r.restart_warmup_steps = max(d.restart_warmup_min, round(d.restart_warmup_fraction * every))
    if d.evals is not None:
        if d.evals < 1:
            raise ConfigError(f"derive.evals={d.evals} must be at least 1")
        t.eval_every = max(1, t.total_steps // d.evals)
