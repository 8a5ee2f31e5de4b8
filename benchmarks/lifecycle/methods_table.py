"""``run.py --methods``: peak host memory per rank in every phase, per method and ZeRO stage, next
to ``estimate-memory``'s figure for that phase and the bound (planner + 10 %).

One ``ds-relora train`` per (method, stage) on ``--ranks`` CPU ranks (fp32), fresh weights of
the ``--preset`` shape at ``--layers`` layers with a ``--vocab``-row embedding (an HF config
folder: the tokenizer's vocabulary may be smaller), then ``ds-relora export`` of its last
checkpoint. Phases (the trainer's ``memory`` events): build (``init``), first steps, save,
switch and the adapter steps after it (a method with a warm start), projector update (a method
whose ``before_step_phase`` names one), export.

The planner's figure of a phase is the process baseline (a rank's resident set when the build
began) + the model states alive in it (with Adam moments once a step ran) + estimate-memory's
transient for it: build (ZeRO-3: ``init_host``; ZeRO 0-2 on CPU ranks: none, the whole model it
counts *is* the weights), save (``save_host``, plus ZeRO-3's reduce bucket, which the engine
keeps from its first backward on), switch (the larger of the probe's forward beside
the full-rank engine, with its activations and ZeRO buckets, and the adapter phase's build beside
``switch_host``), projector update
(``projection_host``, plus the probe's activations and ZeRO buckets), steps (``activations``, the largest param's gradient, ``step_transient``) +
the ZeRO buckets the DeepSpeed config sizes; on ZeRO-3 the phases that run a forward add the
largest param once more: gloo's all-gather copies each gathered param through a full-size buffer
of its own (CPU ranks; NCCL gathers in place).
The second bound, from issue 23: no phase's transient (peak - baseline - states) above one layer's
fp32 weights (the larger of a decoder layer and the embedding).

A method is one ``--methods`` name: those without settings here run with ``train.method`` set
and the other sections as for galore (a projection optimizer such as apollo: ``--methods
full,relora,galore,apollo``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

MiB = 2**20

# Per method: the config sections beyond the common ones. A name not listed gets {"train": {"method": name}}
# plus PROJECTION_DEFAULTS (a projector update at step 0 and none after, like galore's).
METHOD_SETTINGS = {
    "full": {},
    # 2 full-rank steps, save, switch, 4 ReLoRA steps with a merge (a whole number of cycles after the switch).
    "relora": {"relora": {"warm_start_steps": 2}, "train": {"total_steps": 6}},
    "galore": {"galore": {"update_proj_gap": 1000}},  # one projector update (step 0): each SVD is minutes on CPU
}
PROJECTION_DEFAULTS: dict = {}


def available_mib() -> float:
    """MemAvailable of this machine (shared: each heavy run checks it before it starts)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def method_config(base: dict, method: str) -> dict:
    cfg = json.loads(json.dumps(base))
    cfg["train"]["method"] = method
    for section, values in METHOD_SETTINGS.get(method, PROJECTION_DEFAULTS).items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def write_hf_config(folder: Path, shape, vocab: int, seq: int) -> None:
    """config.json only: the run builds fresh weights of this shape (from_pretrained false)."""
    from ds_relora.models import llama_config

    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        llama_config(shape, vocab, seq).save_pretrained(str(folder))


def planner(shape, method: str, stage: int, ranks: int, rank: int, vocab: int, seq: int, split_vocab: bool = False) -> dict:
    """estimate-memory's per-rank figures (MiB) for one run: model states per engine (with and
    without Adam moments) and each phase's transient."""
    from ds_relora.estimate.memory import estimate_memory
    from ds_relora.models import largest_param

    def estimate(name: str):
        return estimate_memory(shape, name, rank, stage, ranks, 1, seq, vocab, precision="fp32", split_vocab=split_vocab)

    def states(name: str) -> tuple[float, float]:
        est = estimate(name)
        return (est.weights + est.grads + est.master) / MiB, (est.weights + est.grads + est.master + est.adam) / MiB

    est, full = estimate(method), estimate("full")
    largest = 4 * largest_param(shape, vocab, split_vocab)  # the largest param's fp32 bytes (a row block with split_vocab)
    return {"full": states("full"), "adapters": states(method), "activations": est.activations / MiB,
            # backward: the largest param's whole gradient before its reduction; the step: the
            # optimizer step's transient (estimate-memory's step_transient: ZeRO-3 flattens a sub-group
            # of the gradient partition, ZeRO-1/2 in fp32 step the partition where it lies)
            "grad": largest / MiB, "step": {"full": full.step_transient / MiB, "adapters": est.step_transient / MiB},
            # ZeRO-3 gathers each param whole for the forward and the backward, and gloo's
            # all-gather copies through a second full-size buffer (NCCL gathers in place): the
            # largest param once more while it is gathered (measured: the first forward's peak is
            # the embedding twice above the step's start; init_host counts the same copy).
            "gather": (largest if stage == 3 else 0) / MiB,
            "build": (est.init_host if stage == 3 else 0) / MiB, "save": est.save_host / MiB,
            "switch": est.switch_host / MiB, "projector update": est.projection_host / MiB}


