"""Model-state bytes of a LLaMA-shaped model trained full-rank or with ReLoRA adapters, next to
the FLOP and parameter counts, which live in the package (``ds_relora.estimate.flops``: the GPU check runs
from an installed wheel) and are re-exported here for the benchmarks.
"""

from __future__ import annotations

from ds_relora.estimate.flops import counts, flops_per_token, params, speed_ratio

__all__ = ["counts", "flops_per_token", "params", "speed_ratio", "simple_state_bytes", "per_rank_state_bytes"]


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
    stage 1 at gradient accumulation 1 as well (measured by ds_relora/estimate/memory.py), weights too on stage 3), ceil-divided like DeepSpeed's partitions."""
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
