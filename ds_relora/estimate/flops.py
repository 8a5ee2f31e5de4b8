"""Analytic FLOPs and parameter counts of a LLaMA-shaped model trained full-rank or with
adapters (ReLoRA and the other adapter methods); the GPU check's MFU and the benchmarks use them.

FLOPs per token of one training step (forward + backward), multiply-add = 2 FLOPs:

* a linear with N weights that is trained: 2N forward, 2N for the input gradient, 2N for the
  weight gradient = 6N;
* a frozen linear (ReLoRA's W): no weight gradient, so 4N (the input gradient is still needed:
  earlier layers and the embedding train);
* an adapter pair A (r x in), B (out x r): both train, 6 r (in + out);
* the LM head (h x V) trains in both methods: 6 h V; the embedding lookup is free;
* causal attention: the token at position i meets i + 1 keys, (s + 1) / 2 on average; scores
  and the weighted sum cost 4 h FLOPs per key and layer forward, 3x that with backward:
  6 L h (s + 1) per token, the same for every method. Counting the full s x s square instead
  (12 L h s, PaLM's convention) credits the masked half that flash kernels skip and overstates
  MFU.

Norms, activations, softmax, RoPE and the optimizer are left out (memory-bound, not FLOPs).
"""

from __future__ import annotations

from ds_relora.methods import DEFAULT_METHOD, get_method
from ds_relora.models import Shape, linear_shapes


def counts(shape: Shape, vocab: int, rank: int | None) -> dict[str, int]:
    """Parameter counts: wrapped linears, adapters, embedding, head, norms."""
    lin = sum(o * i for o, i in linear_shapes(shape).values()) * shape.layers
    adapters = sum(rank * (o + i) for o, i in linear_shapes(shape).values()) * shape.layers if rank else 0
    h = shape.hidden
    return {"linear": lin, "adapters": adapters, "embedding": vocab * h, "head": vocab * h,
            "norms": (2 * shape.layers + 1) * h}


def _adapted(method: str) -> bool:
    # Every adapter method trains about r(out+in) params per wrapped linear (MoRA's r̂², GaLore's C
    # plus its projector) and skips the frozen W's weight-gradient GEMM: ReLoRA's counts apply.
    # A full-rank method (full, control on its own smaller shape) trains every linear.
    return get_method(method).adapters


def attention_flops_per_token(shape: Shape, seq_len: int) -> int:
    """Causal attention scores + weighted sum, forward and backward, averaged over positions."""
    return 6 * shape.layers * shape.hidden * (seq_len + 1)


def flops_per_token(shape: Shape, vocab: int, seq_len: int, method: str, rank: int | None = None) -> dict[str, float]:
    c = counts(shape, vocab, rank if _adapted(method) else None)
    parts = {
        "linears": (4 if _adapted(method) else 6) * c["linear"],
        "adapters": 6 * c["adapters"],
        "head": 6 * c["head"],
        "attention": attention_flops_per_token(shape, seq_len),
    }
    parts["total"] = sum(parts.values())
    return parts


def speed_ratio(shape: Shape, vocab: int, seq_len: int, rank: int, method: str = DEFAULT_METHOD) -> float:
    """Expected ``method`` (ReLoRA by default) / full tokens-per-second ratio if time were
    proportional to FLOPs."""
    full = flops_per_token(shape, vocab, seq_len, "full")["total"]
    low_rank = flops_per_token(shape, vocab, seq_len, method, rank)["total"]
    return full / low_rank


def params(shape: Shape, vocab: int, method: str, rank: int | None = None) -> dict[str, int]:
    """Total / trainable / frozen params of the model as built (adapters included for ReLoRA)."""
    c = counts(shape, vocab, rank if _adapted(method) else None)
    other = c["embedding"] + c["head"] + c["norms"]
    total = c["linear"] + c["adapters"] + other
    trainable = c["adapters"] + other if _adapted(method) else total
    return {"total": total, "trainable": trainable, "frozen": total - trainable}