def phase_plan(phase: str, engine: str, stepped: bool, plan: dict, window: float, kept: float = 0.0) -> tuple[str, float, float]:
    """(row name, model states MiB, planner's transient MiB) of a trainer ``memory`` phase, run by
    ``engine`` ("full" or "adapters"), after a step of it or not. ``kept``: the ZeRO buckets an
    engine keeps once its first backward has touched them (ZeRO-3's reduce bucket), in a save."""
    held = plan[engine][1 if stepped else 0]
    if phase == "init":
        return "build", held, plan["build"]
    if phase.startswith("train "):
        name = "steps (full rank)" if phase == "train full" else f"steps ({phase[6:]})"
        return name, plan[engine][1], plan["activations"] + window + plan["gather"] + plan["grad"] + plan["step"][engine]
    if phase == "switch":
        # The probe's forward beside the full-rank engine; then, that engine freed, the adapter
        # phase's build beside the snapshot (switch_host): the larger of the two.
        probe = plan["full"][1] + plan["activations"] + window + plan["gather"]
        rebuild = plan["adapters"][0] + plan["switch"] + plan["build"]
        return "switch", held, max(probe, rebuild) - held
    if phase == "projector update":  # GaLore's probe is a forward/backward: ZeRO's windows and activations too
        return phase, held, plan[phase] + plan["activations"] + window + plan["gather"]
    if phase == "save":
        return phase, held, plan["save"] + (kept if stepped else 0.0)
    return phase, held, plan.get(phase, 0.0)


def planned_peak(plan: dict, window: float, warm_start: bool, kept: float = 0.0) -> float:
    """The largest planner figure (MiB above the process baseline) of the phases a run goes through."""
    phases = [("init", "adapters", False), ("train adapters", "adapters", True), ("save", "adapters", True),
              ("projector update", "adapters", True)]
    if warm_start:
        phases += [("init", "full", False), ("train full", "full", True), ("save", "full", True), ("switch", "full", True)]
    return max(held + transient for _, held, transient in (phase_plan(*p, plan, window, kept) for p in phases))


def phase_rows(events: list[dict], plan: dict, window: float, kept: float = 0.0) -> tuple[list[tuple[str, float, float, float]], float]:
    """(phase, peak MiB of any rank, model states MiB, planner MiB) per phase, in run order (a
    phase seen twice, two saves, keeps its largest peak), and the process baseline."""
    base = max(max(e["host_start_mib"]) for e in events if e["phase"] == "init")
    rows: dict[str, tuple[float, float, float]] = {}
    engine = "full" if any(e["phase"] == "train full" for e in events) else "adapters"
    stepped = False
    for e in events:
        phase = e["phase"]
        if phase == "train adapters" and engine == "full":
            engine, stepped = "adapters", False
        name, held, transient = phase_plan(phase, engine, stepped, plan, window, kept)
        if phase.startswith("train "):
            stepped = True
        # The ZeRO buckets are sized by the DeepSpeed config, not the model: counted with the states
        # in the transient column of the phases that run a forward (the steps, GaLore's probe, the
        # switch's probe evaluation); a save on ZeRO-3 releases the gathered params first but not
        # the reduce bucket (``kept``).
        buckets = window if phase.startswith("train ") or phase in ("projector update", "switch") else 0.0
        if phase == "save" and stepped:
            buckets = kept
        peak = max(e["host_peak_mib"])
        if name not in rows or peak > rows[name][0]:
            rows[name] = (peak, held + buckets, base + held + transient)
    return [(name, *values) for name, values in rows.items()], base


