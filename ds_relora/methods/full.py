"""Full-rank training (``full``) and the smaller full-rank control (``control``)."""

from __future__ import annotations

from ds_relora.methods.base import Method, register


@register
class FullMethod(Method):
    """``train.method: full``: every parameter trained, plain cosine, nothing to fold."""

    name = "full"


@register
class ControlMethod(Method):
    """``train.method: control``: full-rank on a smaller model with ReLoRA's trainable count;
    its only decision is the shape (``models.control_shape``, applied by ``plan.build_hf_config``)."""

    name = "control"
