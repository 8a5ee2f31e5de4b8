"""LLaMA-shaped model presets and model construction.

Shapes of 60M-1.3B follow the ReLoRA paper's Table 1; 3B is OpenLLaMA-3B's shape and 7B is
LLaMA-7B's; tiny/9m/20m/35m are debug and CPU-benchmark sizes.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import torch

from .errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int


PRESETS: dict[str, Shape] = {
    "tiny": Shape(64, 172, 2, 4),
    "9m": Shape(128, 344, 4, 4),
    "20m": Shape(256, 688, 4, 4),
    "35m": Shape(384, 1024, 6, 6),
    "60m": Shape(512, 1376, 8, 8),
    "130m": Shape(768, 2048, 12, 12),
    "250m": Shape(768, 2560, 24, 16),
    "350m": Shape(1024, 2736, 24, 16),
    "1.3b": Shape(2048, 5461, 24, 32),
    "3b": Shape(3200, 8640, 26, 32),
    "7b": Shape(4096, 11008, 32, 32),
}

WRAPPED_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def preset_shape(name: str) -> Shape:
    key = name.lower()
    if key not in PRESETS:
        import difflib

        hint = difflib.get_close_matches(key, list(PRESETS), n=1, cutoff=0.0)
        raise ConfigError(
            f"unknown model preset '{name}': use one of {', '.join(PRESETS)}"
            + (f" (did you mean '{hint[0]}'?)" if hint else "")
        )
    return PRESETS[key]


def linear_shapes(shape: Shape) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each wrapped linear type in one decoder layer."""
    h, f = shape.hidden, shape.intermediate
    return {
        "q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
        "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f),
    }


def param_counts(shape: Shape, vocab_size: int, rank: int | None = None) -> dict[str, int]:
    """Analytic parameter counts: wrapped linears, the rest (embeddings, norms, head), adapters."""
    lin = sum(o * i for o, i in linear_shapes(shape).values()) * shape.layers
    other = 2 * vocab_size * shape.hidden + (2 * shape.layers + 1) * shape.hidden
    adapters = 0
    if rank:
        adapters = sum(rank * (o + i) for o, i in linear_shapes(shape).values()) * shape.layers
    return {"linear": lin, "other": other, "adapters": adapters, "total": lin + other}


def control_shape(shape: Shape, vocab_size: int, rank: int) -> Shape:
    """The largest same-depth shape whose total params do not exceed ReLoRA's trainable params.

    The paper's "control" baseline: a smaller full-rank model with as many trainable parameters
    as the ReLoRA model (adapters + embeddings, norms, head).
    """
    counts = param_counts(shape, vocab_size, rank)
    budget = counts["adapters"] + counts["other"]
    head_dim = shape.hidden // shape.heads
    best = None
    for heads in range(1, shape.heads + 1):
        hidden = heads * head_dim
        inter = int(round(shape.intermediate * hidden / shape.hidden))
        cand = Shape(hidden, max(inter, 1), shape.layers, heads)
        if param_counts(cand, vocab_size)["total"] <= budget:
            best = cand
    if best is None:
        raise ConfigError(
            f"no control model fits ReLoRA's {budget} trainable params at depth {shape.layers}: "
            "use a larger preset or a larger relora.rank"
        )
    return best


def resolve_attn_implementation(requested: str) -> str:
    if requested != "auto":
        if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("model.attn_implementation=flash_attention_2 needs flash-attn: pip install 'ds_relora[gpu]' or use sdpa")
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def llama_config(shape: Shape, vocab_size: int, max_positions: int, *, eos_token_id: int | None = None,
                 attn_implementation: str = "sdpa", init_std: float = 0.02):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        initializer_range=init_std,
        tie_word_embeddings=False,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
    )
    cfg._attn_implementation = attn_implementation
    return cfg


def build_model(hf_config, seed: int):
    """A freshly initialised causal LM; identical on every rank for the same seed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=hf_config._attn_implementation)
    return model.float()


def describe_params(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


def human(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}T"

