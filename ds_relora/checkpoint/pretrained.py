"""The weights of a pretrained HF model, for continued pre-training (``model.from_pretrained``)."""

from __future__ import annotations

from pathlib import Path

import torch

from ds_relora.tensor_files import TensorSet


def pretrained_weights(name_or_path: str):
    """The weights of a pretrained HF model (a local folder or a hub name), read per tensor from
    its safetensors files, so that each rank only ever holds one tensor beyond its shard. A model
    published only as ``pytorch_model*.bin`` is loaded whole once, as ``transformers`` does."""

    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        from huggingface_hub import snapshot_download  # noqa: PLC0415  (the hub client is needed only for hub names)

        folder = Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    if any(folder.glob("*.safetensors")):
        return TensorSet(folder, "model")
    from transformers import AutoModelForCausalLM  # noqa: PLC0415  (transformers takes seconds to import; only code that builds a model needs it)

    model = AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    return _DictSet({n: p.detach() for n, p in model.named_parameters()}, str(folder))


class _DictSet(dict):
    """A dict of tensors with the ``folder`` a TensorSet names (for messages)."""

    def __init__(self, tensors: dict, folder: str):
        super().__init__(tensors)
        self.folder = folder