def table(method: str, stage: int, events: list[dict], export_mib: float, plan: dict, window: float,
          layer_mib: float, kept: float = 0.0) -> list[str]:
    rows, base = phase_rows(events, plan, window, kept)
    kept_text = f" (kept through a save: {kept:,.0f})" if kept else ""
    lines = [f"### {method}, ZeRO-{stage}: process baseline {base:,.0f} MiB, ZeRO buckets {window:,.0f} MiB{kept_text}, "
             f"one layer's fp32 weights {layer_mib:,.0f} MiB",
             "| phase | peak RSS / rank (MiB) | planner (MiB) | bound: planner + 10 % | within | "
             "transient: peak - baseline - states - ZeRO buckets | <= one layer |",
             "|---|---:|---:|---:|:-:|---:|:-:|"]
    for name, peak, held, plan_mib in rows:
        transient = peak - base - held
        lines.append(f"| {name} | {peak:,.0f} | {plan_mib:,.0f} | {1.1 * plan_mib:,.0f} | "
                     f"{'yes' if peak <= 1.1 * plan_mib else 'NO'} | {transient:,.0f} | "
                     f"{'yes' if transient <= layer_mib else 'NO'} |")
    lines.append(f"| export (1 process) | {export_mib:,.0f} | | | | {export_mib - base:,.0f} (peak - baseline) | "
                 f"{'yes' if export_mib - base <= layer_mib else 'NO'} |")
    return lines


def run_methods(args, data: Path, out: Path, base_config, run_train, run_export, methods: list[str],
                stages: list[int]) -> None:
    """The table of every (method, stage), printed as each run ends (the heavy runs go one at a time)."""
    from ds_relora.models import preset_shape

    shape = dataclasses.replace(preset_shape(args.preset), layers=args.layers or 2)
    hf = out / f"hf_{args.preset}_L{shape.layers}_V{args.vocab}"
    write_hf_config(hf, shape, args.vocab, args.seq)
    h, f = shape.hidden, shape.intermediate
    layer_mib = 4 * max(4 * h * h + 3 * h * f + 2 * h, args.vocab * h) / MiB
    print(f"\n## phases per method: {args.preset} shape, {shape.layers} layers, vocab {args.vocab}"
          f"{' in row blocks (model.split_vocab)' if args.split_vocab else ''}, "
          f"{args.ranks} CPU ranks, fp32, micro-batch 1 x {args.seq}")
    for stage in stages:
        for method in methods:
            run = f"{method}-z{stage}"
            cfg = method_config(base_config(run, 5, model={"preset": None, "name_or_path": str(hf), "from_pretrained": False,
                                                          "split_vocab": args.split_vocab}), method)
            cfg["deepspeed"]["config"] = str(Path(cfg["deepspeed"]["config"]).parent / f"zero{stage}.json")
            zero = cfg["deepspeed"]["overrides"]["zero_optimization"]
            if stage < 3:
                zero.clear()
                zero["allgather_bucket_size"] = int(args.bucket)
            else:
                zero["stage3_prefetch_bucket_size"] = int(args.bucket)
            zero["reduce_bucket_size"] = int(args.bucket)
            # Config-sized, not model-sized: the reduce bucket and the all-gather (ZeRO-2) or
            # prefetch bucket plus the params gathered in flight (ZeRO-3).
            window = 4 * (2 * args.bucket + (args.max_live if stage == 3 else 0)) / MiB
            # ZeRO-3 allocates its reduce bucket once (stage3.py: ``bucket.buffer = torch.empty(reduce_bucket_size)``
            # per communication dtype) and keeps it: resident from the first backward on, through
            # every save (dropping it after two steps freed 205 MiB at this bucket size). ZeRO-2
            # releases its buckets after each step (``_release_ipg_buffers``).
            kept = 4 * args.bucket / MiB if stage == 3 else 0.0
            plan = planner(shape, method, stage, args.ranks, args.rank, args.vocab, args.seq, args.split_vocab)
            # The planner's largest phase plus a process baseline per rank: the planner already
            # counts the phases' transients (a full-rank ZeRO-2 run at this shape peaked at 96 %).
            need = args.ranks * (1000 + planned_peak(plan, window, bool(cfg["relora"].get("warm_start_steps")), kept))
            free = available_mib()
            print(f"\n{run}: {free:,.0f} MiB available, about {need:,.0f} MiB needed", flush=True)
            if free < need and not args.reuse:
                print(f"{run}: skipped (not enough free memory now)", flush=True)
                continue
            events, wall = run_train(cfg, out / run, args.reuse)
            saved = out / run / "export.json"  # the checkpoints are deleted below: --reuse reads the export's figures here
            if args.reuse and saved.is_file():
                export = tuple(json.loads(saved.read_text()))
            else:
                last = max((out / run / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
                export = run_export(last, out / f"{run}_export")
                saved.write_text(json.dumps(export))
            print("\n".join(table(method, stage, events, export[0], plan, window, layer_mib, kept)))
            print(f"train {wall:.0f} s, export {export[1]:.0f} s", flush=True)
            if not args.reuse:  # checkpoints and exports are GBs per run at the 7B shape: the table is kept
                shutil.rmtree(out / f"{run}_export", ignore_errors=True)
                shutil.rmtree(out / run / "checkpoints", ignore_errors=True)
