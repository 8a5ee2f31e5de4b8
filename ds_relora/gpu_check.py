"""The one-command GPU check: ``python -m ds_relora.gpu_check`` (``scripts/gpu_check.sh`` installs
the wheels first). One process, one rank, on the machine's first GPU:

1. short bf16 ReLoRA runs on ZeRO 0, 2, 3 and ZeRO-3 + offload, each with a merge (and its
   optimizer reset), a checkpoint, a stop and a resume that runs another merge;
2. which attention kernel ran (flash-attn when importable, else SDPA);
3. the throughput pair full vs relora (bf16, ZeRO-2, 350M, then 1.3B if the time budget
   allows) at equal micro-batch and at each method's largest micro-batch: tokens/s, MFU (analytic
   FLOPs of the method actually run against ``--peak-tflops``) and peak memory.

Prints a results block, writes it as JSON to ``$OUT/gpu_check.json`` when ``$OUT`` is set, and
exits non-zero when any run failed. ``--smoke`` runs the same code on CPU with the tiny preset,
fp32 and 2-step phases (tests/test_device.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import socket
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
H100_BF16_DENSE_TFLOPS = 989.0  # H100/H200 SXM, dense bf16
STAGES = {"zero0": "zero0.json", "zero2": "zero2.json", "zero3": "zero3.json", "zero3_offload": "zero3_offload.json"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_rank() -> None:
    os.environ.update({k: os.environ.get(k, v) for k, v in {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port())}.items()})
    from .quiet import quiet_worker
    from .worker import init_distributed

    init_distributed()
    quiet_worker()


def attention_kernel() -> str:
    from .models import resolve_attn_implementation

    return resolve_attn_implementation("auto")


# ----------------------------------------------------------------------------- 1. ReLoRA runs
def relora_run_config(data: Path, run_dir: Path, stage: str, smoke: bool, attn: str, method: str = "relora") -> dict:
    steps = {"total_steps": 4, "reset_every": 2, "stop": 2} if smoke else {"total_steps": 12, "reset_every": 4, "stop": 6}
    return {
        "model": {"preset": "tiny" if smoke else "20m", "attn_implementation": attn},
        "data": {"path": str(data), "seq_len": 32 if smoke else 256},
        "relora": {"rank": 8 if smoke else 32, "alpha": 16, "dropout": 0.1, "warm_start_steps": 0,
                   "reset_every": steps["reset_every"], "restart_warmup_steps": 1, "lr": 0.005},
        "optim": {"lr": 0.002, "warmup_steps": 1},
        "galore": {"update_proj_gap": steps["reset_every"]},
        "train": {"method": method, "total_steps": steps["total_steps"], "micro_batch_size": 2 if smoke else 8,
                  "eval_every": 0, "eval_batches": 2, "save_every": 0, "run_dir": str(run_dir),
                  "stop_after_steps": steps["stop"]},
        "deepspeed": {"config": str(REPO / "ds_configs" / STAGES[stage]),
                      "overrides": {"bf16": {"enabled": not smoke}}},
        "launch": {"launcher": "none", "num_gpus": 1},
    }


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def relora_run(data: Path, work: Path, stage: str, smoke: bool, attn: str, method: str = "relora") -> dict:
    """Train to ``stop_after_steps`` (merge or projector update, checkpoint), then resume to the end."""
    from .config import from_dict, RunConfig
    from .train.trainer import Trainer

    run_dir = work / f"{method}-{stage}"
    started = time.time()
    raw = relora_run_config(data, run_dir, stage, smoke, attn, method)
    first = Trainer(from_dict(RunConfig, raw)).run()
    raw["train"].update(resume="auto", stop_after_steps=None)
    second = Trainer(from_dict(RunConfig, raw)).run()
    records = _events(run_dir)
    kind = "projection" if method == "galore" else "merge"
    merges = [r["lr_index"] for r in records if r.get("event") == kind]
    losses = [r["loss"] for r in records if r["type"] == "step"]
    problems = []
    if not first.get("stopped"):
        problems.append("the first run did not stop at stop_after_steps")
    if second["step"] != raw["train"]["total_steps"]:
        problems.append(f"the resumed run ended at step {second['step']}")
    every = raw["relora"]["reset_every"]
    expected = list(range(0 if method == "galore" else every, raw["train"]["total_steps"], every))
    if merges != expected:
        problems.append(f"{kind}s at {merges}, expected {expected}")
    if not losses or not all(math.isfinite(x) for x in losses):
        problems.append("non-finite loss")
    stop = relora_run_config(data, run_dir, stage, smoke, attn, method)["train"]["stop_after_steps"]
    if not (run_dir / "checkpoints" / f"step-{stop}" / "meta.json").is_file():
        problems.append("no checkpoint at the stop step")
    _release_memory()
    return {"method": method, "stage": stage, "ok": not problems, "problems": problems, "merges": merges,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "eval_loss": second.get("eval_loss"), "seconds": round(time.time() - started, 1)}


# ----------------------------------------------------------------------------- 3. throughput
def largest_micro_batch(mb1: int, mem1: float, mb2: int, mem2: float, capacity: float, margin: float = 0.85) -> int:
    """Largest micro-batch whose peak memory, extrapolated linearly from two measured points,
    stays under ``margin * capacity``."""
    per_sample = max((mem2 - mem1) / max(1, mb2 - mb1), 1.0)
    fixed = mem1 - per_sample * mb1
    return max(mb1, int((margin * capacity - fixed) // per_sample))


class Bench:
    """One engine per (preset, method); the input batch size varies (gradient accumulation 1:
    every backward is a boundary, so DeepSpeed's configured micro-batch is only bookkeeping)."""

    def __init__(self, preset: str, method: str, args, device):
        import torch

        from .config import RunConfig
        from .models import WRAPPED_TYPES, build_model, llama_config, preset_shape
        from .relora import JaggedCosine, wrap_model
        from .train.ds_config import build_ds_config
        from .train.engine import build_engine

        self.torch, self.device, self.args, self.method = torch, device, args, method
        self.shape = preset_shape(preset)
        hf = llama_config(self.shape, args.vocab, args.seq_len, attn_implementation=args.attn)
        with torch.device(device):  # initialise on the GPU: seconds instead of a minute at 1.3B
            model = build_model(hf, seed=0)
        if method == "relora":
            # Outside the device context: A is drawn from a CPU generator, then moved to W's device.
            wrap_model(model, rank=args.rank, alpha=32.0, dropout=args.dropout, target_modules=list(WRAPPED_TYPES),
                       seed=1)
        self.attn = model.config._attn_implementation
        run = RunConfig()
        run.deepspeed.config = str(REPO / "ds_configs" / "zero2.json")
        run.deepspeed.overrides = {"bf16": {"enabled": args.bf16}}
        run.train.micro_batch_size = args.micro_batch
        self.engine = build_engine(model, build_ds_config(run, 1), lr=1e-4, schedule=JaggedCosine(10**6, 0))
        if args.compile:
            from .train.engine import compile_engine

            compile_engine(self.engine, args.compile)  # the warm-up steps pay the compile

    def measure(self, micro: int) -> dict:
        torch, args = self.torch, self.args
        from benchmarks import analytic

        cuda = self.device.type == "cuda"
        gen = torch.Generator().manual_seed(0)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(args.warmup + args.steps):
            x = torch.randint(0, args.vocab, (micro, args.seq_len), generator=gen).to(self.device)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = self.engine(input_ids=x, labels=x).loss
            self.engine.backward(loss)
            self.engine.step()
            if cuda:
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        step = sorted(times)[len(times) // 2]
        tokens_per_s = micro * args.seq_len / step
        flops = analytic.flops_per_token(self.shape, args.vocab, args.seq_len, self.method, args.rank)["total"]
        out = {"method": self.method, "micro_batch": micro, "tokens_per_s": round(tokens_per_s, 1),
               "step_s": round(step, 4), "flops_per_token": flops,
               "mfu": round(tokens_per_s * flops / (args.peak_tflops * 1e12), 4) if cuda else None,
               "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
        return out

    def close(self) -> None:
        if hasattr(self.engine, "destroy"):
            self.engine.destroy()
        self.engine = None
        _release_memory()


def throughput_pair(preset: str, args, device) -> dict:
    import torch

    rows, largest = [], {}
    for method in ("full", "relora"):
        bench = Bench(preset, method, args, device)
        try:
            base = bench.measure(args.micro_batch)
            rows.append(dict(base, kind="equal micro-batch"))
            if device.type != "cuda":
                continue  # no memory capacity to fill on CPU
            double = bench.measure(2 * args.micro_batch)
            capacity = torch.cuda.get_device_properties(device).total_memory
            mb = largest_micro_batch(args.micro_batch, base["peak_mem_gib"] * 2**30, 2 * args.micro_batch,
                                     double["peak_mem_gib"] * 2**30, capacity)
            mb = min(mb, args.max_micro_batch)
            while True:
                try:
                    largest[method] = bench.measure(mb)
                    break
                except torch.cuda.OutOfMemoryError:
                    if mb <= 2 * args.micro_batch:
                        largest[method] = double
                        break
                    mb = max(2 * args.micro_batch, int(mb * 0.8))
            rows.append(dict(largest[method], kind="largest micro-batch"))
        finally:
            attn = bench.attn
            bench.close()
    by = {(r["method"], r["kind"]): r for r in rows}
    ratio = {kind: round(by[("relora", kind)]["tokens_per_s"] / by[("full", kind)]["tokens_per_s"], 3)
             for kind in ("equal micro-batch", "largest micro-batch") if ("relora", kind) in by and ("full", kind) in by}
    return {"preset": preset, "attn": attn, "rows": rows, "relora_over_full": ratio}


# ----------------------------------------------------------------------------- report
def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def results_block(res: dict) -> str:
    lines = ["=" * 72, "ds_relora GPU check", f"device: {res['device']}", f"attention: {res['attention']}"]
    for r in res["relora_runs"]:
        status = "PASS" if r["ok"] else "FAIL " + "; ".join(r["problems"])
        lines.append(f"{r.get('method', 'relora'):<7} {r['stage']:<14} {status}  merges at {r.get('merges')}  loss {_fmt(r.get('first_loss'))} -> "
                     f"{_fmt(r.get('last_loss'))}  ({r.get('seconds')} s)")
    for pair in res["throughput"]:
        if "error" in pair:
            lines.append(f"throughput {pair['preset']}: FAIL {pair['error']}")
            continue
        lines.append(f"throughput {pair['preset']} ({pair['attn']}, {res['precision']}, seq {res['seq_len']}, "
                     f"ZeRO-2, {'compiled ' + res['compile'] if res.get('compile') else 'eager'}, "
                     f"peak {res['peak_tflops']} TFLOPS):")
        for r in pair["rows"]:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            mem = f"{r['peak_mem_gib']} GiB" if r["peak_mem_gib"] is not None else "n/a"
            lines.append(f"  {r['method']:<6} {r['kind']:<20} mb {r['micro_batch']:<4} {r['tokens_per_s']:>12,.0f} tok/s  "
                         f"MFU {mfu:>6}  peak mem {mem}")
        lines.append(f"  relora/full tokens/s: {pair['relora_over_full']}")
    for note in res["notes"]:
        lines.append(f"note: {note}")
    lines += [f"result: {'PASS' if res['ok'] else 'FAIL'} ({res['wall_s']} s)", "=" * 72]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ds_relora.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny preset, fp32, 2-step phases (tests)")
    ap.add_argument("--methods", default="relora,remora,galore",
                    help="methods of the short runs (each on every stage): merges/projector updates, checkpoint, resume")
    ap.add_argument("--stages", default=None, help=f"comma list of {', '.join(STAGES)} (default: all; smoke: zero0,zero3_offload)")
    ap.add_argument("--presets", default=None, help="throughput presets (default: 350m,1.3b; smoke: tiny)")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS, help="device peak for MFU (dense bf16)")
    ap.add_argument("--budget-s", type=float, default=390, help="skip further throughput presets past this wall time")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=None, help="the equal micro-batch of the throughput pair")
    ap.add_argument("--max-micro-batch", type=int, default=256)
    ap.add_argument("--rank", type=int, default=None, help="adapter rank of the throughput pair (default 128; smoke: 8)")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--compile", metavar="BACKEND", default=None,
                    help="torch.compile the throughput engines (train.compile) with this backend, e.g. inductor")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--data", default=None, help="a folder written by `ds-relora prepare-data` (default: prepare a small stdlib corpus)")
    args = ap.parse_args(argv)
    started = time.time()
    if args.smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import tempfile

    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("error: no CUDA GPU visible: run on a GPU machine, or pass --smoke for the CPU smoke test", file=sys.stderr)
        return 2
    stages = (args.stages or ("zero0,zero3_offload" if args.smoke else ",".join(STAGES))).split(",")
    presets = (args.presets or ("tiny" if args.smoke else "350m,1.3b")).split(",")
    args.seq_len = args.seq_len or (32 if args.smoke else 1024)
    args.micro_batch = args.micro_batch or (2 if args.smoke else 8)
    args.rank = args.rank or (8 if args.smoke else 128)
    args.vocab = 512 if args.smoke else 32000
    args.warmup, args.steps = (1, 2) if args.smoke else (3, 6)
    args.bf16 = cuda
    init_single_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    attn = attention_kernel() if cuda else "sdpa"
    args.attn = attn
    res = {"device": torch.cuda.get_device_name(device) if cuda else "CPU (smoke)", "attention": attn,
           "precision": "bf16" if cuda else "fp32", "seq_len": args.seq_len, "peak_tflops": args.peak_tflops,
           "torch": torch.__version__, "compile": args.compile, "relora_runs": [], "throughput": [], "notes": []}
    if attn != "flash_attention_2" and cuda:
        res["notes"].append("flash-attn is not importable here: SDPA ran")
    work = Path(args.work or tempfile.mkdtemp(prefix="ds_relora_gpu_check_"))
    from .config import PrepareConfig
    from .data import prepare_data

    data = Path(args.data) if args.data else work / "data"
    if not (data / "tokenizer").is_dir():
        prepare_data(PrepareConfig(source="stdlib", max_documents=120 if args.smoke else 600, vocab_size=512,
                                   val_fraction=0.1), data, log=lambda _m: None)
    for method in args.methods.split(","):
        for stage in stages:
            try:
                res["relora_runs"].append(relora_run(data, work / "runs", stage, args.smoke, attn, method))
            except Exception as exc:  # one failing stage must not hide the others
                traceback.print_exc()
                res["relora_runs"].append({"method": method, "stage": stage, "ok": False,
                                           "problems": [f"{type(exc).__name__}: {exc}"]})
        print(f"[gpu_check] {res['relora_runs'][-1]}", flush=True)
    for i, preset in enumerate(presets):
        if i > 0 and time.time() - started > args.budget_s:
            res["notes"].append(f"throughput {preset} skipped: past the {args.budget_s:.0f} s budget")
            continue
        try:
            res["throughput"].append(throughput_pair(preset, args, device))
        except Exception as exc:
            traceback.print_exc()
            res["throughput"].append({"preset": preset, "error": f"{type(exc).__name__}: {exc}"})
        print(f"[gpu_check] {res['throughput'][-1]}", flush=True)
    res["ok"] = all(r["ok"] for r in res["relora_runs"]) and not any("error" in t for t in res["throughput"])
    res["wall_s"] = round(time.time() - started, 1)
    print(results_block(res), flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_check.json").write_text(json.dumps(res, indent=1))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    # Skip interpreter teardown: native NCCL/gloo/DeepSpeed threads occasionally abort at exit.
    os._exit(code)
