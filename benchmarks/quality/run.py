"""Small-scale reproduction of the ReLoRA paper's method comparison (Table 2) and ablations
(Table 6): one model shape and one token budget for every method.

Methods (all through ``ds-relora train``, one rank in-process, so what is measured is the
package's own trainer):

  full              full-rank training
  control           smaller full-rank model with as many params as ReLoRA trains
  lora              adapters from step 0, never merged (frozen random W)
  lora_warm         full-rank warm start, then adapters, never merged
  relora            full-rank warm start, then ReLoRA (merges, 99 % magnitude reset, jagged LR)
  relora_no_reset   ... without optimizer reset           (relora.optimizer_reset=none)
  relora_no_jagged  ... without the jagged LR schedule    (relora.jagged_schedule=false)
  relora_no_warm    ... without warm start               (relora.warm_start_steps=0)

Output (in --out): results.md (markdown table), results.json, curves.png (val and train loss per
method), sweep.md with --sweep. Finished runs are reused (--fresh reruns them).

    python benchmarks/quality/run.py                 # default CPU scale, ~30-45 min on 2 cores
    python benchmarks/quality/run.py --sweep         # the LR sweep the defaults come from
    python benchmarks/quality/run.py --scale gpu --data data/big   # larger preset on a GPU

The same comparison as a sweep file, three seeds per method (resumable, SLURM-able, mean ± std):
``ds-relora sweep benchmarks/quality/sweep_cpu.yaml`` then ``ds-relora compare
runs/sweeps/quality_cpu``; its points resolve to exactly this script's --scale cpu configs.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.common import REPO, bench_env, load_average, machine_info, md_table  # noqa: E402

# Scales. warm start = 25 % of steps, ReLoRA phase split into 5 cycles (resets every 1/5 of the
# phase), restart warm-up = 5 % of a cycle, initial warm-up = 5 % of the run: the paper's recipe
# scaled to the step budget. Peak LRs come from --sweep (see docs/results.md): lr_full (full,
# control), lr_relora (adapters after a warm start), lr_scratch (adapters from step 0: lora,
# relora_no_warm), each picked on the same short budget from the same 4-point grid.
SCALES = {
    "cpu": dict(preset="9m", seq_len=256, micro=8, steps=800, warmup=40, warm_start=200, rank=16, alpha=32,
                eval_every=100, eval_batches=40, lr_full=2e-3, lr_relora=8e-3, lr_scratch=2e-3),
    "cpu-long": dict(preset="20m", seq_len=256, micro=16, steps=1500, warmup=75, warm_start=375, rank=32,
                     alpha=32, eval_every=150, eval_batches=40, lr_full=2e-3, lr_relora=4e-3, lr_scratch=4e-3),
    "gpu": dict(preset="130m", seq_len=512, micro=32, steps=8000, warmup=400, warm_start=2000, rank=128,
                alpha=32, eval_every=500, eval_batches=100, lr_full=1e-3, lr_relora=2e-3, lr_scratch=2e-3),
}
METHODS = ["full", "control", "lora", "lora_warm", "relora", "relora_no_reset", "relora_no_jagged", "relora_no_warm"]
DESCRIPTION = {
    "full": "full-rank", "control": "full-rank, smaller (ReLoRA's trainable count)",
    "lora": "LoRA from scratch", "lora_warm": "LoRA after full-rank warm start",
    "relora": "ReLoRA (warm start, reset, jagged LR)", "relora_no_reset": "ReLoRA, no optimizer reset",
    "relora_no_jagged": "ReLoRA, no jagged schedule", "relora_no_warm": "ReLoRA, no warm start",
}
SWEEP_LRS = {"full": [1e-3, 2e-3, 4e-3, 8e-3], "relora": [2e-3, 4e-3, 8e-3, 1.6e-2], "lora": [1e-3, 2e-3, 4e-3, 8e-3]}
SCRATCH = ("lora", "relora_no_warm")


def default_lr(method: str, s: dict) -> float:
    if method in ("full", "control"):
        return s["lr_full"]
    return s["lr_scratch"] if method in SCRATCH else s["lr_relora"]


def parse_method(spec: str, s: dict, seed: int) -> tuple[str, float, str]:
    """``name`` or ``name:LR`` -> (name, peak LR, run folder name)."""
    name, _, lr = spec.partition(":")
    if name not in METHODS:
        raise SystemExit(f"unknown method {name}: use {', '.join(METHODS)}")
    folder = name + (f"_lr{float(lr):g}" if lr else "") + (f"_seed{seed}" if seed else "")
    return name, float(lr) if lr else default_lr(name, s), folder


def relora_cycle(steps: int, warm_start: int) -> tuple[int, int]:
    """(reset_every, restart_warmup) for a ReLoRA phase of ``steps - warm_start`` steps: 5 cycles,
    a 5 % re-warm-up (at least 2 steps so the ramp exists)."""
    every = (steps - warm_start) // 5
    return every, max(2, round(0.05 * every))


def base_config(s: dict, data: str, steps: int) -> dict:
    return {
        "model": {"preset": s["preset"]},
        "data": {"path": data, "seq_len": s["seq_len"]},
        "relora": {"rank": s["rank"], "alpha": s["alpha"], "dropout": 0.0},
        "optim": {"lr": s["lr_full"], "warmup_steps": s["warmup"], "min_lr_ratio": 0.1, "grad_clip": 1.0,
                  "weight_decay": 0.0},
        "train": {"total_steps": steps, "micro_batch_size": s["micro"], "eval_every": s["eval_every"],
                  "eval_batches": s["eval_batches"], "save_every": 0, "keep_last": 1, "seed": 0},
        "deepspeed": {"config": "ds_configs/zero2.json"},
        "launch": {"launcher": "none", "num_gpus": 1},
    }


def method_overrides(method: str, s: dict, steps: int, warm_start: int, lr_relora: float) -> list[str]:
    """``--set`` overrides of one method; ``lr_relora`` is the method's peak LR (optim.lr for
    full/control, relora.lr for adapter methods, whose warm start runs at optim.lr)."""
    every, rwarm = relora_cycle(steps, warm_start)
    relora = [f"relora.lr={lr_relora}", f"relora.reset_every={every}", f"relora.restart_warmup_steps={rwarm}"]
    if method in ("full", "control"):
        return [f"train.method={method}", f"optim.lr={lr_relora}"]
    if method == "lora":
        return ["train.method=lora", f"relora.lr={lr_relora}", "relora.warm_start_steps=0"]
    if method == "lora_warm":
        return ["train.method=lora", f"relora.lr={lr_relora}", f"relora.warm_start_steps={warm_start}",
                f"relora.restart_warmup_steps={rwarm}"]
    if method == "relora_no_warm":
        every0, rwarm0 = relora_cycle(steps, 0)
        return ["train.method=relora", f"relora.lr={lr_relora}", "relora.warm_start_steps=0",
                f"relora.reset_every={every0}", f"relora.restart_warmup_steps={rwarm0}"]
    extra = {"relora": [], "relora_no_reset": ["relora.optimizer_reset=none"],
             "relora_no_jagged": ["relora.jagged_schedule=false"]}[method]
    return ["train.method=relora", f"relora.warm_start_steps={warm_start}", *relora, *extra]


def finished(run_dir: Path, config: dict, overrides: list[str]) -> bool:
    """A complete run whose resolved config (run_dir aside) is exactly the one asked for."""
    import tempfile

    import yaml

    from ds_relora.config import load_config, to_dict

    metrics, resolved = run_dir / "metrics.jsonl", run_dir / "config.yaml"
    if not metrics.is_file() or not resolved.is_file():
        return False
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as tmp:
        tmp.write(yaml.safe_dump(config))
        tmp.flush()
        want = to_dict(load_config(tmp.name, overrides))
    have = yaml.safe_load(resolved.read_text())
    for d in (want, have):
        d["train"].pop("run_dir", None)
    if want != have:
        return False
    steps = config["train"]["total_steps"]
    return any(r.get("type") == "event" and r.get("event") == "eval" and r.get("step") == steps
               for r in _records(metrics))


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train(run_dir: Path, config: dict, overrides: list[str], fresh: bool) -> float:
    """One ``ds-relora train`` run in a subprocess; returns its wall time (0 when reused)."""
    import yaml

    if not fresh and finished(run_dir, config, overrides):
        print(f"  reusing {run_dir}", flush=True)
        return json.loads((run_dir / "wall.json").read_text())["seconds"] if (run_dir / "wall.json").is_file() else 0.0
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    base = run_dir / "base.yaml"
    base.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "ds_relora.cli", "train", "--config", str(base),
           "--set", f"train.run_dir={run_dir}", *overrides]
    print("  $ ds-relora train --config", base, "--set", " ".join(cmd[7:]), flush=True)
    env = bench_env()
    started = time.time()
    with open(run_dir / "train.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.time() - started
    if proc.returncode != 0:
        tail = (run_dir / "train.log").read_text()[-3000:]
        raise RuntimeError(f"run {run_dir.name} failed ({proc.returncode}):\n{tail}")
    (run_dir / "wall.json").write_text(json.dumps({"seconds": seconds, "load_after": load_average()}))
    print(f"  done in {seconds:.0f}s (load {load_average()})", flush=True)
    return seconds


def summarize(run_dir: Path) -> dict:
    from ds_relora.checkpoint.meta import read_meta
    from ds_relora.checkpoint.choose import complete_checkpoints
    from ds_relora.run_folder import checkpoint_root, metrics_file

    records = _records(metrics_file(run_dir))
    steps = [r for r in records if r["type"] == "step"]
    evals = [r for r in records if r["type"] == "event" and r["event"] == "eval"]
    _, final_ckpt = complete_checkpoints(checkpoint_root(run_dir))[-1]
    params = read_meta(final_ckpt).params
    tokens_per_step = steps[-1]["tokens"] / (steps[-1]["step"])
    return {
        "params": params, "final_val_loss": evals[-1]["loss"], "final_val_ppl": math.exp(evals[-1]["loss"]),
        "tokens": steps[-1]["tokens"],
        "eval_curve": [(e["step"] * tokens_per_step, e["loss"]) for e in evals],
        "train_curve": [(r["step"], r["loss"]) for r in steps],
        "merges": sum(1 for r in records if r["type"] == "event" and r["event"] == "merge"),
    }


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_val, ax_train) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (method, res) in enumerate(results.items()):
        style = dict(color=plt.cm.tab10(i % 10), lw=1.4, ls="--" if method.startswith("relora_no") else "-")
        xs, ys = zip(*res["eval_curve"])
        ax_val.plot([x / 1e6 for x in xs], ys, marker="o", ms=3, label=f"{method} ({res['final_val_loss']:.3f})", **style)
        steps, losses = zip(*res["train_curve"])
        ema, smooth = losses[0], []
        for v in losses:  # EMA: per-step losses of small batches are too noisy to compare by eye
            ema = 0.95 * ema + 0.05 * v
            smooth.append(ema)
        ax_train.plot(steps, smooth, **style)
    ax_val.set(xlabel="tokens (M)", ylabel="validation loss", title="validation loss")
    ax_train.set(xlabel="step", ylabel="train loss (EMA 0.95)", title="train loss")
    for ax in (ax_val, ax_train):
        ax.grid(alpha=0.3)
    # Zoom on the best methods: a run that fails stays in the legend with its final loss.
    final = [r["final_val_loss"] for r in results.values()]
    top = min(max(final) + 0.8, min(final) + 1.5)
    ax_val.set_ylim(min(final) - 0.15, top)
    ax_train.set_ylim(min(final) - 0.4, top)
    ax_val.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def ensure_data(path: str) -> None:
    if (Path(path) / "meta.json").is_file() or not path.startswith("data/bench_stdlib"):
        return
    print(f"preparing {path} (whole stdlib corpus, BPE vocab 2048)", flush=True)
    subprocess.run([sys.executable, "-m", "ds_relora.cli", "prepare-data", "--config", "quickstart",
                    "--set", "prepare.max_documents=2000", "--out", path], cwd=REPO, check=True,
                   env=bench_env())


def run_sweep(args, s: dict) -> None:
    """Same short budget and the same 4-point, factor-2 LR grid for full-rank, ReLoRA (warm
    start at the best full-rank LR) and adapters from scratch (LoRA)."""
    steps = args.sweep_steps
    warm = steps // 4
    rows, best = [], {}
    for method in ("full", "relora", "lora"):
        scores = {}
        for lr in SWEEP_LRS[method]:
            cfg = base_config(dict(s, warmup=max(1, steps // 20)), args.data, steps)
            if method == "relora":
                cfg["optim"]["lr"] = best["full"]
            over = method_overrides(method, s, steps, warm, lr)
            run_dir = Path(args.out) / "sweep" / f"{method}_lr{lr:g}"
            wall = train(run_dir, cfg, over, args.fresh)
            loss = summarize(run_dir)["final_val_loss"]
            scores[lr] = loss
            rows.append([method, f"{lr:g}", steps, round(loss, 4), round(wall)])
        best[method] = min(scores, key=scores.get)
    table = md_table(["method", "peak LR", "steps", "final val loss", "wall s"], rows)
    text = (f"{table}\n\nbest: full {best['full']:g} (lr_full), relora {best['relora']:g} (lr_relora), "
            f"lora {best['lora']:g} (lr_scratch)\ntotal sweep wall time {sum(r[-1] for r in rows)}s\n")
    (Path(args.out) / "sweep.md").write_text(text)
    print(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=list(SCALES), default="cpu")
    ap.add_argument("--data", default="data/bench_stdlib", help="prepared data folder (default: whole stdlib, prepared on first use)")
    ap.add_argument("--out", default="runs/bench_quality")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of NAME or NAME:LR (own peak LR)")
    ap.add_argument("--steps", type=int, help="override the scale's step count (warm start and cycles follow)")
    ap.add_argument("--lr-full", type=float, help="peak LR of full / control (default: the scale's swept value)")
    ap.add_argument("--lr-relora", type=float, help="peak adapter LR after a warm start")
    ap.add_argument("--lr-scratch", type=float, help="peak adapter LR without warm start (lora, relora_no_warm)")
    ap.add_argument("--seed", type=int, default=0, help="train.seed (model init, data order); run folders get _seedN")
    ap.add_argument("--sweep", action="store_true", help="run the LR sweep instead of the comparison")
    ap.add_argument("--sweep-steps", type=int, default=300)
    ap.add_argument("--fresh", action="store_true", help="rerun finished runs")
    ap.add_argument("--plot", default=None, help="also copy the PNG here (e.g. docs/img/quality_curves.png)")
    args = ap.parse_args()

    s = dict(SCALES[args.scale])
    s["lr_full"] = args.lr_full or s["lr_full"]
    s["lr_relora"] = args.lr_relora or s["lr_relora"]
    s["lr_scratch"] = args.lr_scratch or s["lr_scratch"]
    ensure_data(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print(f"machine: {machine_info()}; load {load_average()}", flush=True)
    if args.sweep:
        run_sweep(args, s)
        print(f"sweep wall time {time.time() - started:.0f}s")
        return 0

    steps = args.steps or s["steps"]
    warm = steps * s["warm_start"] // s["steps"]
    if args.steps:
        s["warmup"] = max(1, steps // 20)
    config = base_config(s, args.data, steps)
    config["train"]["seed"] = args.seed
    results, walls, lrs, names = {}, {}, {}, {}
    for spec in args.methods.split(","):
        method, lr, folder = parse_method(spec, s, args.seed)
        print(f"[{folder}]", flush=True)
        walls[folder] = train(out / folder, config, method_overrides(method, s, steps, warm, lr), args.fresh)
        results[folder], lrs[folder], names[folder] = summarize(out / folder), lr, method

    every, rwarm = relora_cycle(steps, warm)
    title = (f"preset {s['preset']}, seq {s['seq_len']}, batch {s['micro']}, {steps} steps, r={s['rank']}, "
             f"seed {args.seed}, warm start {warm}, reset every {every}")
    rows = []
    for folder, res in results.items():
        p = res["params"]
        rows.append([folder, DESCRIPTION[names[folder]], f"{lrs[folder]:g}", p["trainable"], p["total"],
                     round(res["final_val_loss"], 4), round(res["final_val_ppl"], 2), res["tokens"], res["merges"],
                     round(walls[folder])])
    table = md_table(["run", "what", "peak LR", "trainable params", "total params", "final val loss", "val ppl",
                      "tokens", "merges", "wall s"], rows)
    total_wall = sum(walls.values())
    text = (f"{title}\n\n{table}\n\nrestart warm-up {rwarm} steps; trainable params are those of the last "
            f"phase (adapters + embeddings, norms, head for LoRA/ReLoRA); a warm start runs at the full-rank "
            f"LR {s['lr_full']:g}.\n"
            f"total wall time {total_wall:.0f}s; machine: {machine_info()}\n")
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"config": s, "steps": steps, "results": results, "walls": walls}))
    plot(results, out / "curves.png", title)
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        Path(args.plot).write_bytes((out / "curves.png").read_bytes())
    print(text)
    print(f"plot: {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
