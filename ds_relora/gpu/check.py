"""The one-command GPU check: ``python -m ds_relora.gpu`` (``scripts/gpu_check.sh`` installs
the wheels first; nothing here needs the checkout). One process, one rank, on the first GPU:

1. short bf16 runs of relora, remora and galore on ZeRO 0, 2, 3 and ZeRO-3 + offload, each with
   merges (and optimizer resets) or projector updates, a checkpoint, a stop, and a resume that
   runs another merge;
2. the throughput pair full vs relora (bf16, ZeRO-2, 350M, then 1.3B) at equal micro-batch and at
   each method's largest micro-batch: tokens/s, MFU (``ds_relora.estimate.flops``, causal attention,
   against ``--peak-tflops``), peak memory, and the attention kernel that actually ran.

Each part starts only when its estimate fits in what is left of ``--budget-s``, and the results
JSON (``--out``, default ``$OUT``) is rewritten after every part, so a timeout keeps what ran.
Exits non-zero when a run failed or a correctness run did not fit. ``--smoke`` rehearses every
code path on CPU: tiny preset, fp32, short phases, a simulated card for the memory search.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from ds_relora import __version__
from ds_relora.checkpoint.format import META
from ds_relora.config import PrepareConfig, RunConfig, from_dict
from ds_relora.data import prepare_data
from ds_relora.gpu.bench import CudaMemory, RehearsalMemory, pair_estimate_s, release_memory, throughput_pair
from ds_relora.launch.hosts import free_port
from ds_relora.methods import DEFAULT_METHOD
from ds_relora.models import resolve_attn_implementation
from ds_relora.quiet import quiet_worker
from ds_relora.run_folder import checkpoint_root, metrics_file
from ds_relora.train.trainer import Trainer
from ds_relora.worker import init_distributed
from ds_relora.zero.ds_config import SHIPPED

H100_BF16_DENSE_TFLOPS = 989.0  # H100/H200 SXM, dense bf16
STAGES = {"zero0": "zero0.json", "zero2": "zero2.json", "zero3": "zero3.json", "zero3_offload": "zero3_offload.json"}
# Planned seconds of one correctness run (two trainer starts) on an H100/H200.
RUN_ESTIMATE_S = {"zero0": 12, "zero2": 12, "zero3": 16, "zero3_offload": 24}


def init_single_rank() -> None:
    os.environ.update({k: os.environ.get(k, v) for k, v in {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port())}.items()})

    init_distributed()
    quiet_worker()


# ----------------------------------------------------------------------------- 1. correctness runs
def relora_run_config(data: Path, run_dir: Path, stage: str, smoke: bool, attn: str, method: str = DEFAULT_METHOD) -> dict:

    # The stop falls between two merges, so the resumed run must merge again.
    steps = {"total_steps": 6, "reset_every": 2, "stop": 3} if smoke else {"total_steps": 12, "reset_every": 4, "stop": 6}
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
        "deepspeed": {"config": str(SHIPPED / STAGES[stage]), "overrides": {"bf16": {"enabled": not smoke}}},
        "launch": {"launcher": "none", "num_gpus": 1},
    }


def relora_run(data: Path, work: Path, stage: str, smoke: bool, attn: str, method: str = DEFAULT_METHOD) -> dict:
    """Train to ``stop_after_steps`` (merge or projector update, checkpoint), then resume to the end."""

    run_dir = work / f"{method}-{stage}"
    started = time.time()
    raw = relora_run_config(data, run_dir, stage, smoke, attn, method)
    stop = raw["train"]["stop_after_steps"]
    trainer = Trainer(from_dict(RunConfig, raw))
    first = trainer.run()
    raw["train"].update(resume="auto", stop_after_steps=None)
    second = Trainer(from_dict(RunConfig, raw)).run()
    records = [json.loads(line) for line in metrics_file(run_dir).read_text().splitlines()]
    # A merging method (ReLoRA) merges after every reset_every-th update; GaLore updates its
    # projector before every update_proj_gap-th one, the first included.
    merging = trainer.method.merges
    kind = "merge" if merging else "projection"
    merges = [r["lr_index"] for r in records if r.get("event") == kind]
    losses = [r["loss"] for r in records if r["type"] == "step"]
    problems = []
    if not first.get("stopped"):
        problems.append("the first run did not stop at stop_after_steps")
    if second["step"] != raw["train"]["total_steps"]:
        problems.append(f"the resumed run ended at step {second['step']}")
    every = raw["relora"]["reset_every"]
    expected = list(range(every if merging else 0, raw["train"]["total_steps"], every))
    if merges != expected:
        problems.append(f"{kind}s at {merges}, expected {expected}")
    if not any(m > stop for m in merges):
        problems.append(f"no {kind} after the resume at step {stop}")
    if not losses or not all(math.isfinite(x) for x in losses):
        problems.append("non-finite loss")
    if not (checkpoint_root(run_dir) / f"step-{stop}" / META).is_file():
        problems.append("no checkpoint at the stop step")
    release_memory()
    return {"method": method, "stage": stage, "ok": not problems, "problems": problems, "merges": merges,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "eval_loss": second.get("eval_loss"), "seconds": round(time.time() - started, 1)}


# ----------------------------------------------------------------------------- budget and parts
class Budget:
    """The wall-clock budget of the whole check. A part starts only when its estimate, scaled by
    how much slower than planned the last finished part of its kind ran, fits in what is left."""

    def __init__(self, total_s: float, clock=time.monotonic):
        self.total, self.clock, self.start = total_s, clock, clock()
        self.slowdown: dict[str, float] = {}
        self.last = 1.0

    def left(self) -> float:
        return self.total - (self.clock() - self.start)

    def need(self, kind: str, estimate_s: float) -> float:
        return estimate_s * self.slowdown.get(kind, self.last)

    def record(self, kind: str, estimate_s: float, seconds: float) -> None:
        self.slowdown[kind] = self.last = max(seconds / estimate_s, 0.25)


class Parts:
    """Runs the check's parts in order, writing the results JSON before and after each one."""

    def __init__(self, res: dict, budget: Budget, out: Path | None):
        self.res, self.budget, self.out = res, budget, out

    def write(self) -> None:
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.res, indent=1))
        os.replace(tmp, self.out / "gpu_check.json")  # a kill mid-write keeps the previous file

    def run(self, name: str, kind: str, estimate_s: float, fn, into: list | None, on_error, required: bool):
        need, left = self.budget.need(kind, estimate_s), self.budget.left()
        entry = {"name": name, "kind": kind, "required": required, "estimate_s": round(need, 1)}
        self.res["parts"].append(entry)
        if need > left:
            entry["status"] = "skipped"
            self.res["notes"].append(f"{name} skipped: needs ~{need:.0f} s, {max(left, 0):.0f} s of the "
                                     f"{self.budget.total:.0f} s budget left (--budget-s)")
            self.write()
            return None
        entry["status"] = "running"
        self.write()
        started = self.budget.clock()
        try:
            result = fn()
            ok = result.get("ok", True) if isinstance(result, dict) else True
        except Exception as exc:  # one failing part must not hide the others
            traceback.print_exc()
            result, ok = on_error(f"{type(exc).__name__}: {exc}"), False
        seconds = self.budget.clock() - started
        if ok:  # a part that failed early says nothing about how long the next one takes
            self.budget.record(kind, estimate_s, seconds)
        entry.update(status="ok" if ok else "failed", seconds=round(seconds, 1))
        if into is not None:
            into.append(result)
        print(f"[gpu_check] {name}: {entry['status']} ({seconds:.1f} s)", flush=True)
        self.write()
        return result

    def ok(self) -> bool:
        return all(p["status"] == "ok" or (p["status"] == "skipped" and not p["required"]) for p in self.res["parts"])


