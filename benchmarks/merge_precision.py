"""Drift of the merged base weights W after repeated ReLoRA merges: bf16 params vs DeepSpeed's
torch_autocast (``relora.keep_base_fp32=true``), on ZeRO 2 and 3, 2 CPU ranks.

With ``bf16.enabled`` DeepSpeed casts every param to bf16, the frozen W included, so each
``W += s * B @ A`` is rounded to bf16 (8 significant bits). Reference: W as the engine holds it
right after ``deepspeed.initialize`` (already bf16 in bf16 mode: only merge rounding is
measured), plus, accumulated in float64, the very deltas ``s * B @ A`` read from the fp32
masters (``zero_state.get_master``) just before each merge. After every merge it prints, over all
wrapped matrices:

  max_abs      max |W - W_ref|
  rel_frob     ||W - W_ref||_F / ||W_ref||_F
  rel_update   ||W - W_ref||_F / ||W_ref - W_0||_F  (the share of the learned update that was lost)

    python benchmarks/merge_precision.py                  # ~2 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import emit, init_distributed, launch_ranks, load_average, machine_info, md_table  # noqa: E402


def full_value(p):
    """The module's current W (what the forward uses), gathered on ZeRO-3, as float64."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([p], modifier_rank=None, enabled=hasattr(p, "ds_id")):
        return p.data.detach().to(dtypes()["f64"]).clone()


def dtypes():
    import torch

    return {"f64": torch.float64}


def run_one(stage: int, mode: str, args, rank: int, world: int) -> list[dict]:
    import torch
    import torch.distributed as dist

    from ds_relora.config import RunConfig
    from ds_relora.models import WRAPPED_TYPES, Shape, build_model, llama_config
    from ds_relora.methods.schedule import JaggedCosine
    from ds_relora.methods.merging import merge_and_reinit
    from ds_relora.methods.lora_layer import wrap_model
    from ds_relora.zero.state import get_master
    from ds_relora.zero.ds_config import build_ds_config
    from ds_relora.train.engine import build_engine

    shape = Shape(args.hidden, args.intermediate, args.layers, args.heads)
    model = build_model(llama_config(shape, args.vocab, args.seq_len, attn_implementation="sdpa"), seed=0)
    modules = wrap_model(model, rank=args.rank, alpha=args.alpha, dropout=0.0, target_modules=list(WRAPPED_TYPES), seed=1)
    run = RunConfig()
    run.deepspeed.config = f"ds_configs/zero{stage}.json"
    run.deepspeed.overrides = {"bf16": {"enabled": True}}
    run.relora.keep_base_fp32 = mode == "autocast"  # build_ds_config swaps bf16 params for torch_autocast
    run.train.micro_batch_size = args.micro
    ds = build_ds_config(run, world)
    engine = build_engine(model, ds, lr=args.lr, schedule=JaggedCosine(10**6, 0))
    w_dtype = str(modules[0][1].weight.dtype if not hasattr(modules[0][1].weight, "ds_tensor")
                  else modules[0][1].weight.ds_tensor.dtype)

    gen = torch.Generator().manual_seed(100 + rank)

    def batch():
        # Learnable sequences (random start, fixed stride): the adapters learn real updates.
        starts = torch.randint(0, args.vocab, (args.micro, 1), generator=gen)
        return (starts + 7 * torch.arange(args.seq_len)) % args.vocab

    w0 = [full_value(m.weight) for _, m in modules]
    ref = [w.clone() for w in w0]
    rows = []
    for merge in range(1, args.merges + 1):
        for _ in range(args.steps_per_cycle):
            x = batch()
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()
        for i, (_, m) in enumerate(modules):
            a = get_master(engine, m.lora_A).double()
            b = get_master(engine, m.lora_B).double()
            ref[i] += m.scale * (b @ a)
        merge_and_reinit(engine, modules, seed=0, step=merge, optimizer_reset="magnitude", prune_ratio=0.99)
        max_abs, err2, ref2, upd2 = 0.0, 0.0, 0.0, 0.0
        for i, (_, m) in enumerate(modules):
            w = full_value(m.weight)
            diff = w - ref[i]
            max_abs = max(max_abs, diff.abs().max().item())
            err2 += diff.pow(2).sum().item()
            ref2 += ref[i].pow(2).sum().item()
            upd2 += (ref[i] - w0[i]).pow(2).sum().item()
        rows.append({"stage": stage, "mode": mode, "w_dtype": w_dtype, "merge": merge, "max_abs": max_abs,
                     "rel_frob": (err2 / ref2) ** 0.5, "rel_update": (err2 / upd2) ** 0.5 if upd2 else 0.0,
                     "update_frob": upd2 ** 0.5, "rank": rank})
        dist.barrier()
    if hasattr(engine, "destroy"):
        engine.destroy()
    return rows


def worker(args) -> None:
    rank, world = init_distributed()
    for stage in args.stages:
        for mode in args.modes:
            for row in run_one(stage, mode, args, rank, world):
                if rank == 0:
                    emit(row)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stages", type=lambda s: [int(x) for x in s.split(",")], default=[2, 3])
    ap.add_argument("--modes", type=lambda s: s.split(","), default=["bf16", "autocast"])
    ap.add_argument("--merges", type=int, default=10)
    ap.add_argument("--steps-per-cycle", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=344)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--out", default="runs/bench_merge_precision")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    started = time.time()
    print(f"machine: {machine_info()}; load {load_average()}", flush=True)
    passthrough = [a for a in sys.argv[1:] if a != "--worker"]
    rows = launch_ranks(Path(__file__), ["--worker", *passthrough], args.nprocs, timeout=3600)
    table = md_table(["ZeRO", "mode", "W dtype", "merge", "max abs drift", "rel. Frobenius", "share of update lost"],
                     [[r["stage"], r["mode"], r["w_dtype"], r["merge"], f"{r['max_abs']:.3e}", f"{r['rel_frob']:.3e}",
                       f"{r['rel_update']:.3e}"] for r in rows])
    final = [r for r in rows if r["merge"] == args.merges]
    summary = md_table(["ZeRO", "mode", "W dtype", f"max abs after {args.merges}", "rel. Frobenius", "share of update lost",
                        "||sum of deltas||_F"],
                       [[r["stage"], r["mode"], r["w_dtype"], f"{r['max_abs']:.3e}", f"{r['rel_frob']:.3e}",
                         f"{r['rel_update']:.3e}", f"{r['update_frob']:.3f}"] for r in final])
    text = (f"model hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, r={args.rank}, "
            f"alpha {args.alpha}, lr {args.lr}, {args.steps_per_cycle} steps per cycle, {args.merges} merges, "
            f"{args.nprocs} ranks\n\n{summary}\n\nper merge:\n\n{table}\n\n"
            f"wall time {time.time() - started:.0f}s; machine: {machine_info()}\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(rows))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
