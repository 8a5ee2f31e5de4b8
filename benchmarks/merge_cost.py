"""Time and communication of one ``merge_and_reinit`` for a 1.3B-shaped model under ZeRO-3.

A whole 1.3B model (fp32 on CPU: ~5 GB per rank before partitioning, plus its training step) does
not fit two CPU ranks sharing this machine, so the model keeps the true 1.3B *layer* shape
(hidden 2048, intermediate 5461, 32 heads, r = 128, adapters on q/k/v/o/gate/up/down) with
only --layers decoder layers and a small vocabulary (embedding and head carry no adapters and
take no part in a merge). Every figure is measured for each layer count and extrapolated
linearly per layer to the 24 layers of the 1.3B preset; two layer counts check the linearity.

One training step first (Adam state must exist for the moment reset), then, with DeepSpeed's
comms logger on (all ops, debug caller names), one merge: bytes per op type compared with the
adapters' fp32 bytes and with the frozen base weights' bytes. A training step's own traffic is
logged too: under ZeRO-3 it all-gathers the frozen W, a merge does not.

    python benchmarks/merge_cost.py                    # layers 1 and 3, fp32, 2 CPU ranks
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (comms_bytes, comms_config, comms_reset, emit, human_bytes, init_distributed,  # noqa: E402
                               launch_ranks, load_average, machine_info, md_table, peak_rss_bytes, say)

FULL_LAYERS = 24  # the 1.3B preset


def op_of(name: str) -> str:
    return name.split(" | ")[0].strip()


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import deepspeed.comm as dscomm

    from ds_relora.config import RunConfig
    from ds_relora.models import WRAPPED_TYPES, Shape, build_model, llama_config, preset_shape
    from ds_relora.methods.schedule import JaggedCosine
    from ds_relora.methods.merging import merge_and_reinit
    from ds_relora.methods.lora_layer import wrap_model
    from ds_relora.zero.ds_config import build_ds_config
    from ds_relora.train.engine import build_engine

    rank, world = init_distributed()
    big = preset_shape("1.3b")
    for layers in args.layers:
        shape = Shape(big.hidden, big.intermediate, layers, big.heads)
        model = build_model(llama_config(shape, args.vocab, args.seq_len, attn_implementation="sdpa"), seed=0)
        modules = wrap_model(model, rank=args.rank, alpha=32.0, dropout=0.0, target_modules=list(WRAPPED_TYPES), seed=1)
        base_numel = sum(m.weight.numel() for _, m in modules)
        adapter_numel = sum(m.lora_A.numel() + m.lora_B.numel() for _, m in modules)
        run = RunConfig()
        run.deepspeed.config = "ds_configs/zero3.json"
        run.deepspeed.overrides = {"bf16": {"enabled": args.bf16}}
        run.train.micro_batch_size = 1
        ds = build_ds_config(run, world)
        engine = build_engine(model, ds, lr=1e-4, schedule=JaggedCosine(10**6, 0))
        del model
        elt = 2 if args.bf16 else 4
        say(f"{layers} layer(s): engine built, base {base_numel:,} adapters {adapter_numel:,}")

        def train_step(engine=engine):  # bound now: the loop deletes `engine` before the next layer count
            x = torch.randint(0, args.vocab, (1, args.seq_len), generator=torch.Generator().manual_seed(rank))
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()

        train_step()  # Adam state now exists for the moment reset
        dscomm.configure(**comms_config(True))
        comms_reset()
        train_step()
        step_comms = comms_bytes()
        comms_reset()
        dist.barrier()
        t0 = time.perf_counter()
        stats = merge_and_reinit(engine, modules, seed=0, step=1, optimizer_reset="magnitude", prune_ratio=0.99)
        seconds = time.perf_counter() - t0
        dscomm.configure(enabled=False)
        merge_comms = comms_bytes()
        slowest = torch.tensor([seconds])
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        emit({"layers": layers, "rank": rank, "world": world, "elt": elt, "base_numel": base_numel,
              "adapter_numel": adapter_numel, "merge_seconds": float(slowest), "merge_seconds_local": seconds,
              "merge_stats": stats, "merge_comms": merge_comms, "step_comms": step_comms, "peak_rss": peak_rss_bytes()})
        if hasattr(engine, "destroy"):
            engine.destroy()
        del engine, modules
        dist.barrier()


def by_op(comms: dict, world: int) -> dict[str, dict]:
    """Per op type: count, logged msg bytes, and the full-tensor bytes they stand for
    (all_gather_into_tensor logs the per-rank shard: full = msg x world)."""
    out: dict[str, dict] = {}
    for name, v in comms.items():
        op = op_of(name)
        d = out.setdefault(op, {"count": 0, "msg_bytes": 0, "full_bytes": 0})
        d["count"] += v["count"]
        d["msg_bytes"] += v["bytes"]
        d["full_bytes"] += v["bytes"] * (world if op.startswith("all_gather") else 1)
    return out


def report(records: list[dict], args) -> str:
    rows, op_rows, fits = [], [], []
    for rec in sorted((r for r in records if r["rank"] == 0), key=lambda r: r["layers"]):
        world, n = rec["world"], rec["layers"]
        merge_ops = by_op(rec["merge_comms"], world)
        step_ops = by_op(rec["step_comms"], world)
        merge_full = sum(d["full_bytes"] for d in merge_ops.values())
        merge_msg = sum(d["msg_bytes"] for d in merge_ops.values())
        step_full = sum(d["full_bytes"] for d in step_ops.values())
        adapter_bytes = 4 * rec["adapter_numel"]  # fp32 masters
        base_bytes = rec["elt"] * rec["base_numel"]
        rows.append([n, human_bytes(base_bytes), human_bytes(adapter_bytes), human_bytes(merge_msg), human_bytes(merge_full),
                     f"{merge_full / adapter_bytes:.2f}", f"{merge_full / base_bytes:.4f}", human_bytes(step_full),
                     f"{rec['merge_seconds']:.2f}"])
        for op, d in sorted(merge_ops.items()):
            op_rows.append([n, "merge", op, d["count"], d["msg_bytes"], d["full_bytes"]])
        for op, d in sorted(step_ops.items()):
            op_rows.append([n, "train step", op, d["count"], d["msg_bytes"], d["full_bytes"]])
        fits.append((n, rec["merge_seconds"], merge_full, rec["peak_rss"]))
    text = [f"1.3B layer shape (hidden 2048, intermediate 5461, 32 heads), r={args.rank}, ZeRO-3, "
            f"{'bf16' if args.bf16 else 'fp32'} params, {records[0]['world']} CPU ranks, vocab {args.vocab}", "",
            md_table(["layers", "base W bytes", "adapter fp32 bytes", "merge: logged msg bytes", "merge: full-tensor bytes",
                      "merge / adapter", "merge / base W", "one train step: full-tensor bytes", "merge s (slowest rank)"], rows),
            "", "per op type (msg bytes as logged; full bytes = msg x world for all-gathers):", "",
            md_table(["layers", "what", "op", "count", "msg bytes", "full-tensor bytes"], op_rows)]
    if len(fits) >= 2:
        (n0, t0, b0, _), (n1, t1, b1, _) = fits[0], fits[-1]
        t_layer, b_layer = (t1 - t0) / (n1 - n0), (b1 - b0) / (n1 - n0)
        t_full, b_full = t1 + t_layer * (FULL_LAYERS - n1), b1 + b_layer * (FULL_LAYERS - n1)
        first = records[0]
        adapters_full = FULL_LAYERS * 4 * first["adapter_numel"] / first["layers"]
        base_full = FULL_LAYERS * first["elt"] * first["base_numel"] / first["layers"]
        text += ["", f"per layer (from {n0} -> {n1} layers): {t_layer:.2f} s, {human_bytes(b_layer)} full-tensor bytes; "
                 f"linear extrapolation to {FULL_LAYERS} layers (the 1.3B model's decoder): merge {t_full:.1f} s, "
                 f"{human_bytes(b_full)} moved, against {human_bytes(adapters_full)} of fp32 adapters and "
                 f"{human_bytes(base_full)} of base W"]
    text.append("peak RSS per rank: " + ", ".join(
        f"{r['layers']} layer(s) rank {r['rank']}: {human_bytes(r['peak_rss'])}" for r in records))
    return "\n".join(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 3])
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--bf16", action="store_true", help="bf16 params (DeepSpeed bf16 mode) instead of fp32")
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--out", default="runs/bench_merge_cost")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    started = time.time()
    print(f"machine: {machine_info()}; load {load_average()}", flush=True)
    passthrough = [a for a in sys.argv[1:] if a != "--worker"]
    records = launch_ranks(Path(__file__), ["--worker", *passthrough], args.nprocs, timeout=3600)
    text = report(records, args) + f"\n\nwall time {time.time() - started:.0f}s; machine: {machine_info()}\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(records))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
