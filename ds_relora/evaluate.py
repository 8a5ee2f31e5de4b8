"""``ds-relora eval``: validation loss and perplexity of a checkpoint or an exported model."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .errors import CheckpointError
from .weights import META


def load_any_model(path: str | Path):
    folder = Path(path)
    if (folder / META).is_file():
        from .export import load_merged_model

        return load_merged_model(folder)
    if (folder / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    raise CheckpointError(f"{folder} is neither a ds_relora checkpoint (meta.json) nor an HF model folder (config.json)")


@torch.no_grad()
def evaluate_model(model, data_dir: str | Path, seq_len: int, batch_size: int = 8, max_batches: int | None = None) -> dict:
    from .data import PackedDataset

    data = PackedDataset(data_dir, "validation", seq_len)
    n = len(data) if max_batches is None else min(len(data), max_batches * batch_size)
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        batch = torch.stack([data[i] for i in range(start, min(start + batch_size, n))])
        loss = model(input_ids=batch, labels=batch).loss.item()
        total += loss * batch.shape[0]
        count += batch.shape[0]
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "sequences": count, "tokens": count * seq_len}
