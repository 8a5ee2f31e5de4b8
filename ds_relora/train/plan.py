"""Everything a run needs that can be checked before any worker starts.

``plan_run`` validates the run config against the data, the model and the world size and
returns the derived numbers; the parent ``ds-relora train`` calls it before launching, and
every worker calls it again (a worker may also be started by hand, e.g. under srun).
"""

from __future__ import annotations

import dataclasses

from ..config import RunConfig
from ..errors import ConfigError, DataError
from ..models import control_shape, llama_config, preset_shape, resolve_attn_implementation
from ..relora.optim_reset import check_reset_args
from ..relora.schedule import JaggedCosine
from .ds_config import batch_layout, build_ds_config


@dataclasses.dataclass
class RunPlan:
    world_size: int
    micro_batch: int
    grad_accum: int
    global_batch: int
    ds_config: dict
    hf_config: object
    data_meta: dict
    adapters: bool          # the run has a ReLoRA/LoRA phase
    merges: bool            # that phase merges (relora) or not (lora)
    relora_start: int       # global step where the adapter phase starts (0: from the start)


def _read_data_meta(path: str) -> dict:
    from ..data import read_meta

    return read_meta(path)


def build_hf_config(cfg: RunConfig, meta: dict):
    vocab = int(meta["vocab_size"])
    seq_len = cfg.data.seq_len
    attn = resolve_attn_implementation(cfg.model.attn_implementation)
    if cfg.model.name_or_path:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(cfg.model.name_or_path)
        hf._attn_implementation = attn
        if vocab > hf.vocab_size:
            raise DataError(
                f"the tokenizer has {vocab} tokens but the model's embedding has {hf.vocab_size} rows: "
                "prepare the data with this model's tokenizer (prepare.tokenizer=<model>)"
            )
        limit = getattr(hf, "max_position_embeddings", None)
        if limit is not None and seq_len > limit:
            raise ConfigError(
                f"data.seq_len={seq_len} exceeds the model's max_position_embeddings={limit}: lower data.seq_len"
            )
        return hf
    shape = preset_shape(cfg.model.preset or "tiny")
    if cfg.train.method == "control":
        shape = control_shape(shape, vocab, cfg.relora.rank)
    positions = cfg.model.max_position_embeddings or seq_len
    if seq_len > positions:
        raise ConfigError(
            f"data.seq_len={seq_len} exceeds model.max_position_embeddings={positions}: lower data.seq_len or raise it"
        )
    return llama_config(shape, vocab, positions, eos_token_id=meta.get("eos_token_id"),
                        attn_implementation=attn, init_std=cfg.model.init_std)


def check_relora(cfg: RunConfig) -> tuple[bool, bool, int]:
    method, r, total = cfg.train.method, cfg.relora, cfg.train.total_steps
    if total < 1:
        raise ConfigError(f"train.total_steps={total} must be at least 1")
    adapters = method in ("lora", "relora")
    if not adapters:
        return False, False, 0
    check_reset_args(r.optimizer_reset, r.prune_ratio)
    if not 0.0 <= r.dropout < 1.0:
        raise ConfigError(f"relora.dropout={r.dropout} must be in [0, 1)")
    if r.warm_start_steps and r.warm_start_from:
        raise ConfigError("set only one of relora.warm_start_steps and relora.warm_start_from")
    start = r.warm_start_steps
    if r.warm_start_from:
        from ..weights import read_meta

        meta = read_meta(r.warm_start_from)
        if meta.get("phase") != "full":
            raise ConfigError(
                f"relora.warm_start_from={r.warm_start_from} is not a full-rank checkpoint: use one from a method=full run"
            )
        start = int(meta["step"])
    if start < 0 or start >= total:
        raise ConfigError(
            f"the ReLoRA phase would start at step {start} (relora.warm_start_steps or the warm_start_from "
            f"checkpoint's step), not before train.total_steps={total}: raise total_steps"
        )
    if method == "relora":
        phase = total - start
        if r.reset_every > phase:
            raise ConfigError(
                f"relora.reset_every={r.reset_every} is longer than the ReLoRA phase ({phase} steps = total_steps "
                f"- warm_start_steps), so no merge would happen: lower reset_every or raise train.total_steps"
            )
        tail = phase % r.reset_every
        if 0 < tail <= r.restart_warmup_steps:
            raise ConfigError(
                f"train.total_steps={total} ends {tail} steps into a cycle, inside its LR re-warm-up "
                f"({r.restart_warmup_steps} steps): make total_steps - warm_start_steps a multiple of "
                f"relora.reset_every={r.reset_every}"
            )
        # Builds the schedule once to surface its own checks (restart warm-up vs cycle).
        JaggedCosine(total, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio, restart_every=r.reset_every,
                     restart_warmup_steps=r.restart_warmup_steps, cycle_start=start)
    return True, method == "relora", start


def plan_run(cfg: RunConfig, world_size: int) -> RunPlan:
    adapters, merges, start = check_relora(cfg)
    if not 0 <= cfg.optim.warmup_steps < cfg.train.total_steps:
        raise ConfigError(
            f"optim.warmup_steps={cfg.optim.warmup_steps} must be below train.total_steps={cfg.train.total_steps}"
        )
    micro, accum, global_batch = batch_layout(cfg, world_size)
    ds = build_ds_config(cfg, world_size)
    meta = _read_data_meta(cfg.data.path)
    hf = build_hf_config(cfg, meta)
    if adapters:
        dims = [getattr(hf, k, None) for k in ("hidden_size", "intermediate_size")]
        limit = min(d for d in dims if d) if any(dims) else None
        if limit is not None and cfg.relora.rank > limit:
            raise ConfigError(
                f"relora.rank={cfg.relora.rank} exceeds the smallest wrapped dimension ({limit}) of this model: "
                f"set relora.rank to at most {limit}"
            )
    seq_tokens = int(meta["num_tokens"]["train"])
    samples = seq_tokens // cfg.data.seq_len
    if samples < global_batch:
        raise DataError(
            f"{cfg.data.path} has {samples} training sequences of {cfg.data.seq_len} tokens, fewer than one global "
            f"batch ({global_batch}): prepare more data or lower data.seq_len / the batch size"
        )
    return RunPlan(world_size, micro, accum, global_batch, ds, hf, meta, adapters, merges, start)
