"""Host memory of a ZeRO-3 (or ZeRO-2) build, engine initialisation and first steps, on rank 0 (CPU ranks).

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 benchmarks/lifecycle/engine_init.py --preset 7b --layers 2 \\
        [--sub-group-size 1e9] [--all-trainable] [--trace] [--steps 2] [--split-vocab] [--stage 2]

Prints rank 0's resident set (``rss``) and its high-water mark since the previous line (``hwm``,
reset through ``/proc/self/clear_refs``) after: the start, ``build_model`` (partitioned
construction and the streamed initialisation) and ``deepspeed.initialize`` with the embedding
and head trainable (``--all-trainable``: every param, a full-rank run; fused AdamW), under
``ds_configs/zero3.json`` with ``--sub-group-size`` (``--stage 2``: ``zero2.json``, the whole model
built on every rank; ``--split-vocab``: the embedding and head in row blocks). ``--trace`` also prints a line at each of
DeepSpeed's own memory checkpoints inside the initialisation (its ``see_memory_usage`` calls,
which print nothing unless forced). ``--steps N`` then runs N steps of one 32-token sequence, a
line after each forward, backward and step, and at the end drops the reduce bucket ZeRO-3 keeps
(``ipg_buckets``) to show what it holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) // 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="7b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--sub-group-size", type=float)
    ap.add_argument("--all-trainable", action="store_true")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--split-vocab", action="store_true", help="the embedding and head in row blocks (model.split_vocab)")
    ap.add_argument("--stage", type=int, default=3, choices=[2, 3], help="ZeRO stage (2: the whole model built on every rank)")
    ap.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = ap.parse_args()

    import deepspeed
    import torch

    from ds_relora import models
    from ds_relora.worker import return_freed_host_memory

    return_freed_host_memory()  # as a training rank does
    deepspeed.init_distributed("gloo")
    rank = int(os.environ.get("RANK", 0))

    def report(tag: str) -> None:
        if rank == 0:
            print(f"{tag}: rss {status('VmRSS'):,} MiB, hwm since the last line {status('VmHWM'):,} MiB", flush=True)
        Path("/proc/self/clear_refs").write_text("5")

    shape = dataclasses.replace(models.preset_shape(args.preset), layers=args.layers)
    ds = json.loads((REPO / "ds_configs" / f"zero{args.stage}.json").read_text())
    ds.pop("bf16", None)
    ds.update({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1})
    if args.stage == 3:
        ds["zero_optimization"].update({"stage3_max_live_parameters": int(1e8), "stage3_max_reuse_distance": int(1e8)})
    else:  # the lifecycle table's buckets
        ds["zero_optimization"].update({"reduce_bucket_size": int(5e7), "allgather_bucket_size": int(5e7)})
    if args.sub_group_size:
        ds["zero_optimization"]["sub_group_size"] = int(args.sub_group_size)
    if args.trace:
        import deepspeed.runtime.engine
        import deepspeed.runtime.zero.stage3
        import deepspeed.runtime.zero.stage_1_and_2

        def trace(message, force=False):
            report("  deepspeed: " + message[:80])

        deepspeed.runtime.zero.stage3.see_memory_usage = trace
        deepspeed.runtime.zero.stage_1_and_2.see_memory_usage = trace
        deepspeed.runtime.engine.see_memory_usage = trace
    report("start")
    model = models.build_model(models.llama_config(shape, args.vocab, 32), 0, ds if args.stage == 3 else None,
                               vocab_block=models.vocab_block(shape.hidden) if args.split_vocab else None)
    report("built")
    for name, p in model.named_parameters():  # an adapter method's trainable set, without adapters: embedding and head
        p.requires_grad_(args.all_trainable or "embed_tokens" in name or "lm_head" in name)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    report("engine")
    ids = torch.arange(32).reshape(1, 32) * 7 % args.vocab
    for step in range(args.steps):
        loss = engine(input_ids=ids, labels=ids).loss
        report(f"step {step} forward")
        engine.backward(loss)
        report(f"step {step} backward")
        engine.step()
        report(f"step {step} step")
    if args.steps and args.stage == 3:
        import ctypes
        import gc

        for bucket in engine.optimizer.ipg_buckets.values():
            bucket.buffer = None
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        report("reduce bucket dropped")


if __name__ == "__main__":
    main()
