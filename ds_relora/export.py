"""Export a checkpoint of any ZeRO stage as a plain merged Hugging Face model (safetensors)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

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


def export_model(checkpoint: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write ``out_dir`` (config.json, model.safetensors, tokenizer) atomically."""
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise CheckpointError(f"--dtype {dtype} is not supported: use float32, bfloat16 or float16")
    model = load_merged_model(checkpoint, torch_dtype)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer = Path(checkpoint) / "tokenizer"
    if tokenizer.is_dir():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tokenizer)).save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
