"""Reading consolidated weights from a checkpoint folder or an exported HF model folder.

A training checkpoint ``step-N/`` holds ``model_fp32.safetensors``: every parameter of the
training model by its HF name, in fp32, adapters (``*.lora_A``/``*.lora_B``, ``*.mora_M`` and its
``*.mora_pattern``, ``*.galore_C`` and its ``*.galore_proj``) included, and ``meta.json`` with
the method and what its fold needs (``lora_scale``, ``mora_compression``, ``galore_scale``). An exported model folder holds HF's
``model.safetensors`` (adapters already merged).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint_format import CONSOLIDATED, META, read_meta  # noqa: F401  (re-exported: the one reader of meta.json)
from .errors import CheckpointError


def merge_adapters(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Fold every ``X.lora_B @ X.lora_A`` (times ``scale``) into ``X.weight``; drop the adapters."""
    merged = {}
    for name, tensor in state.items():
        if name.endswith(".lora_A") or name.endswith(".lora_B"):
            continue
        if name.endswith(".weight") and name[: -len(".weight")] + ".lora_A" in state:
            prefix = name[: -len(".weight")]
            a = state[prefix + ".lora_A"].double()
            b = state[prefix + ".lora_B"].double()
            tensor = (tensor.double() + scale * (b @ a)).to(tensor.dtype)
        merged[name] = tensor
    return merged


def fold_adapters(state: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """The checkpoint's method folds its adapters into W (ReLoRA's B A, MoRA's M, GaLore's P C).
    Checkpoints without ``method`` (format 1) held ReLoRA/LoRA adapters or none."""
    from .methods import get_method

    return get_method(meta.get("method") or "relora").fold(state, meta)


def read_effective_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The weights the model computes with (adapters merged), from a checkpoint or an export."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / CONSOLIDATED).is_file():
        return fold_adapters(load_file(str(folder / CONSOLIDATED)), read_meta(folder))
    exported = sorted(folder.glob("model*.safetensors"))
    if exported:
        state: dict[str, torch.Tensor] = {}
        for f in exported:
            state.update(load_file(str(f)))
        return state
    raise CheckpointError(
        f"{folder} holds neither {CONSOLIDATED} (a ds_relora checkpoint) nor model*.safetensors (an export): "
        "point at a checkpoints/step-N folder or an exported model folder"
    )
