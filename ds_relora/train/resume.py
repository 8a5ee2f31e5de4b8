"""The checkpoint a run resumes from, and every check that it fits this run, in one place.

:func:`ds_relora.train.plan.plan_run` calls :func:`check_resume` on the folder its resolver picked
(``ds-relora train`` and the sweep: meta and sizes, before launch; the workers: the collective
choice that each rank hashed), so a worker started by hand makes the same checks as the parent
and none is split between the two. The trainer then only acts on the :class:`ResumePoint`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from ds_relora.checkpoint.elastic import check_elastic, needs_elastic
from ds_relora.checkpoint.format import CheckpointMeta, check_resume_matches, hf_config_file
from ds_relora.config import RunConfig
from ds_relora.errors import CheckpointError
from ds_relora.methods import get_method
from ds_relora.run_folder import CONFIG


@dataclasses.dataclass
class ResumePoint:
    """The checkpoint a run resumes from, checked against the run."""

    folder: Path
    meta: CheckpointMeta
    # Written on another world size or ZeRO stage: restored from the whole-tensor sets
    # (checkpoint.elastic), not from DeepSpeed's per-rank files.
    elastic: bool


# Model-config keys that decide parameter shapes: a checkpoint must agree on all of them.
SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads")


def check_same_model(folder: Path, hf, fix: str) -> None:
    """Refuse a checkpoint whose HF config has other parameter shapes than ``hf``."""
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


# What an elastic resume (another world size or stage) may change: it keeps the global batch but
# may split it differently.
BATCH_SPLIT = ("micro_batch", "grad_accum")


def resume_layout(fingerprint: dict, seq_len: int, global_batch: int, micro_batch: int, grad_accum: int) -> dict:
    """This run's values of the :class:`CheckpointMeta` fields a resume must find unchanged
    (check_resume_matches); every checkpoint records them."""
    return {**fingerprint, "seq_len": seq_len, "global_batch": global_batch, "micro_batch": micro_batch,
            "grad_accum": grad_accum}


def check_resume(cfg: RunConfig, folder: Path, meta: CheckpointMeta, *, world_size: int, stage: int, adapters: bool,
                 hf_config, layout: dict) -> ResumePoint:
    """Refuse a checkpoint the workers could not load into this run (one line each): another
    number of ranks or stage without the stage-independent state, another method, another model
    shape or vocabulary, another adapter setting the method keeps (``Method.resume_keys``),
    other data, tokenizer or batch layout (``layout``: :func:`resume_layout` of a same-layout
    resume; an elastic one drops the split)."""
    folder = Path(folder)
    elastic = needs_elastic(meta, world_size, stage)
    if elastic:
        try:
            check_elastic(folder, meta, world_size, stage)
        except CheckpointError as exc:
            alt = (f", or start a new run from it with relora.warm_start_from={folder}" if meta.phase == "full"
                   and adapters else "")
            raise CheckpointError(f"{exc}{alt}") from None
    if meta.method is not None and meta.method != cfg.train.method:
        raise CheckpointError(
            f"{folder} is a train.method={meta.method} checkpoint but this run has train.method={cfg.train.method}: "
            f"resume with method {meta.method}, or use another train.run_dir"
        )
    check_same_model(folder, hf_config, "resume with the same model (model.preset / name_or_path) and prepared "
                     "data (data.path, its tokenizer), or use another train.run_dir")
    _check_adapter_settings(cfg, folder, meta, adapters)
    if elastic:
        layout = {k: v for k, v in layout.items() if k not in BATCH_SPLIT}
    check_resume_matches(folder, meta, layout)
    return ResumePoint(folder, meta, elastic)


def _check_adapter_settings(cfg: RunConfig, folder: Path, meta: CheckpointMeta, adapters: bool) -> None:
    """The adapters in an adapter-phase checkpoint were built with the run config it holds: the
    settings that shape them must not change (``Method.resume_keys``)."""
    config_file = folder / CONFIG
    if not (adapters and meta.phase == "adapters" and config_file.is_file()):
        return
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
