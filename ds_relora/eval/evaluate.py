"""``ds-relora eval``: validation loss and perplexity of a checkpoint or an exported model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ds_relora.checkpoint.export import load_merged_model
from ds_relora.checkpoint.meta import read_meta
from ds_relora.checkpoint.weights import META
from ds_relora.data import PackedDataset
from ds_relora.errors import CheckpointError, UserError
from ds_relora.quiet import quiet_transformers_loading


def load_any_model(path: str | Path):
    folder = Path(path)
    if (folder / META).is_file():
        return load_merged_model(folder)
    if (folder / "config.json").is_file():
        from transformers import AutoModelForCausalLM  # noqa: PLC0415  (transformers takes seconds to import; only code that builds a model needs it)

        quiet_transformers_loading()
        return AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    raise CheckpointError(f"{folder} is neither a ds_relora checkpoint (meta.json) nor an HF model folder (config.json)")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_dtype(folder: str | Path) -> str | None:
    """The precision a checkpoint's run computed in (its meta.json), or an exported model's
    weights are stored in (its config.json); None when neither says."""

    folder = Path(folder)
    if (folder / META).is_file():
        return read_meta(folder).compute_dtype
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("dtype") or config.get("torch_dtype")
    return value if value in DTYPES else None


def eval_device_and_dtype(device: str = "auto", dtype: str = "auto", trained_dtype: str | None = None
                          ) -> tuple[torch.device, torch.dtype]:
    """Where ``ds-relora eval`` runs and the dtype its forward autocasts to. ``auto``: CUDA when
    there is one, else the CPU; on CUDA the run's own precision (a bf16 run is evaluated in bf16,
    as its in-training evals were), on the CPU fp32."""
    if device == "auto":
        target = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        target = torch.device(device)
        if target.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is available here; use --device cpu (or auto)")
    if dtype == "auto":
        chosen = DTYPES.get(trained_dtype or "float32", torch.float32) if target.type == "cuda" else torch.float32
    elif dtype in DTYPES:
        chosen = DTYPES[dtype]
    else:
        raise UserError(f"--dtype {dtype} is not supported: use auto, {', '.join(DTYPES)}")
    return target, chosen


@torch.no_grad()
def evaluate_model(model, data_dir: str | Path, seq_len: int, batch_size: int = 8, max_batches: int | None = None,
                   *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """Mean validation loss over the split's first sequences. ``device`` None: where the model
    is; ``dtype`` other than fp32: the forward runs under autocast to it (weights stay fp32)."""

    device = next(model.parameters()).device if device is None else torch.device(device)
    model = model.to(device)
    pin = device.type == "cuda"
    data = PackedDataset(data_dir, "validation", seq_len)
    n = len(data) if max_batches is None else min(len(data), max_batches * batch_size)
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    for start in range(0, n, batch_size):
        batch = torch.stack([data[i] for i in range(start, min(start + batch_size, n))])
        # Pinned + non_blocking: the next batch is read from disk while the GPU runs this one.
        batch = (batch.pin_memory() if pin else batch).to(device, non_blocking=True)
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        total += loss.double() * batch.shape[0]
        count += batch.shape[0]
    loss = total.item() / count  # the one host read
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "sequences": count, "tokens": count * seq_len}
