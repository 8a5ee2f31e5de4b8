"""Everything a run needs that can be checked before any worker starts.

``plan_run`` validates the run config against the data, the model and the world size and
returns the derived numbers; the parent ``ds-relora train`` calls it before launching, and
every worker calls it again (a worker may also be started by hand, e.g. under srun).
"""

from __future__ import annotations

import dataclasses

from pathlib import Path

from ds_relora.config import RunConfig
from ds_relora.errors import CheckpointError, ConfigError, DataError
from ds_relora.models import llama_config, preset_shape, resolve_attn_implementation
from ds_relora.zero.optim_reset import check_reset_args
from ds_relora.methods import get_method
from ds_relora.methods.schedule import JaggedCosine
from ds_relora.zero.ds_config import batch_layout, build_ds_config


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
    from ds_relora.data import read_meta

    return read_meta(path)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _load_hf_config(name_or_path: str):
    from transformers import AutoConfig

    local = Path(name_or_path).expanduser()
    if name_or_path.startswith(("/", ".", "~")) and not local.is_dir():
        raise ConfigError(
            f"model.name_or_path={name_or_path!r} is not an existing folder: point it at a folder holding an HF "
            "config.json, give a hub model name (org/name), or use model.preset"
        )
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError) as exc:  # missing folder/file, unknown hub name, no network, bad model_type
        raise ConfigError(
            f"model.name_or_path={name_or_path!r} cannot be loaded ({_first_line(exc)}): set it to a local folder "
            "holding an HF config.json or to a hub model name (reachable from this node), or use model.preset"
        ) from None


def build_hf_config(cfg: RunConfig, meta: dict, compute_dtype=None):
    """The model's HF config; ``compute_dtype`` (the resolved DeepSpeed config's) decides what
    ``attn_implementation: auto`` picks."""
    vocab = int(meta["vocab_size"])
    seq_len = cfg.data.seq_len
    attn = resolve_attn_implementation(cfg.model.attn_implementation, compute_dtype)
    if cfg.model.name_or_path:
        hf = _load_hf_config(cfg.model.name_or_path)
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
    shape = get_method(cfg.train.method).model_shape(preset_shape(cfg.model.preset or "tiny"), vocab, cfg.relora.rank)
    positions = cfg.model.max_position_embeddings or seq_len
    if seq_len > positions:
        raise ConfigError(
            f"data.seq_len={seq_len} exceeds model.max_position_embeddings={positions}: lower data.seq_len or raise it"
        )
    return llama_config(shape, vocab, positions, eos_token_id=meta.get("eos_token_id"),
                        attn_implementation=attn, init_std=cfg.model.init_std)


def check_relora(cfg: RunConfig, zero_stage: int = 0) -> tuple[bool, bool, int]:
    """The adapter phase's settings (any adapter method): returns (adapters, merges, start step)."""

    r, total = cfg.relora, cfg.train.total_steps
    method = get_method(cfg.train.method)
    if total < 1:
        raise ConfigError(f"train.total_steps={total} must be at least 1")
    if not method.adapters:
        return False, False, 0
    method.validate(cfg, zero_stage)
    check_reset_args(r.optimizer_reset, r.prune_ratio)
    if not 0.0 <= r.dropout < 1.0:
        raise ConfigError(f"relora.dropout={r.dropout} must be in [0, 1)")
    if r.warm_start_steps and r.warm_start_from:
        raise ConfigError("set only one of relora.warm_start_steps and relora.warm_start_from")
    start = r.warm_start_steps
    if r.warm_start_from:
        from ds_relora.checkpoint.weights import read_meta

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
    if method.merges:
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
    return True, method.merges, start


def plan_run(cfg: RunConfig, world_size: int) -> RunPlan:
    from ds_relora.zero.ds_config import compute_dtype, zero_stage

    ds = build_ds_config(cfg, world_size, writes_base=get_method(cfg.train.method).writes_base)
    adapters, merges, start = check_relora(cfg, zero_stage(ds))
    if not 0 <= cfg.optim.warmup_steps < cfg.train.total_steps:
        raise ConfigError(
            f"optim.warmup_steps={cfg.optim.warmup_steps} must be below train.total_steps={cfg.train.total_steps}"
        )
    if cfg.train.compile:
        from ds_relora.train.engine import check_compile_backend

        check_compile_backend(cfg.train.compile_backend)
    micro, accum, global_batch = batch_layout(cfg, world_size)
    meta = _read_data_meta(cfg.data.path)
    hf = build_hf_config(cfg, meta, compute_dtype(ds))
    if adapters:
        get_method(cfg.train.method).check_model(cfg, hf)
        check_adapter_phase(cfg, hf)
        if cfg.relora.warm_start_from:
            check_same_model(Path(cfg.relora.warm_start_from), hf, "start from a checkpoint of the same model "
                             "(model.preset / name_or_path) trained on the same prepared data (data.path)")
    seq_tokens = int(meta["num_tokens"]["train"])
    samples = seq_tokens // cfg.data.seq_len
    if samples < global_batch:
        raise DataError(
            f"{cfg.data.path} has {samples} training sequences of {cfg.data.seq_len} tokens, fewer than one global "
            f"batch ({global_batch}): prepare more data or lower data.seq_len / the batch size"
        )
    return RunPlan(world_size, micro, accum, global_batch, ds, hf, meta, adapters, merges, start)


