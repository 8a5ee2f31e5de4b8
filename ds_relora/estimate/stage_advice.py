"""Which ZeRO setting to train with: the fastest one whose per-GPU estimate fits the GPU.

Fastest first, from what each setting adds per step (measured on 2 CPU ranks at the 1.3B layer
shape, docs/results.md: relora/full 1.63x on ZeRO-0, 1.65x on ZeRO-2, 1.32x on ZeRO-3 before the
shared-input fusion):

* ZeRO 0, 1, 2 keep W whole on every GPU and move only trainable bytes (for ReLoRA: adapters,
  embeddings, norms, head): an all-reduce of gradients, or a reduce-scatter plus an all-gather of
  the updated params, about the same volume. 1 and 2 shard the optimizer state (2 the gradients
  too), so they fit more at nearly the same speed.
* ZeRO-3 also all-gathers every W, frozen ones included, in each forward and backward.
* Offload adds PCIe traffic every step and runs the optimizer on the CPU.
"""

from __future__ import annotations

from ds_relora.estimate.memory import GiB, MemoryEstimate, estimate_memory

# A fraction of the GPU kept free for the allocator's fragmentation, NCCL buffers and kernels'
# workspaces, which the estimate does not count.
HEADROOM = 0.9

OPTIONS = (
    ("ZeRO-0", dict(zero_stage=0)),
    ("ZeRO-1", dict(zero_stage=1)),
    ("ZeRO-2", dict(zero_stage=2)),
    ("ZeRO-3", dict(zero_stage=3)),
    ("ZeRO-3 + offload optimizer", dict(zero_stage=3, offload_optimizer=True)),
    ("ZeRO-3 + offload optimizer and params", dict(zero_stage=3, offload_optimizer=True, offload_params=True)),
)


def recommend_stage(gpu_memory_gib: float, **setting) -> tuple[list[tuple[str, MemoryEstimate]], str | None]:
    """Every option's estimate (fastest first) and the label of the fastest that fits, or None.

    ``setting``: :func:`estimate_memory`'s arguments except the stage and offload flags."""
    budget = gpu_memory_gib * GiB * HEADROOM
    rows, pick = [], None
    for label, stage in OPTIONS:
        est = estimate_memory(**{**setting, **stage})
        rows.append((label, est))
        if pick is None and est.total <= budget:
            pick = label
    return rows, pick


def format_advice(gpu_memory_gib: float, rows: list[tuple[str, MemoryEstimate]], pick: str | None) -> str:
    lines = [f"fastest setting that fits {gpu_memory_gib:g} GiB per GPU ({HEADROOM:.0%} usable):", "",
             "| setting | GiB per GPU | fits |", "|---|---:|:---:|"]
    budget = gpu_memory_gib * GiB * HEADROOM
    lines += [f"| {label} | {est.total / GiB:.2f} | {'yes' if est.total <= budget else 'no'} |" for label, est in rows]
    lines.append("")
    if pick is None:
        lines.append("nothing fits: lower the micro-batch, turn on activation checkpointing, or add GPUs")
    else:
        lines.append(f"recommended: {pick} (lower stages move less per step: ZeRO 0-2 move only trainable bytes, "
                     "ZeRO-3 also gathers every frozen W in each forward and backward, offload adds PCIe traffic)")
    return "\n".join(lines)
