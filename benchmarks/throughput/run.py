"""Full-rank vs ReLoRA training throughput, memory and gradient traffic under ZeRO 0-3.

Same model, micro-batch and sequence length for both methods; engines are built directly
(``build_model`` + ``wrap_model`` + ``build_engine``, the trainer's own pieces) so that only
training steps are timed. One process group per (method, stage), so that each rank's RSS
high-water mark belongs to that configuration alone. Per configuration it reports:

* tokens/s and the median step time over --steps steps after --warmup steps;
* peak RSS per rank (``getrusage`` high-water mark; on GPU ``max_memory_allocated``);
* model-state bytes found in the engine's tensors (``model_state_bytes_from_engine``, taken
  between backward and step) next to the analytic per-rank figure;
* gradient-reduction bytes of one step from DeepSpeed's comms logger (debug caller names),
  next to the expected trainable x element size;
* the measured ReLoRA/full speed ratio next to the analytic FLOPs ratio (benchmarks/analytic.py).

Merges are not in the timed steps (one per reset_every steps; benchmarks/merge_cost.py times one).

    python benchmarks/throughput/run.py                       # CPU: 2 gloo ranks, preset 35m, ZeRO 0-3
    python benchmarks/throughput/run.py --shape 1.3b-layers --stages 0,2,3   # the standard 1.3B-layer row
    python benchmarks/throughput/run.py --device cuda --nprocs 1 --preset 350m --seq-len 1024 \\
        --micro-batch 8 --stages 2 --rank 128 --attn sdpa --peak-tflops 989    # one H100, bf16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import analytic  # noqa: E402
from benchmarks.common import (comms_bytes, comms_reset, emit, human_bytes, init_distributed, launch_ranks,  # noqa: E402
                               load_average, machine_info, md_table, peak_rss_bytes, say)

# Caller names (comms logger, debug mode) of the ops that move gradients; the rest are the
# ZeRO parameter all-gathers, overflow / grad-norm scalars and barriers.
GRAD_CALLERS = ("allreduce_bucket", "reduce_scatter_fn", "average_tensor", "allreduce_no_retain",
                "buffered_allreduce_fallback", "reduce_ipg_grads", "allreduce_and_copy", "gradient_reduction_w_predivide",
                "_reduce_and_partition_ipg_grads", "__avg_scatter_grads", "reduce_independent_p_g_buckets_and_remove_grads")


# Named standard rows (docs/results.md): the 1.3B model's layer shape at a CPU-sized depth and
# vocabulary, so that the wrapped linears (not the head) dominate, as they do at 1.3B.
STANDARD_SHAPES = {
    "1.3b-layers": {"preset": "1.3b", "layers": 2, "vocab": 2048, "rank": 128, "dropout": 0.0},
}
DEFAULTS = {"vocab": 32000, "rank": 32, "dropout": 0.1}


def resolve_shape(args) -> None:
    """Fill ``args.shape_obj`` / ``shape_name`` and the vocab/rank/dropout defaults from --shape,
    --preset and the per-dimension overrides (an explicit flag always wins)."""
    from ds_relora.models import preset_shape

    named = STANDARD_SHAPES.get(args.shape, {})
    preset = named.get("preset", args.preset)
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, named.get(key, default))
    base = preset_shape(preset)
    layers = args.layers or named.get("layers") or base.layers
    args.shape_obj = dataclasses.replace(base, layers=layers, hidden=args.hidden or base.hidden,
                                         intermediate=args.intermediate or base.intermediate,
                                         heads=args.heads or base.heads)
    if args.shape_obj.hidden % args.shape_obj.heads:
        raise SystemExit(f"error: hidden {args.shape_obj.hidden} is not a multiple of heads {args.shape_obj.heads}")
    args.shape_name = args.shape or f"preset {preset}" + (" (modified)" if args.shape_obj != base else "")
    args.preset = preset


def current_rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(cfg: dict) -> None:
    import torch
    import deepspeed.comm as dscomm

    rank, world = init_distributed()
    from ds_relora.config import RunConfig
    from ds_relora.models import WRAPPED_TYPES, Shape, build_model, describe_params, enable_activation_checkpointing, llama_config
    from ds_relora.methods import get_method
    from ds_relora.methods.schedule import JaggedCosine
    from ds_relora.zero.ds_config import build_ds_config
    from ds_relora.train.engine import build_engine

    cuda = cfg["device"] == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    shape = Shape(**cfg["shape"])
    hf = llama_config(shape, cfg["vocab"], cfg["seq_len"], attn_implementation=cfg["attn"])
    model = build_model(hf, seed=0)
    if get_method(cfg["method"]).adapters:
        # The method's own wrap, as the trainer does it (GaLore's projector updates are not timed:
        # one probe step every update_proj_gap steps).
        setting = RunConfig()
        setting.train.method = cfg["method"]
        setting.relora.rank, setting.relora.alpha, setting.relora.dropout = cfg["rank"], 32.0, cfg["dropout"]
        setting.relora.target_modules = list(WRAPPED_TYPES)
        setting.relora.fuse_shared_inputs = cfg["fuse_shared_inputs"]
        get_method(cfg["method"]).wrap(model, setting, seed=1)
    if cfg["activation_checkpointing"]:
        enable_activation_checkpointing(model)
    params = describe_params(model)
    # The package's own DeepSpeed JSON (buckets, overlap) with the run-config-owned keys injected.
    run = RunConfig()
    run.deepspeed.config = f"ds_configs/zero{cfg['stage']}.json"
    run.deepspeed.overrides = {"bf16": {"enabled": cfg["bf16"]}}
    run.train.micro_batch_size = cfg["micro"]
    ds = build_ds_config(run, world)
    groups = get_method(cfg["method"]).param_groups(model, RunConfig())
    engine = build_engine(model.to(device), ds, lr=1e-4, schedule=JaggedCosine(10**6, 0), groups=groups)
    if cfg["method"] != "full" and cfg["stage"] == 3 and cfg["zero3_frozen_base"] != "partition":
        from ds_relora.zero.frozen_base import apply_zero3_frozen_base

        apply_zero3_frozen_base(engine, cfg["zero3_frozen_base"])
    if cfg.get("compile"):
        from ds_relora.train.engine import compile_engine

        compile_engine(engine, cfg["compile"])
    precision = "bf16" if ds["bf16"].get("enabled") else "fp32"

    gen = torch.Generator().manual_seed(1234 + rank)

    def batch():
        return torch.randint(0, cfg["vocab"], (cfg["micro"], cfg["seq_len"]), generator=gen).to(device)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step(x, between=None):
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        if between:
            between()
        engine.step()

    times = []
    for i in range(cfg["warmup"] + cfg["steps"]):
        x = batch()
        sync()
        t0 = time.perf_counter()
        step(x)
        sync()
        if i >= cfg["warmup"]:
            times.append(time.perf_counter() - t0)
        say(f"{cfg['method']} z{cfg['stage']} step {i}: {time.perf_counter() - t0:.2f}s")
    rss_steady = current_rss_bytes()

    # One more step: model states between backward and step (gradients are alive), then one
    # step with the comms logger on (it synchronises after every op, so it is not timed).
    states = {}
    try:
        from ds_relora.estimate.engine_memory import model_state_bytes_from_engine

        def grab():
            states.update(model_state_bytes_from_engine(engine))

        step(batch(), grab)
    except ImportError:
        states = {"missing": "ds_relora.estimate.memory not available"}
    dscomm.configure(enabled=True, prof_all=True, prof_ops=[], verbose=False, debug=True)
    comms_reset()
    step(batch())
    dscomm.configure(enabled=False)
    comms = comms_bytes()

    step_time = statistics.median(times)
    tokens = cfg["micro"] * cfg["seq_len"] * world
    flops = analytic.flops_per_token(shape, cfg["vocab"], cfg["seq_len"], cfg["method"], cfg["rank"])["total"]
    record = {
        "method": cfg["method"], "stage": cfg["stage"], "rank": rank, "world": world, "precision": precision,
        "params": params, "step_time_median": step_time, "step_times": times, "tokens_per_s": tokens / step_time,
        "peak_rss": peak_rss_bytes(), "rss_steady": rss_steady, "model_states": states, "comms": comms,
        "flops_per_token": flops,
    }
    if cuda:
        record["peak_gpu_mem"] = torch.cuda.max_memory_allocated()
        if cfg.get("peak_tflops"):
            record["mfu"] = record["tokens_per_s"] * flops / (cfg["peak_tflops"] * 1e12 * world)
    emit(record)


def repeat_ratios(records: list[dict], stage: int) -> list[float]:
    """relora/full tokens/s of each repeat (the two methods of one repeat run back to back)."""
    tps = {(r["method"], r.get("repeat", 0)): r["tokens_per_s"] for r in records if r["rank"] == 0 and r["stage"] == stage}
    repeats = sorted({k[1] for k in tps})
    return [tps[("relora", i)] / tps[("full", i)] for i in repeats if ("relora", i) in tps and ("full", i) in tps]


def grad_bytes(comms: dict) -> int:
    return sum(v["bytes"] for name, v in comms.items() if any(c in name for c in GRAD_CALLERS))


def report(records: list[dict], args) -> str:
    try:
        from ds_relora.estimate.memory import model_state_bytes as estimate_states
    except ImportError:
        estimate_states = None
    shape = args.shape_obj
    # With --repeats, keep per (method, stage) the repeat with the fastest median step: the CPU
    # is shared, and interference only ever slows a run down.
    best = {}
    for r in records:
        if r["rank"] == 0:
            key = (r["method"], r["stage"])
            if key not in best or r["step_time_median"] < best[key]["step_time_median"]:
                best[key] = r
    by = {(r["method"], r["stage"], r["rank"]): r for r in records
          if r.get("repeat", 0) == best[(r["method"], r["stage"])].get("repeat", 0)}
    world = records[0]["world"]
    elt = 2 if records[0]["precision"] == "bf16" else 4
    ratio_flops = analytic.speed_ratio(shape, args.vocab, args.seq_len, args.rank)

    def peak(method, stage):
        key = "peak_gpu_mem" if "peak_gpu_mem" in records[0] else "peak_rss"
        return max(by[(method, stage, k)][key] for k in range(world))
    rows, mem_rows, comm_rows, detail = [], [], [], []
    for stage in args.stages:
        pair = {}
        for method in args.methods:
            r0 = by.get((method, stage, 0))
            if r0 is None:
                continue
            pair[method] = r0
            p = r0["params"]
            mem_key = "peak_gpu_mem" if "peak_gpu_mem" in r0 else "peak_rss"
            rss = [by[(method, stage, k)][mem_key] for k in range(world)]
            extra = [f"{r0['mfu'] * 100:.1f}%"] if "mfu" in r0 else []
            rows.append([f"ZeRO-{stage}", method, f"{p['trainable']:,} / {p['total']:,}", int(round(r0["tokens_per_s"])),
                         round(r0["step_time_median"], 3), " / ".join(human_bytes(b) for b in rss), *extra])
            measured = r0["model_states"].get("total")
            if estimate_states is not None:
                est = estimate_states(p["total"], p["trainable"], stage, world, r0["precision"])
                est_total = est["weights"] + est["grads"] + est["master"] + est["adam"]
            else:
                est_total = analytic.per_rank_state_bytes(p["total"], p["trainable"], r0["precision"], stage, world)["total"]
            simple = analytic.simple_state_bytes(p["total"], p["trainable"], r0["precision"], stage)
            mem_rows.append([f"ZeRO-{stage}", method, human_bytes(measured) if measured else "n/a", human_bytes(est_total),
                             f"{measured / est_total:.3f}" if measured else "n/a", human_bytes(simple)])
            gb = grad_bytes(r0["comms"])
            comm_rows.append([f"ZeRO-{stage}", method, gb, p["trainable"] * elt, f"{gb / (p['trainable'] * elt):.3f}",
                              sum(v["bytes"] for v in r0["comms"].values())])
            detail.append(f"ZeRO-{stage} {method}: " + "; ".join(
                f"{k} x{v['count']} {v['bytes']:,} B" for k, v in sorted(r0["comms"].items())))
        if "full" in pair and "relora" in pair:
            f, r = pair["full"], pair["relora"]
            comm_ratio = grad_bytes(r["comms"]) / max(1, grad_bytes(f["comms"]))
            rows.append([f"ZeRO-{stage}", "**relora / full**", f"{r['params']['trainable'] / f['params']['trainable']:.3f}",
                         f"**{r['tokens_per_s'] / f['tokens_per_s']:.3f}x** (FLOPs: {ratio_flops:.3f}x)",
                         f"{r['step_time_median'] / f['step_time_median']:.3f}",
                         f"{peak('relora', stage) / peak('full', stage):.3f}",
                         *([""] if "mfu" in f else [])])
            per_repeat = repeat_ratios(records, stage)
            if len(per_repeat) > 1:
                rows.append([f"ZeRO-{stage}", f"relora / full, median of {len(per_repeat)} paired repeats", "",
                             f"**{statistics.median(per_repeat):.3f}x** (each: {', '.join(f'{x:.2f}' for x in per_repeat)})",
                             "", "", *([""] if "mfu" in f else [])])
            comm_rows.append([f"ZeRO-{stage}", "relora / full", f"{comm_ratio:.4f}",
                              f"{r['params']['trainable'] / f['params']['trainable']:.4f} (trainable fraction)", "", ""])
    gpu = "peak_gpu_mem" in records[0]
    head = ["stage", "method", "trainable / total params", "tokens/s", "step s (median)",
            "peak GPU memory per rank" if gpu else "peak RSS per rank"]
    if any("mfu" in r for r in records):
        head.append("MFU")
    fl_full = analytic.flops_per_token(shape, args.vocab, args.seq_len, "full")
    fl_rel = analytic.flops_per_token(shape, args.vocab, args.seq_len, "relora", args.rank)
    flops_line = ("analytic FLOPs/token: full " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in fl_full.items())
                  + "; relora " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in fl_rel.items())
                  + f"; ratio {ratio_flops:.3f}")
    return "\n".join([
        f"{args.shape_name} (h {shape.hidden}, f {shape.intermediate}, {shape.layers} layers, {shape.heads} heads, "
        f"vocab {args.vocab}), seq {args.seq_len}, micro-batch {args.micro_batch} per rank, "
        f"{world} rank(s), {records[0]['precision']}, r={args.rank}, adapter dropout {args.dropout} "
        f"(shared-input fusion {'on' if args.fuse_shared_inputs else 'off'}), ZeRO-3 frozen base {args.zero3_frozen_base}, "
        f"{args.warmup} warm-up + {args.steps} timed steps, best of {args.repeats} repeat(s)"
        + (f", torch.compile backend {args.compile}" if args.compile else ", eager"),
        "", md_table(head, rows), "", flops_line, "",
        "model states per rank (engine tensors between backward and step vs analytic):", "",
        md_table(["stage", "method", "measured", "analytic per rank", "measured/analytic",
                  "unpartitioned rule (2|4 per frozen + 16|20 per trainable)"], mem_rows), "",
        "gradient-reduction bytes of one step per rank (comms logger msg sizes, gradient callers only):", "",
        md_table(["stage", "method", "grad bytes", "trainable x elt size", "ratio", "all logged bytes"], comm_rows), "",
        "comms records:", *detail,
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--nprocs", type=int, default=2, help="ranks (CPU: processes with 1 thread each; GPU: GPUs)")
    ap.add_argument("--preset", default="35m", help="model preset (ds_relora.models.PRESETS)")
    ap.add_argument("--shape", choices=sorted(STANDARD_SHAPES),
                    help="a named standard row; sets preset/layers/vocab/rank/dropout (explicit flags still win)")
    ap.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    ap.add_argument("--hidden", type=int, help="hidden size (default: the preset's)")
    ap.add_argument("--intermediate", type=int, help="MLP intermediate size (default: the preset's)")
    ap.add_argument("--heads", type=int, help="attention heads (default: the preset's)")
    ap.add_argument("--vocab", type=int, help="vocabulary (default 32000: the presets' nominal size)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per rank per step")
    ap.add_argument("--rank", type=int, help="adapter rank (default 32)")
    ap.add_argument("--dropout", type=float, help="adapter dropout (default 0.1, the config default)")
    ap.add_argument("--no-fuse-shared-inputs", dest="fuse_shared_inputs", action="store_false",
                    help="one dropout and adapter GEMM per linear (the unfused layer) instead of per shared input")
    ap.add_argument("--zero3-frozen-base", choices=["partition", "replicate"], default="partition",
                    help="ZeRO-3 relora: partition the frozen W (DeepSpeed default) or keep it gathered on every rank")
    ap.add_argument("--stages", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2, 3])
    ap.add_argument("--methods", type=lambda s: s.split(","), default=["full", "relora"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1, help="run every configuration N times (alternating order), keep the fastest "
                    "and also print the median of the per-repeat relora/full ratios")
    ap.add_argument("--bf16", choices=["auto", "true", "false"], default="auto", help="auto: on GPU only")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--compile", metavar="BACKEND", default=None,
                    help="torch.compile the engine's module (train.compile) with this backend, e.g. inductor; "
                         "the warm-up steps pay the compile time, so give --warmup 2 or more")
    ap.add_argument("--peak-tflops", type=float, help="device peak (dense bf16 TFLOPS, e.g. 989 for H100 SXM) for MFU")
    ap.add_argument("--out", default="runs/bench_throughput")
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    resolve_shape(args)

    bf16 = {"auto": args.device == "cuda", "true": True, "false": False}[args.bf16]
    started = time.time()
    print(f"machine: {machine_info()}; load {load_average()}", flush=True)
    records = []
    # Alternate the method order between repeats so neither method always runs first.
    plan = [(repeat, stage, method) for repeat in range(args.repeats) for stage in args.stages
            for method in (args.methods if repeat % 2 == 0 else args.methods[::-1])]
    for repeat, stage, method in plan:
        cfg = {"method": method, "stage": stage, "device": args.device, "shape": dataclasses.asdict(args.shape_obj),
               "vocab": args.vocab, "fuse_shared_inputs": args.fuse_shared_inputs,
               "zero3_frozen_base": args.zero3_frozen_base,
               "seq_len": args.seq_len, "micro": args.micro_batch, "rank": args.rank, "dropout": args.dropout,
               "warmup": args.warmup, "steps": args.steps, "bf16": bf16, "attn": args.attn,
               "activation_checkpointing": args.activation_checkpointing, "peak_tflops": args.peak_tflops,
               "compile": args.compile}
        print(f"[{method} ZeRO-{stage} repeat {repeat}] load {load_average()}", flush=True)
        found = launch_ranks(Path(__file__), ["--worker", json.dumps(cfg)], args.nprocs, timeout=3600,
                             env={"DS_ACCELERATOR": "cuda"} if args.device == "cuda" else None)
        records += [dict(r, repeat=repeat) for r in found]
    text = report(records, args)
    wall = time.time() - started
    text += f"\n\nwall time {wall:.0f}s; load at end {load_average()}; machine: {machine_info()}\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"args": {k: (dataclasses.asdict(v) if k == "shape_obj" else v) for k, v in vars(args).items()},
                                                   "records": records}))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