# ----------------------------------------------------------------------------- report
def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def results_block(res: dict) -> str:
    lines = ["=" * 72, "ds_relora GPU check", f"device: {res['device']}",
             f"attention: {res['attention']} (configured: {res['attention_configured']})"]
    for r in res["relora_runs"]:
        status = "PASS" if r["ok"] else "FAIL " + "; ".join(r["problems"])
        lines.append(f"{r['method']:<7} {r['stage']:<14} {status}  merges at {r.get('merges')}  loss "
                     f"{_fmt(r.get('first_loss'))} -> {_fmt(r.get('last_loss'))}  ({r.get('seconds')} s)")
    for pair in res["throughput"]:
        if "error" in pair:
            lines.append(f"throughput {pair['preset']}: FAIL {pair['error']}")
            continue
        lines.append(f"throughput {pair['preset']} ({pair['attn']}, {res['precision']}, seq {res['seq_len']}, "
                     f"ZeRO-2, {'compiled ' + res['compile'] if res.get('compile') else 'eager'}, "
                     f"peak {res['peak_tflops']} TFLOPS):")
        for r in pair["rows"]:
            lines.append(f"  {r['method']:<6} {r['kind']:<20} mb {r['micro_batch']:<4} {r['tokens_per_s']:>12,.0f} tok/s  "
                         f"MFU {100 * r['mfu']:>5.1f}%  peak mem {r['peak_mem_gib']} GiB")
        lines.append(f"  relora/full tokens/s: {pair['relora_over_full']}")
    lines += [f"note: {note}" for note in res["notes"]]
    lines += [f"result: {'PASS' if res['ok'] else 'FAIL'} ({res['wall_s']} s)", "=" * 72]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m ds_relora.gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU rehearsal: tiny preset, fp32, short phases (tests)")
    ap.add_argument("--methods", default="relora,remora,galore",
                    help="methods of the short runs (each on every stage): merges/projector updates, checkpoint, resume")
    ap.add_argument("--stages", default=None, help=f"comma list of {', '.join(STAGES)} (default: all; smoke: zero0,zero3_offload)")
    ap.add_argument("--presets", default=None, help="throughput presets (default: 350m,1.3b; smoke: tiny)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help=f"device peak for MFU (default {H100_BF16_DENSE_TFLOPS:g}, H100/H200 dense bf16; smoke: 0.1)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget: a part that would not fit is skipped (default 330; smoke: 1800)")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=None, help="the equal micro-batch of the throughput pair")
    ap.add_argument("--max-micro-batch", type=int, default=256)
    ap.add_argument("--rank", type=int, default=None, help="adapter rank of the throughput pair (default 128; smoke: 8)")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--compile", metavar="BACKEND", default=None,
                    help="torch.compile the throughput engines (train.compile) with this backend, e.g. inductor")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_check.json (default: $OUT)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--data", default=None, help="a folder written by `ds-relora prepare-data` (default: prepare a small stdlib corpus)")
    args = ap.parse_args(argv)
    unknown = set((args.stages or "").split(",")) - set(STAGES) - {""}
    if unknown:
        ap.error(f"unknown stage(s) {', '.join(sorted(unknown))}: use a comma list of {', '.join(STAGES)}")
    if args.budget_s is None:
        args.budget_s = 1800.0 if args.smoke else 330.0
    if args.budget_s <= 0:
        ap.error(f"--budget-s must be positive (got {args.budget_s:g}): give the seconds the check may take")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    if args.smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("error: no CUDA GPU visible: run on a GPU machine, or pass --smoke for the CPU rehearsal", file=sys.stderr)
        return 2
    smoke = args.smoke
    stages = (args.stages or ("zero0,zero3_offload" if smoke else ",".join(STAGES))).split(",")
    presets = (args.presets or ("tiny" if smoke else "350m,1.3b")).split(",")
    args.seq_len = args.seq_len or (32 if smoke else 1024)
    args.micro_batch = args.micro_batch or (2 if smoke else 8)
    args.rank = args.rank or (8 if smoke else 128)
    args.peak_tflops = args.peak_tflops or (0.1 if smoke else H100_BF16_DENSE_TFLOPS)
    args.vocab = 512 if smoke else 32000
    args.warmup, args.steps = (1, 2) if smoke else (3, 6)
    args.bf16 = cuda
    init_single_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    meter = CudaMemory(device) if cuda else RehearsalMemory()
    args.attn = resolve_attn_implementation("auto", torch.bfloat16) if cuda else "sdpa"  # the check runs bf16 on CUDA
    res = {"device": torch.cuda.get_device_name(device) if cuda else "CPU (smoke)", "ds_relora": f"{__version__} ({Path(__file__).parents[1]})",
           "torch": torch.__version__, "attention_configured": args.attn, "attention": "not probed",
           "precision": "bf16" if cuda else "fp32", "seq_len": args.seq_len, "peak_tflops": args.peak_tflops,
           "compile": args.compile, "memory": meter.source, "budget_s": args.budget_s, "finished": False,
           "parts": [], "relora_runs": [], "throughput": [], "notes": []}
    parts = Parts(res, budget, Path(args.out) if args.out else None)

    def killed(signum, _frame):  # the script's timeout: say which part it cut short
        res["notes"].append(f"stopped by signal {signum} (over the time limit)")
        parts.write()
        os._exit(124)

    signal.signal(signal.SIGTERM, killed)
    work = Path(args.work or tempfile.mkdtemp(prefix="ds_relora_gpu_check_"))
    data = Path(args.data) if args.data else work / "data"
    if not (data / "tokenizer").is_dir():
        parts.run("prepare data", "data", 15, lambda: prepare_data(
            PrepareConfig(source="stdlib", max_documents=120 if smoke else 600, vocab_size=512, val_fraction=0.1),
            data, log=lambda _m: None), None, lambda err: {"error": err}, required=True)
    for method in args.methods.split(","):
        for stage in stages:
            parts.run(f"{method} {stage}", "run", 5 if smoke else RUN_ESTIMATE_S[stage],
                      lambda m=method, s=stage: relora_run(data, work / "runs", s, smoke, args.attn, m),
                      res["relora_runs"],
                      lambda err, m=method, s=stage: {"method": m, "stage": s, "ok": False, "problems": [err]},
                      required=True)
    for preset in presets:
        pair = parts.run(f"throughput {preset}", "throughput", pair_estimate_s(preset, args.vocab, args.compile, smoke),
                         lambda p=preset: throughput_pair(p, args, device, meter), res["throughput"],
                         lambda err, p=preset: {"preset": p, "error": err}, required=False)
        if pair and pair.get("attn") and res["attention"] == "not probed":
            res["attention"] = pair["attn"]
    res.update(ok=parts.ok(), finished=True, wall_s=round(budget.total - budget.left(), 1))
    parts.write()
    print(results_block(res), flush=True)
    return 0 if res["ok"] else 1

