"""Export a checkpoint of any ZeRO stage as a plain merged Hugging Face model (safetensors)."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import torch

from . import __version__
from .checkpoint_format import fsync_dir, fsync_tree, public_mode
from .errors import CheckpointError
from .weights import read_effective_weights, read_meta


def load_merged_model(checkpoint: str | Path, dtype: torch.dtype = torch.float32):
    """The checkpoint's model with every adapter folded into its base weight."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(checkpoint)
    read_meta(folder)
    config_file = folder / "hf_config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder} has no hf_config.json: it was not written by ds-relora train")
    config = AutoConfig.from_pretrained(str(config_file))
    model = AutoModelForCausalLM.from_config(config, attn_implementation=getattr(config, "_attn_implementation", None) or "sdpa")
    state = read_effective_weights(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings legitimately appear once in the state dict.
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not match its hf_config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(dtype).eval()


EXPORT_MARKER = "ds_relora_export.json"


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file, not a folder: pass a folder path for the exported model")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_MARKER).is_file() and not overwrite:
        raise CheckpointError(
            f"--out {out} is a non-empty folder that is not a ds-relora export: pick another folder, "
            "or pass --overwrite to replace its contents"
        )


def export_model(checkpoint: str | Path, out_dir: str | Path, dtype: str = "float32", *, overwrite: bool = False) -> Path:
    """Write ``out_dir`` (config.json, model.safetensors, tokenizer) atomically.

    An existing ``out_dir`` is replaced only when it is empty, a previous export (it holds
    ``ds_relora_export.json``) or ``overwrite`` is set; the new export is built beside it and
    swapped in, so an interrupted export leaves the old one (or nothing) and no temp folder."""
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise CheckpointError(f"--dtype {dtype} is not supported: use float32, bfloat16 or float16")
    out = Path(out_dir)
    _check_out(out, overwrite)
    if not out.parent.is_dir():
        raise CheckpointError(f"--out {out}: the parent folder {out.parent} does not exist: create it first")
    model = load_merged_model(checkpoint, torch_dtype)
    tag = f"{socket.gethostname()}.{os.getpid()}"
    for stale in out.parent.glob(out.name + ".tmp-export*"):  # left by an export that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp, aside = out.with_name(f"{out.name}.tmp-export.{tag}"), out.with_name(f"{out.name}.tmp-export-old.{tag}")
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer = Path(checkpoint) / "tokenizer"
        if tokenizer.is_dir():
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(str(tokenizer)).save_pretrained(str(tmp))
        (tmp / EXPORT_MARKER).write_text(json.dumps({"checkpoint": str(Path(checkpoint).resolve()), "dtype": dtype,
                                                     "ds_relora_version": __version__}, indent=2))
        for path in tmp.rglob("*"):
            if path.is_file():
                public_mode(path)  # safetensors writes 0600
        fsync_tree(tmp)
        if out.exists():
            os.rename(out, aside)
        os.rename(tmp, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)
    return out
