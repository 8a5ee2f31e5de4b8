"""Checkpoint save speed: seconds and GB/s of ``save_checkpoint`` at the 1.3B layer shape
(hidden 2048, intermediate 5461, vocab 32000; ``--layers`` of them, full-rank AdamW in fp32 after
one step, so every parameter has its master and two moments) on ``--ranks`` CPU ranks, next to the
disk's own sequential write bandwidth measured in the same run: one Python write + fsync loop of
the checkpoint's size into the same folder (64 MiB writes), then the same split over the ranks
writing at once.

    nice -n 10 python benchmarks/checkpoint_save/run.py --out /tmp/ckpt_bench            # ZeRO-2 and 3
    nice -n 10 python benchmarks/checkpoint_save/run.py --out /tmp/ckpt_bench --stages 2 --layers 4

Prints one table row per stage: checkpoint bytes, each save's seconds and GB/s, the disk's
single-stream and all-ranks bandwidth measured right before each save (a shared machine's disk
drifts), and each save's share of the single-stream figure. The folder is deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks.common import emit, human_bytes, launch_ranks, machine_info, say  # noqa: E402

VOCAB, SEQ = 32000, 16
CHUNK = 64 << 20


def write_fsync(path: Path, size: int) -> float:
    """Seconds to write ``size`` bytes (64 MiB at a time, not all zeros) and fsync them."""
    import numpy as np

    block = np.random.default_rng(0).integers(0, 255, CHUNK, dtype=np.uint8).tobytes()
    start = time.perf_counter()
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(block[: min(left, CHUNK)])
            left -= CHUNK
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink(missing_ok=True)
    return seconds


def disk_bandwidth(folder: Path, size: int, rank: int, world: int) -> tuple[float, float]:
    """(one stream's GB/s with the other ranks idle, all ranks' GB/s writing ``size / world`` each)."""
    import torch.distributed as dist

    single = None
    dist.barrier()
    if rank == 0:
        single = size / write_fsync(folder / "disk_probe_single", size) / 1e9
    dist.barrier()
    start = time.perf_counter()
    write_fsync(folder / f"disk_probe_rank{rank}", size // world)
    dist.barrier()
    together = size / (time.perf_counter() - start) / 1e9
    return single, together


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from ds_relora.worker import init_distributed

    init_distributed()  # as a training rank starts (no JIT-compiled shared-memory op on CPU)
    rank, world = dist.get_rank(), dist.get_world_size()

    from ds_relora.checkpoint.format import CheckpointMeta, expected_checkpoint_bytes
    from ds_relora.checkpoint.store import save_checkpoint, wait_for_pruning
    from ds_relora.methods.schedule import JaggedCosine
    from ds_relora.models import PRESETS, Shape, build_model, llama_config
    from ds_relora.train.engine import build_engine

    preset = PRESETS["1.3b"]
    shape = Shape(preset.hidden, preset.intermediate, args.layers, preset.heads)
    hf = llama_config(shape, VOCAB, SEQ, attn_implementation="eager")
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
          "zero_optimization": {"stage": args.stage}, "zero_allow_untested_optimizer": True}
    model = build_model(hf, seed=0, ds_config=ds)
    engine = build_engine(model, ds, lr=1e-4, schedule=JaggedCosine(100, 0))
    x = torch.arange(SEQ).reshape(1, SEQ) + rank
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    say(f"ZeRO-{args.stage}: {args.layers} layers of the 1.3B shape built and stepped")
    out = Path(args.out) / f"zero{args.stage}"
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
    dist.barrier()
    expected = expected_checkpoint_bytes(engine.module)
    times, singles, alls = [], [], []
    for step in range(1, args.repeats + 1):
        # The disk is measured right before each save: on a shared machine its speed drifts.
        single, together = disk_bandwidth(out, expected, rank, world)
        singles.append(single)
        alls.append(together)
        meta = CheckpointMeta(step=step, phase="full", world_size=world, zero_stage=args.stage, optimizer_step=1)
        dist.barrier()
        start = time.perf_counter()
        final = save_checkpoint(engine, out, step, meta=meta, config_yaml="train: {}\n", hf_config=hf,
                                tokenizer_dir=None, keep_last=1)
        dist.barrier()
        times.append(time.perf_counter() - start)
        say(f"ZeRO-{args.stage}: save {step} took {times[-1]:.2f} s (disk just before: "
            f"{single and f'{single:.3f}'} GB/s one stream, {together:.3f} GB/s all ranks)")
    wait_for_pruning()
    size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
    dist.barrier()
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        emit({"stage": args.stage, "bytes": size, "expected": expected, "seconds": times, "disk_single": singles,
              "disk_all": alls})
    dist.barrier()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder on the disk to measure (deleted afterwards)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"machine: {machine_info()}")
    print(f"1.3B layer shape (hidden 2048, intermediate 5461, vocab {VOCAB}), {args.layers} layers, "
          f"{args.ranks} CPU ranks, fp32 AdamW after one step; {args.repeats} saves")
    print("| ZeRO | checkpoint | 4N+8T | save s (each) | save GB/s (each) | disk 1 stream GB/s (each, just before) | "
          "disk all ranks GB/s (each) | save / 1 stream (each) |")
    print("|---|---|---|---|---|---|---|---|")
    for stage in args.stages:
        (record,) = [r for r in launch_ranks(Path(__file__), ["--worker", "--stage", str(stage), "--out", args.out,
                                                                "--layers", str(args.layers), "--repeats", str(args.repeats)],
                                                args.ranks) if "stage" in r]
        rates = [record["bytes"] / s / 1e9 for s in record["seconds"]]
        each = lambda values, fmt: ", ".join(fmt.format(v) for v in values)  # noqa: E731
        print(f"| {stage} | {human_bytes(record['bytes'])} | {human_bytes(record['expected'])} | "
              f"{each(record['seconds'], '{:.1f}')} | {each(rates, '{:.3f}')} | {each(record['disk_single'], '{:.3f}')} | "
              f"{each(record['disk_all'], '{:.3f}')} | "
              f"{each([100 * r / d for r, d in zip(rates, record['disk_single'])], '{:.0f}%')} |", flush=True)

if __name__ == "__main__":
    main()
