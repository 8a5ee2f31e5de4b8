"""Full-rank training (``full``) and the smaller full-rank control (``control``)."""

from __future__ import annotations

from ds_relora.methods.base import Method, register
from ds_relora.models import control_shape


@register
class FullMethod(Method):
    """``train.method: full``: every parameter trained, plain cosine, nothing to fold."""

    name = "full"


@register
class ControlMethod(Method):
    """``train.method: control``: full-rank on a smaller model with ReLoRA's trainable count;
    its only decision is the shape (``models.control_shape``, applied to presets by
    ``plan.build_hf_config`` and the memory estimate)."""

    name = "control"
    needs_rank = True

    def model_shape(self, shape, vocab_size: int, rank: int):
        return control_shape(shape, vocab_size, rank)
