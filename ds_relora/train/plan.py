"""Everything a run needs that can be checked before any step: one function, ``plan_run``.

``plan_run`` validates the run config against the data, the model and the world size, picks the
checkpoint to resume from (or the warm-start checkpoint to start from) and checks that it fits
this run, and returns the derived numbers and those decisions as a :class:`RunPlan`. The parent
``ds-relora train`` and ``ds-relora sweep`` call it before launching; every worker calls it
once more (a worker may also be started by hand, e.g. under srun), with the collective resume
choice, and the trainer then acts on the plan without deciding anything again.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ds_relora.checkpoint.choose import resolve_resume
from ds_relora.checkpoint.format import CheckpointMeta, data_fingerprint, expected_checkpoint_bytes, read_meta
from ds_relora.config import RunConfig
from ds_relora.data import read_data_meta
from ds_relora.errors import ConfigError, DataError
from ds_relora.methods import get_method
from ds_relora.methods.schedule import JaggedCosine
from ds_relora.models import llama_config, preset_shape, resolve_attn_implementation, vocab_block
from ds_relora.train.engine import check_compile_backend
from ds_relora.train.resume import ResumePoint, check_resume, check_same_model, resume_layout
from ds_relora.zero.ds_config import batch_layout, build_ds_config, compute_dtype, zero_stage
from ds_relora.zero.optim_reset import check_reset_args


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
    fingerprint: dict       # data_fingerprint(data.path): written into every checkpoint, matched on resume
    resume: Optional[ResumePoint] = None        # the checkpoint this run resumes from, checked
    warm_start: Optional[CheckpointMeta] = None  # relora.warm_start_from's meta (a full-rank checkpoint)
    vocab_block: Optional[int] = None  # model.split_vocab: elements per row block of the embedding and head

    def layout(self, seq_len: int) -> dict:
        """What a checkpoint of this run records and a resume must find unchanged."""
        return resume_layout(self.fingerprint, seq_len, self.global_batch, self.micro_batch, self.grad_accum)


# Picks the checkpoint to resume from: (train.resume, train.run_dir) -> step-N folder or None.
Resolver = Callable[[Optional[str], Path], Optional[Path]]


def resolve_before_launch(resume: str | None, run_dir: Path) -> Path | None:
    """The parent's choice: meta.json and sizes only; the ranks hash the files (each its share)
    before they load them, and may still fall back to an older checkpoint."""
    return resolve_resume(resume, run_dir, hashes=False)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _load_hf_config(name_or_path: str):
    from transformers import AutoConfig  # noqa: PLC0415  (transformers takes seconds to import; only code that builds a model needs it)

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


def check_relora(cfg: RunConfig, zero_stage: int = 0) -> tuple[bool, bool, int, CheckpointMeta | None]:
    """The method phase's settings (any adapter or projection method): returns (adapters, merges, start step,
    the warm-start checkpoint's meta). ``train.total_steps >= 1`` and the dropout range are the
    config's own checks (config.py)."""

    r, total = cfg.relora, cfg.train.total_steps
    method = get_method(cfg.train.method)
    if not (method.adapters or method.projects):
        return False, False, 0, None
    method.validate(cfg, zero_stage)
    check_reset_args(r.optimizer_reset, r.prune_ratio)
    if r.warm_start_steps and r.warm_start_from:
        raise ConfigError("set only one of relora.warm_start_steps and relora.warm_start_from")
    start, warm = r.warm_start_steps, None
    if r.warm_start_from:
        warm = read_meta(r.warm_start_from)
        if warm.phase != "full":
            raise ConfigError(
                f"relora.warm_start_from={r.warm_start_from} is not a full-rank checkpoint: use one from a method=full run"
            )
        start = int(warm.step)
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
    return True, method.merges, start, warm


def plan_run(cfg: RunConfig, world_size: int, *, resolve: Resolver = resolve_before_launch) -> RunPlan:
    """Every check of a run before its first step, and the plan the workers act on. ``resolve``
    picks the checkpoint of ``train.resume`` (the workers pass their collective, hashing
    choice); the checks on it are the same whoever calls."""

    ds = build_ds_config(cfg, world_size, writes_base=get_method(cfg.train.method).writes_base)
    adapters, merges, start, warm = check_relora(cfg, zero_stage(ds))
    if not 0 <= cfg.optim.warmup_steps < cfg.train.total_steps:
        raise ConfigError(
            f"optim.warmup_steps={cfg.optim.warmup_steps} must be below train.total_steps={cfg.train.total_steps}"
        )
    if cfg.train.compile:
        check_compile_backend(cfg.train.compile_backend)
    micro, accum, global_batch = batch_layout(cfg, world_size)
    meta = read_data_meta(cfg.data.path)
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
    plan = RunPlan(world_size, micro, accum, global_batch, ds, hf, meta, adapters, merges, start,
                   data_fingerprint(cfg.data.path), warm_start=warm, vocab_block=split_vocab_block(cfg, hf))
    folder = resolve(cfg.train.resume, Path(cfg.train.run_dir))
    if folder is not None:
        plan.resume = check_resume(cfg, folder, read_meta(folder, for_resume=True), world_size=world_size,
                                   stage=zero_stage(ds), adapters=adapters, hf_config=hf,
                                   layout=plan.layout(cfg.data.seq_len))
    return plan


def split_vocab_block(cfg: RunConfig, hf) -> int | None:
    """Elements per row block of the embedding and head (``model.split_vocab``: ``models.vocab_block``);
    None when unsplit."""
    if not cfg.model.split_vocab:
        return None
    if getattr(hf, "tie_word_embeddings", False):
        raise ConfigError("model.split_vocab needs an untied embedding and head, and this model ties them "
                          "(tie_word_embeddings): set model.split_vocab false")
    return vocab_block(hf.hidden_size)


def _meta_model(hf):
    """The run's model built on the meta device: real module tree and shapes, no memory, no init."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415  (transformers takes seconds to import; only code that builds a model needs it)

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

    from transformers.pytorch_utils import Conv1D  # noqa: PLC0415  (transformers takes seconds to import; only code that builds a model needs it)

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


def expected_save_bytes(cfg: RunConfig, plan: RunPlan) -> int:
    """About what one checkpoint of this run takes on disk (its largest phase's), for the free
    space check before launch: the model is built on the meta device (no memory)."""

    model = _meta_model(plan.hf_config)
    full_phase = not plan.adapters or (plan.relora_start > 0 and not cfg.relora.warm_start_from)
    if not full_phase:
        get_method(cfg.train.method).wrap(model, cfg, seed=cfg.train.seed)
    return expected_checkpoint_bytes(model)
