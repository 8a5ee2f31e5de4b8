"""The weights a checkpoint's model computes with, read from a checkpoint folder or an exported
HF model folder, one module at a time.

A training checkpoint ``step-N/`` holds the weights set (see :mod:`ds_relora.checkpoint.format`):
every parameter of the training model by its HF name, in fp32, adapters (``*.lora_A``/``*.lora_B``,
``*.mora_M`` and its ``*.mora_pattern``, ``*.galore_C`` and its ``*.galore_proj``) included, and
``meta.json`` with the method and what its fold needs (``lora_scale``, ``mora_compression``,
``galore_scale``). An exported model folder holds HF's ``model*.safetensors`` (adapters already
merged). Every method's fold is local to one module (W and that module's adapters), so the
effective weights stream module by module: no reader holds more than one layer's tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from ds_relora.checkpoint.format import META, CheckpointMeta, open_weights, read_meta
from ds_relora.methods import FORMAT_1_METHOD, get_method


def fold_adapters(state: dict[str, torch.Tensor], meta: CheckpointMeta) -> dict[str, torch.Tensor]:
    """The checkpoint's method folds its adapters into W (ReLoRA's B A, MoRA's M, GaLore's P C)
    with the settings it saved. Checkpoints without ``method`` (format 1) held ReLoRA/LoRA
    adapters or none."""

    return get_method(meta.method or FORMAT_1_METHOD).fold(state, meta.method_settings)


class EffectiveWeights:
    """The effective weights of a checkpoint or an export, folded one module at a time on
    request: ``get(name)`` reads only that module's W and adapters."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.meta = read_meta(folder) if (folder / META).is_file() else None
        self.tensors = open_weights(folder)
        self.modules: dict[str, list[str]] = {}
        for name in self.tensors.keys():
            self.modules.setdefault(name.rpartition(".")[0], []).append(name)

    def raw_names(self) -> list[str]:
        """Every saved tensor's name (adapters included: they are folded away by ``module``)."""
        return self.tensors.keys()

    def module(self, prefix: str) -> dict[str, torch.Tensor]:
        group = {n: self.tensors.get(n) for n in self.modules.get(prefix, [])}
        return fold_adapters(group, self.meta) if self.meta is not None else group

    def get(self, name: str) -> torch.Tensor | None:
        return self.module(name.rpartition(".")[0]).get(name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for prefix in self.modules:
            yield from self.module(prefix).items()


def iter_effective_weights(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight the model computes with (adapters folded in), one module's
    tensors at a time, from a checkpoint or an export."""
    return EffectiveWeights(folder).items()

