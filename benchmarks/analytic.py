"""Analytic FLOPs, parameter counts and model-state bytes of a LLaMA-shaped model trained
full-rank or with ReLoRA adapters; the benchmarks print these next to what they measure.

FLOPs per token of one training step (forward + backward), multiply-add = 2 FLOPs:

* a linear with N weights that is trained: 2N forward, 2N for the input gradient, 2N for the
  weight gradient = 6N;
* a frozen linear (ReLoRA's W): no weight gradient, so 4N (the input gradient is still needed:
  earlier layers and the embedding train);
* an adapter pair A (r x in), B (out x r): both train, 6 r (in + out);
* the LM head (h x V) trains in both methods: 6 h V; the embedding lookup is free;
* attention scores and the weighted sum: 12 L h s per token (PaLM's MFU convention, counting
  the full s x s square as most CPU/SDPA kernels compute it), the same for both methods.

Norms, activations, softmax, RoPE and the optimizer are left out (memory-bound, not FLOPs).
"""

from __future__ import annotations

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
    return method not in ("full", "control")


def flops_per_token(shape: Shape, vocab: int, seq_len: int, method: str, rank: int | None = None) -> dict[str, float]:
    c = counts(shape, vocab, rank if _adapted(method) else None)
    parts = {
        "linears": (6 if method == "full" else 4) * c["linear"],
        "adapters": 6 * c["adapters"],
        "head": 6 * c["head"],
        "attention": 12 * shape.layers * shape.hidden * seq_len,
    }
    parts["total"] = sum(parts.values())
    return parts


def speed_ratio(shape: Shape, vocab: int, seq_len: int, rank: int) -> float:
    """Expected ReLoRA / full tokens-per-second ratio if time were proportional to FLOPs."""
    full = flops_per_token(shape, vocab, seq_len, "full")["total"]
    relora = flops_per_token(shape, vocab, seq_len, "relora", rank)["total"]
    return full / relora


def params(shape: Shape, vocab: int, method: str, rank: int | None = None) -> dict[str, int]:
    """Total / trainable / frozen params of the model as built (adapters included for ReLoRA)."""
    c = counts(shape, vocab, rank if _adapted(method) else None)
    other = c["embedding"] + c["head"] + c["norms"]
    total = c["linear"] + c["adapters"] + other
    trainable = total if method == "full" else c["adapters"] + other
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


def simple_state_bytes(total: int, trainable: int, precision: str, stage: int) -> int:
    """Unpartitioned model-state bytes (whole model, one copy of everything).

    bf16 mixed precision: bf16 weights (2 per param) + bf16 grads (2) + fp32 master (4) + Adam
    m, v (8) per trainable = 2 per frozen + 16 per trainable. fp32: 4 per param + grads 4 + Adam
    8 per trainable, plus a separate fp32 master (4) on ZeRO 1-3, which clone their partition
    even in fp32 (stage 0 in fp32 updates the params in place): 4 per frozen + 16 (stage 0) or
    20 (stages 1-3) per trainable.
    """
    frozen = total - trainable
    if precision == "bf16":
        return 2 * frozen + 16 * trainable
    return 4 * frozen + (16 if stage == 0 else 20) * trainable


def per_rank_state_bytes(total: int, trainable: int, precision: str, stage: int, world: int) -> dict[str, int]:
    """Per-rank split of the same bytes under ZeRO partitioning (grads/master/Adam on stage >= 2,
    stage 1 at gradient accumulation 1 as well (measured by memory_estimate.py), weights too on stage 3), ceil-divided like DeepSpeed's partitions."""
    e = 2 if precision == "bf16" else 4

    def part(x: int, on: bool) -> int:
        return -(-x // world) if on else x

    master = 0 if (precision == "fp32" and stage == 0) else 4 * trainable
    out = {
        "weights": e * part(total, stage >= 3),
        "grads": e * part(trainable, stage >= 1),  # stage 1 at grad. accum. 1 keeps only its partition too
        "master": part(master, stage >= 1),
        "adam": 8 * part(trainable, stage >= 1),
    }
    out["total"] = sum(out.values())
    return out
