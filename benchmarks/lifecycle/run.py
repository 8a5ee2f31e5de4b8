"""Peak host memory per rank in every phase of a run's lifecycle, next to the model's fp32 bytes.

Two runs through the real ``ds-relora train`` on ``--ranks`` CPU ranks under ZeRO-3 (fp32), each
followed by ``ds-relora export`` (one process):

* ``continued``: ReLoRA continued pre-training from an HF model of the ``--preset`` shape (written
  here in HF's sharded layout with random weights, streamed, never whole in this process):
  partitioned build + streamed load, training with merges, a sharded checkpoint, the export;
* ``switch``: the in-run warm start at ``--switch-layers`` layers of the same shape (the
  full-rank phase's Adam state, 16 bytes per param / N, has to fit here too): full-rank steps, the
  save and switch, ReLoRA steps with a merge, the final save, the export.

Each phase's figure is the largest resident-set high-water mark of any rank in that phase (the
trainer's ``memory`` events, reset at each phase start). The fixed overhead is printed beside
it: the process baseline (a rank's resident set before the build) and ZeRO-3's windows, which the
DeepSpeed config sizes (params gathered in flight, prefetch and reduce buckets). ``estimate-memory``'s
model states and host transients are printed for the same runs.

    python benchmarks/lifecycle/run.py --data data/bench_stdlib                 # 1.3B shape, 2 ranks
    python benchmarks/lifecycle/run.py --data data/bench_stdlib --preset 350m --switch-layers 6
    python benchmarks/lifecycle/run.py --data data/bench_stdlib --preset 7b --layers 2 --methods full,relora,galore \
        --split-vocab

The last prints, per method and ZeRO stage, every phase's peak next to estimate-memory's figure
and its bound (``methods_table.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks.common import load_average, machine_info  # noqa: E402

MiB = 2**20


def write_hf_model(folder: Path, shape, vocab: int, seq: int, shard_bytes: int = 1 << 30) -> int:
    """An HF causal LM of ``shape`` with normal(0, 0.02) weights in HF's sharded layout, written
    tensor by tensor; returns its fp32 bytes."""
    import torch
    from transformers import AutoModelForCausalLM

    from ds_relora.models import llama_config
    from ds_relora.tensor_files import StreamingWriter, nbytes, shard_name, write_index

    config = llama_config(shape, vocab, seq)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    entries = [(n, torch.float32, tuple(p.shape)) for n, p in model.named_parameters()]
    total = sum(nbytes(s, d) for _, d, s in entries)
    if (folder / "config.json").is_file():
        return total
    folder.mkdir(parents=True, exist_ok=True)
    groups, size = [[]], 0
    for e in entries:
        if groups[-1] and size + nbytes(e[2], e[1]) > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += nbytes(e[2], e[1])
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, group in enumerate(groups):
        name = shard_name("model", i, len(groups))
        writer = StreamingWriter(folder / name, group, {"format": "pt"})
        for n, _, s in group:
            value = torch.ones(s) if len(s) == 1 else torch.empty(s).normal_(0, 0.02, generator=gen)
            writer.write(n, value)
            weight_map[n] = name
        writer.close()
    write_index(folder, "model", weight_map, total)
    config.save_pretrained(str(folder))
    return total


def run_train(cfg: dict, folder: Path, reuse: bool = False) -> tuple[list[dict], float]:
    from ds_relora.run_folder import checkpoint_root, metrics_file

    finished = any(checkpoint_root(folder).glob("step-*")) or (folder / "export.json").is_file()
    if reuse and metrics_file(folder).is_file() and finished:
        return read_memory_events(folder), float("nan")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ds_relora.cli", "train", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return read_memory_events(Path(cfg["train"]["run_dir"])), wall


def run_export(ckpt: Path, out: Path) -> tuple[float, float]:
    """(peak RSS MiB, seconds) of ``ds-relora export`` in its own process."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ds_relora.cli", "export", str(ckpt), "--out", str(out), "--overwrite"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        sys.exit(f"export failed: {proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss * 1024 / MiB, time.perf_counter() - started


def phase_table(events: list[dict], export: tuple[float, float] | None, fp32_mib: float, window_mib: float,
                states: dict[str, float]) -> list[str]:
    """Each phase's largest peak over ranks, less the process baseline (the largest rank's
    resident set when ``init`` began: interpreter, torch, DeepSpeed, data maps), and less the
    model states ``estimate-memory`` gives for the engine alive in that phase (``states``: MiB per
    rank for ``full`` / ``relora``, with and without Adam moments): what is left is the phase's
    transient."""
    base = max(max(e["host_start_mib"]) for e in events if e["phase"] == "init")
    rows, engine, stepped = [], None, False
    for e in events:
        phase = e["phase"]
        if phase.startswith("train "):
            engine, stepped = ("full" if phase == "train full" else "relora"), True
        elif phase == "init":
            engine = None
        held = states[(engine or "relora"), stepped] if phase != "init" else 0.0
        rows.append((phase, max(e["host_peak_mib"]), held))
    peaks: dict[str, tuple[float, float]] = {}
    first_engine = "full" if any(e["phase"] == "train full" for e in events) else "relora"
    for phase, mib, held in rows:
        if phase == "init":
            held = states[first_engine, False]
        if phase not in peaks or mib > peaks[phase][0]:
            peaks[phase] = (mib, held)
    if export:
        peaks["export (1 process)"] = (export[0], 0.0)
    lines = [f"process baseline (rank before the build): {base:,.0f} MiB; ZeRO-3 windows (gathered params in flight, "
             f"prefetch and reduce buckets, sized by the DeepSpeed config, not the model): {window_mib:,.0f} MiB",
             "| phase | peak RSS / rank (MiB) | minus baseline | / fp32 model | model states (estimate) | "
             "peak - baseline - states | / fp32 model | added in the phase (peak - RSS at its start) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for phase, (mib, held) in peaks.items():
        transient = mib - base - held if not phase.startswith("export") else mib - base
        added = max((max(e["host_peak_mib"]) - max(e["host_start_mib"]) for e in events if e["phase"] == phase),
                    default=mib - base)
        lines.append(f"| {phase} | {mib:,.0f} | {mib - base:,.0f} | {(mib - base) / fp32_mib:.2f} | {held:,.0f} "
                     f"| {transient:,.0f} | {transient / fp32_mib:.2f} | {added:,.0f} |")
    return lines


def model_states(shape, vocab: int, ranks: int, rank: int) -> dict[tuple[str, bool], float]:
    """estimate-memory's model states per rank (MiB), ZeRO-3 fp32, with and without Adam moments."""
    from ds_relora.estimate.memory import estimate_memory

    out = {}
    for method in ("full", "relora"):
        est = estimate_memory(shape, method, rank, 3, ranks, 1, 32, vocab, precision="fp32")
        out[method, True] = (est.weights + est.grads + est.master + est.adam) / MiB
        out[method, False] = (est.weights + est.grads + est.master) / MiB
    return out


def read_memory_events(run_dir: Path) -> list[dict]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e.get("event") == "memory"]


def estimate_lines(preset, method: str, rank: int, vocab: int, ranks: int, seq: int) -> list[str]:
    from ds_relora.estimate.memory import estimate_memory

    est = estimate_memory(preset, method, rank, 3, ranks, 1, seq, vocab, precision="fp32")
    states = est.weights + est.grads + est.master + est.adam
    return [f"estimate-memory ({method}): model states {states / MiB:,.0f} MiB/rank, activations "
            f"{est.activations / MiB:,.0f}, transients: build {est.init_host / MiB:,.0f}, save {est.save_host / MiB:,.0f}"
            + (f", switch {est.switch_host / MiB:,.0f}" if est.switch_host else "")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/bench_stdlib", help="prepared data folder (ds-relora prepare-data)")
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--layers", type=int, help="layers of the continued run (default: the preset's)")
    ap.add_argument("--max-live", type=float, default=1e8,
                    help="zero_optimization.stage3_max_live_parameters and max_reuse_distance: how many params "
                         "ZeRO-3 keeps gathered (DeepSpeed's default, 1e9, is most of this model)")
    ap.add_argument("--switch-layers", type=int, default=8, help="layers of the in-run warm-start run (0: skip it)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--rank", type=int, default=128, help="relora.rank")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--out", default="runs/lifecycle")
    ap.add_argument("--reuse", action="store_true", help="report runs already in --out instead of training again")
    ap.add_argument("--methods", help="instead of the two runs: the phase table of each method (comma-separated, "
                                      "e.g. full,relora,galore; a projection optimizer such as apollo is one more name)")
    ap.add_argument("--stages", default="2,3", help="ZeRO stages of the --methods table")
    ap.add_argument("--vocab", type=int, default=32000, help="embedding rows of the --methods runs' model")
    ap.add_argument("--split-vocab", action="store_true",
                    help="--methods runs: model.split_vocab (the embedding and head in row blocks of an "
                         "attention projection's size)")
    ap.add_argument("--bucket", type=float, default=5e7,
                    help="--methods runs: reduce and all-gather/prefetch bucket sizes (elements)")
    args = ap.parse_args()

    from ds_relora.models import param_counts, preset_shape

    data = Path(args.data).resolve()
    if not (data / "meta.json").is_file():
        sys.exit(f"--data {data} is not prepared: ds-relora prepare-data --config quickstart "
                 f"--set prepare.max_documents=2000 --out {args.data}")
    vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
    out = Path(args.out).resolve()
    shape = preset_shape(args.preset)
    if args.layers:
        shape = dataclasses.replace(shape, layers=args.layers)
    print(f"machine: {machine_info()}; load average {load_average()}")

    def config(run: str, steps: int, **over) -> dict:
        cfg = {"model": {"preset": args.preset}, "data": {"path": str(data), "seq_len": args.seq},
               "relora": {"rank": args.rank, "alpha": 32, "dropout": 0.0, "reset_every": 2, "restart_warmup_steps": 1,
                          "warm_start_steps": 0},
               "optim": {"lr": 1e-3, "warmup_steps": 1},
               "train": {"method": "relora", "total_steps": steps, "micro_batch_size": 1, "global_batch_size": args.ranks,
                         "eval_every": 0, "eval_batches": 1, "save_every": 0, "run_dir": str(out / run), "keep_last": 1},
               "deepspeed": {"config": str(REPO / "ds_configs" / "zero3.json"),
                             "overrides": {"zero_optimization": {"stage3_max_live_parameters": int(args.max_live),
                                                                 "stage3_max_reuse_distance": int(args.max_live)}}},
               "launch": {"launcher": "local", "num_gpus": args.ranks}}
        for section, values in over.items():
            cfg[section].update(values)
        return cfg

    if args.methods:
        from benchmarks.lifecycle.methods_table import run_methods

        run_methods(args, data, out, config, run_train, run_export, args.methods.split(","),
                    [int(s) for s in args.stages.split(",")])
        return 0
    zero3 = json.loads((REPO / "ds_configs" / "zero3.json").read_text())["zero_optimization"]
    window = 4 * (args.max_live + zero3["stage3_prefetch_bucket_size"] + zero3["reduce_bucket_size"]) / MiB
    hf = out / f"hf_{args.preset}_L{shape.layers}"
    fp32 = write_hf_model(hf, shape, vocab, args.seq)
    print(f"\n## continued: ReLoRA from HF {args.preset} shape, {shape.layers} layers ({fp32 / MiB:,.0f} MiB fp32), "
          f"{args.ranks} ranks ZeRO-3 fp32, max live params {args.max_live:.0e}")
    cfg = config("continued", 4, model={"preset": None, "name_or_path": str(hf), "from_pretrained": True})
    events, wall = run_train(cfg, out / "continued", args.reuse)
    export = run_export(out / "continued" / "checkpoints" / "step-4", out / "continued_export")
    print("\n".join(phase_table(events, export, fp32 / MiB, window, model_states(shape, vocab, args.ranks, args.rank))))
    print(f"train {wall:.0f} s, export {export[1]:.0f} s")
    print("\n".join(estimate_lines(shape, "relora", args.rank, vocab, args.ranks, args.seq)))

    if args.switch_layers:
        small = dataclasses.replace(preset_shape(args.preset), layers=args.switch_layers)
        fp32_small = param_counts(small, vocab)["total"] * 4
        print(f"\n## switch: {args.preset} shape at {args.switch_layers} layers ({fp32_small / MiB:,.0f} MiB fp32): "
              f"2 full-rank steps, switch, 4 ReLoRA steps with merges")
        # The preset is replaced by an HF config folder of the shallower shape (fresh weights).
        small_hf = out / f"hf_{args.preset}_L{args.switch_layers}"
        write_hf_model(small_hf, small, vocab, args.seq)
        cfg = config("switch", 6, model={"preset": None, "name_or_path": str(small_hf), "from_pretrained": False},
                     relora={"warm_start_steps": 2, "rank": args.rank, "alpha": 32, "dropout": 0.0, "reset_every": 2,
                             "restart_warmup_steps": 1})
        events, wall = run_train(cfg, out / "switch", args.reuse)
        export = run_export(out / "switch" / "checkpoints" / "step-6", out / "switch_export")
        print("\n".join(phase_table(events, export, fp32_small / MiB, window, model_states(small, vocab, args.ranks, args.rank))))
        print(f"train {wall:.0f} s, export {export[1]:.0f} s")
        for method in ("full", "relora"):
            print("\n".join(estimate_lines(small, method, args.rank, vocab, args.ranks, args.seq)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