def _meta_model(hf):
    """The run's model built on the meta device: real module tree and shapes, no memory, no init."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf, attn_implementation=hf._attn_implementation)
    except (ValueError, KeyError) as exc:  # e.g. a config class that has no causal-LM head
        raise ConfigError(
            f"cannot build a causal LM from {getattr(hf, 'model_type', '?')!r} config ({_first_line(exc)}): "
            "set model.name_or_path to a decoder-only causal LM (e.g. Llama) or use model.preset"
        ) from None


def check_adapter_phase(cfg: RunConfig, hf) -> int:
    """Wrap the meta-device model exactly as the switch will, so every adapter mistake (regex matching
    nothing, rank too large, unsupported layer type) fails before the warm start spends any step.
    Returns the number of wrapped layers."""
    import re

    from torch import nn
    from transformers.pytorch_utils import Conv1D


    r = cfg.relora
    model = _meta_model(hf)
    patterns = [re.compile(t) for t in r.target_modules]
    conv = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    linear_hits = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(p.search(n) for p in patterns)]
    if conv and (not linear_hits or any(p.search(n) for n in conv for p in patterns)):
        raise ConfigError(
            f"model {hf.model_type!r} uses transformers Conv1D projections ({conv[0]}, ...; GPT-2 style), which "
            f"train.method={cfg.train.method} cannot wrap (it wraps nn.Linear): use a LLaMA-style model "
            "(model.preset, or a Llama/Mistral/Qwen model.name_or_path)"
        )
    modules = get_method(cfg.train.method).wrap(model, cfg, seed=cfg.train.seed)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("relora.freeze_modules freezes every parameter, adapters included: narrow its regexes")
    return len(modules)


# Model-config keys that decide parameter shapes: a checkpoint must agree on all of them.
SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads")


def check_same_model(folder: Path, hf, fix: str) -> None:
    """Refuse a checkpoint whose HF config has other parameter shapes than ``hf``."""
    import json

    from ds_relora.checkpoint.format import hf_config_file

    try:
        hf_file = hf_config_file(folder)
    except CheckpointError:
        return
    try:
        saved = json.loads(hf_file.read_text())
    except ValueError:
        raise CheckpointError(f"{hf_file} is not valid JSON: the checkpoint is damaged; use another step-N") from None
    ours = hf.to_dict()
    diff = [k for k in SHAPE_KEYS if k in saved and k in ours and saved[k] != ours[k]]
    if diff:
        theirs = ", ".join(f"{k}={saved[k]}" for k in diff)
        mine = ", ".join(f"{k}={ours[k]}" for k in diff)
        raise CheckpointError(f"{folder} holds a model with {theirs} but this run builds {mine}: {fix}")


def check_resume_fits(cfg: RunConfig, plan: RunPlan, folder: Path) -> None:
    """Refuse, before launch, a checkpoint that the workers could not load into this run: another
    number of ranks, another method, another model shape or vocabulary, another adapter rank."""
    import yaml

    from ds_relora.checkpoint.weights import read_meta

    folder = Path(folder)
    meta = read_meta(folder)
    from ds_relora.zero.ds_config import zero_stage
    from ds_relora.checkpoint.elastic import check_elastic, needs_elastic

    if needs_elastic(meta, plan.world_size, zero_stage(plan.ds_config)):
        try:
            check_elastic(folder, meta, plan.world_size, zero_stage(plan.ds_config))
        except CheckpointError as exc:
            alt = (f", or start a new run from it with relora.warm_start_from={folder}" if meta.get("phase") == "full"
                   and plan.adapters else "")
            raise CheckpointError(f"{exc}{alt}") from None
    method = meta.get("method")
    if method is not None and method != cfg.train.method:
        raise CheckpointError(
            f"{folder} is a train.method={method} checkpoint but this run has train.method={cfg.train.method}: "
            f"resume with method {method}, or use another train.run_dir"
        )
    check_same_model(folder, plan.hf_config, "resume with the same model (model.preset / name_or_path) and prepared "
                     "data (data.path, its tokenizer), or use another train.run_dir")
    config_file = folder / "config.yaml"
    if plan.adapters and meta.get("phase") == "adapters" and config_file.is_file():

        try:
            saved = yaml.safe_load(config_file.read_text()) or {}
        except yaml.YAMLError:
            saved = {}
        for dotted in get_method(cfg.train.method).resume_keys:
            section, key = dotted.split(".")
            theirs, ours = saved.get(section, {}).get(key, None), getattr(getattr(cfg, section), key)
            if key in saved.get(section, {}) and theirs != ours:
                raise CheckpointError(
                    f"{folder} has adapters with {dotted}={theirs} but this run sets {ours}: resume with the same "
                    f"{dotted}, or use another train.run_dir"
                )


def expected_save_bytes(cfg: RunConfig, plan: RunPlan) -> int:
    """About what one checkpoint of this run takes on disk (its largest phase's), for the free
    space check before launch: the model is built on the meta device (no memory)."""
    from ds_relora.checkpoint.format import expected_checkpoint_bytes

    model = _meta_model(plan.hf_config)
    full_phase = not plan.adapters or (plan.relora_start > 0 and not cfg.relora.warm_start_from)
    if not full_phase:

        get_method(cfg.train.method).wrap(model, cfg, seed=cfg.train.seed)
    return expected_checkpoint_bytes(model)
