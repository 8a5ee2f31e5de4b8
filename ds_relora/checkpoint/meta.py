"""A checkpoint's ``meta.json`` as one typed record: :class:`CheckpointMeta`, its one writer
(:meth:`CheckpointMeta.to_json`, called by :func:`ds_relora.checkpoint.format.write_meta`) and its
one reader (:func:`read_meta`).

Every consumer (the trainer's resume, the pre-launch plan, elastic restore, eval, export,
spectrum, the study tools) reads attributes of this record, never keys of the JSON, so a field's
name, type and the default an older format gets for it are written down once, here.

Formats 1-6 are read. A field an older format did not write gets the default below, which is
what the code of that time assumed when the key was missing. Keys this record does not name are
the method's own (``Method.meta``: ``lora_scale``, ``mora_compression``, ``galore_scale``) and
stay together in :attr:`CheckpointMeta.method_settings`, which the method's ``fold`` reads.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

from ds_relora.errors import CheckpointError

FORMAT_VERSION = 6
# Format 3 writes the weights and the moments as Hugging Face sharded sets, each shard by the rank
# that holds it; formats 1 and 2 had one file of each, written by rank 0 (and format 2 is resumed
# as well). Format 1 had no manifest or data fingerprint: its weights can still be read
# (eval/export/spectrum/warm start), it cannot be resumed. Format 4 is format 3 with whole-file
# hashes in the manifest. Format 5 is format 4 with the data position only here (DeepSpeed's
# client_state no longer carries a copy): code that read it from there refuses format 5 in one
# line instead of failing on a missing key. Format 6 drops DeepSpeed's own files (a second copy of
# the masters and moments): the whole-tensor sets are the only copy of the state, every resume
# restores through them, and meta.json carries the engine's counters DeepSpeed's files held.
WEIGHTS_READABLE_VERSIONS = (1, 2, 3, 4, 5, 6)
RESUMABLE_VERSIONS = (2, 3, 4, 5, 6)
# The first format without DeepSpeed's per-rank files: older ones resume at their own world size
# and stage through DeepSpeed's loader (it restores exactly what they hold).
SETS_ONLY_VERSION = 6
META = "meta.json"


@dataclasses.dataclass
class CheckpointMeta:
    """What a checkpoint folder says about itself (``meta.json``)."""

    ds_relora_version: Optional[str] = None
    """The ds_relora that wrote it (for a person reading the file; nothing checks it)."""
    step: int = 0
    """Optimizer updates completed over the whole run (both phases) when it was written."""
    phase: Optional[str] = None
    """``full`` (full-rank) or ``adapters`` (the method's low-rank phase); None in format 1."""
    phase_offset: int = 0
    """Global step where the current phase's engine started (its LR scheduler counts from there)."""
    relora_start: Optional[int] = None
    """Global step where the adapter phase starts; None (format 1): the run config's."""
    method: Optional[str] = None
    """``train.method``; None in format 1, whose adapters were ReLoRA/LoRA (or none)."""
    world_size: Optional[int] = None
    """Ranks of the run: DeepSpeed's own optimizer files resume only on as many."""
    zero_stage: Optional[int] = None
    """ZeRO stage of the run: DeepSpeed's own optimizer files resume only on the same one."""
    compute_dtype: Optional[str] = None
    """The precision the run computed in (``float32``, ``bfloat16``...): ``ds-relora eval``'s
    default autocast on a GPU. None before format 4 (eval then uses float32)."""
    method_settings: dict = dataclasses.field(default_factory=dict)
    """What the method's ``fold`` needs later (``Method.meta``), stored as top-level keys of
    meta.json (``lora_scale`` is always written, None for methods without it)."""
    consumed_samples: int = 0
    """Training samples consumed so far: the data position (with :attr:`data_state`)."""
    tokens_seen: int = 0
    """Training tokens seen so far (the metrics' ``tokens``)."""
    data_sha256: Optional[str] = None
    """Hash of the prepared data (its meta.json and shards): a resume must find the same data."""
    tokenizer_sha256: Optional[str] = None
    """Hash of the prepared data's tokenizer files: a resume must find the same tokenizer."""
    seq_len: Optional[int] = None
    """``data.seq_len`` of the run (also eval's default sequence length)."""
    global_batch: Optional[int] = None
    """Sequences per optimizer update: a resume must keep it (the data order depends on it)."""
    micro_batch: Optional[int] = None
    """Sequences per rank per forward: a same-layout resume must keep it."""
    grad_accum: Optional[int] = None
    """Micro-batches per update: a same-layout resume must keep it."""
    data_state: Optional[dict] = None
    """The batch iterator's whole state (``DistributedBatchIterator.state_dict``); absent before
    the elastic-resume change of format 2, when only :attr:`consumed_samples` was kept here."""
    optimizer_step: Optional[int] = None
    """Adam's step count of the current phase; None before the moments set existed (such a
    checkpoint cannot be resumed on another world size or stage)."""
    engine_counters: Optional[dict] = None
    """What DeepSpeed's own files held besides the tensors, restored on resume: ``global_steps``,
    ``global_samples``, ``skipped_steps`` (fp16 overflow skips), ``scheduler_epoch`` (the LR
    scheduler's ``last_epoch``: it does not step on a skipped update) and ``loss_scaler`` (the
    fp16 dynamic loss scaler's numbers, None without one). None before format 6: derived from
    :attr:`step` and :attr:`phase_offset` (no skipped steps)."""
    data_path: Optional[str] = None
    """``data.path`` of the run: ``ds-relora eval``'s default data."""
    params: Optional[dict] = None
    """Parameter counts of the model as trained (``total``, ``trainable``, ``frozen``)."""
    format_version: Optional[int] = None
    """The folder format (see :mod:`ds_relora.checkpoint.format`); set by ``write_meta``."""
    files: dict = dataclasses.field(default_factory=dict)
    """The manifest: relative path -> {size, hash} of every other file; set by ``write_meta``.
    Empty in format 1 (nothing to verify)."""

    def data_position(self) -> dict:
        """The batch iterator state to resume from (``DistributedBatchIterator.load_state_dict``).
        The one copy of the data position: every resumable format (2-5) has it here."""
        return dict(self.data_state) if self.data_state else {"consumed_samples": self.consumed_samples}

    def to_json(self) -> str:
        """``meta.json``'s text: the fields in their file order, the method's settings as top-level
        keys after ``compute_dtype`` (where format 4 has them)."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            if field.name == "method_settings":
                out.update({"lora_scale": None, **self.method_settings})
            else:
                out[field.name] = getattr(self, field.name)
        return json.dumps(out, indent=2)

    @classmethod
    def from_json_dict(cls, data: dict) -> "CheckpointMeta":
        """The record of a parsed meta.json; keys it does not name are the method's settings."""
        names = {f.name for f in dataclasses.fields(cls)} - {"method_settings"}
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, method_settings={k: v for k, v in data.items() if k not in names})


def read_meta(folder: str | Path, *, for_resume: bool = False) -> CheckpointMeta:
    """The ``meta.json`` of a checkpoint folder; one-line CheckpointError when missing, unreadable
    or of a format this version cannot read (``for_resume``: cannot resume)."""
    path = Path(folder) / META
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {META}: it is not a complete ds_relora checkpoint (pick another step-N folder)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is damaged ({type(exc).__name__}: {exc}): pick another step-N folder") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is damaged (not a JSON object): pick another step-N folder")
    version = data.get("format_version")
    readable = RESUMABLE_VERSIONS if for_resume else WEIGHTS_READABLE_VERSIONS
    if version not in readable:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        hint = ("upgrade ds_relora to read it" if newer else
                "eval/export it, or start a new run from it with relora.warm_start_from" if version in WEIGHTS_READABLE_VERSIONS
                else "it was not written by ds-relora train")
        formats = "/".join(map(str, readable))
        raise CheckpointError(f"{folder} has checkpoint format_version {version!r}; this ds_relora "
                              f"{'resumes' if for_resume else 'reads'} formats {formats}: {hint}")
    return CheckpointMeta.from_json_dict(data)
