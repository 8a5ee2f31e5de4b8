"""``ds-relora compare``: one table (markdown + CSV) and plots from run folders or sweep folders.

Works on finished and unfinished runs alike: every number comes from what the folder holds now
(``metrics.jsonl``, ``config.yaml``, checkpoint ``meta.json``, ``sweep_point.json``,
``sweep_state.json``, ``lm_eval.json``). Records are read by key and defensively: a resumed run
may have written a step twice (the later record wins), a killed one may end in a cut line.
Runs that differ only in ``train.seed`` (and run-control fields) form one group, shown as
mean ± std.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
import statistics
from pathlib import Path
from typing import Optional

import yaml

from ds_relora.checkpoint.choose import complete_checkpoints
from ds_relora.checkpoint.meta import CheckpointMeta, read_meta
from ds_relora.checkpoint.store import write_atomic
from ds_relora.errors import CheckpointError, UserError
from ds_relora.run_folder import checkpoint_root, config_file, metrics_file
from ds_relora.study.lm_eval import RESULTS_FILE, read_task_scores
from ds_relora.study.plots import fit_power_law, plot_all
from ds_relora.study.runner import STATE_FILE, point_state
from ds_relora.study.sweep import POINT_FILE, POINTS_FILE, comparable

PEAK_KEY = re.compile(r"^peak_.*_(mb|mib)$")


@dataclasses.dataclass
class RunSummary:
    """What one run folder says about itself."""

    run_dir: Path
    name: str
    method: str
    size: str
    seed: Optional[int]
    variant: str                      # sweep values other than method, size and seed
    group: str                        # runs with equal groups differ only in the seed
    status: str
    step: int
    total_steps: Optional[int]
    trainable: Optional[int] = None
    total: Optional[int] = None
    tokens: Optional[int] = None
    final_val_loss: Optional[float] = None
    final_val_ppl: Optional[float] = None
    eval_step: Optional[int] = None
    wall_s: Optional[float] = None
    tokens_per_s: Optional[float] = None
    peak_mem_mb: Optional[float] = None
    merges: Optional[int] = None
    evals: list = dataclasses.field(default_factory=list)      # (step, tokens, loss)
    lrs: list = dataclasses.field(default_factory=list)        # (step, lr)
    merge_steps: list = dataclasses.field(default_factory=list)
    tasks: dict = dataclasses.field(default_factory=dict)      # "task/metric" -> value


def read_records(path: Path) -> tuple[dict[int, dict], dict[str, dict[int, dict]]]:
    """(step -> step record, event name -> step -> event record); the last record of a step wins."""
    steps: dict[int, dict] = {}
    events: dict[str, dict[int, dict]] = {}
    if not path.is_file():
        return steps, events
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            continue
        if rec.get("type") == "step":
            steps[rec["step"]] = rec
        elif rec.get("type") == "event" and rec.get("event"):
            events.setdefault(str(rec["event"]), {})[rec["step"]] = rec
    return steps, events


def _num(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _peak_mem(records) -> Optional[float]:
    found = []
    for rec in records:
        for key, value in rec.items():
            if PEAK_KEY.match(key):
                values = value if isinstance(value, list) else [value]
                found += [v for v in map(_num, values) if v is not None]
    return max(found) if found else None


def _latest_meta(run_dir: Path) -> CheckpointMeta | None:
    """The newest checkpoint's meta, or None (no checkpoint, or one this version cannot read:
    the comparison then takes the counts from the metrics log)."""

    found = complete_checkpoints(checkpoint_root(run_dir))
    try:
        return read_meta(found[-1][1]) if found else None
    except CheckpointError:
        return None


def summarize_run(run_dir: Path) -> RunSummary:
    run_dir = Path(run_dir)
    cfg = yaml.safe_load(config_file(run_dir).read_text()) if config_file(run_dir).is_file() else {}
    cfg = cfg or {}
    point = _read_json(run_dir / POINT_FILE)
    model, train = cfg.get("model") or {}, cfg.get("train") or {}
    size = model.get("preset") or Path(str(model.get("name_or_path") or "?")).name
    values = {k: v for k, v in (point.get("values") or {}).items() if k not in ("model.preset", "train.seed")}
    variant = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in values.items())
    key = comparable(cfg)
    key.get("train", {}).pop("seed", None)
    method = point.get("method") or train.get("method") or "?"
    group = json.dumps([method, key], sort_keys=True, default=str)
    state = point_state(run_dir)
    s = RunSummary(run_dir, point.get("name") or run_dir.name, method, str(size), train.get("seed"), variant, group,
                   state["status"], state["step"], state["total_steps"])
    steps, events = read_records(metrics_file(run_dir))
    ordered = [steps[k] for k in sorted(steps)]
    if ordered:
        last = ordered[-1]
        s.tokens = last.get("tokens")
        per_step = (last["tokens"] / last["step"]) if _num(last.get("tokens")) and last["step"] else None
        step_time = [_num(r.get("step_time")) for r in ordered]
        if per_step and all(t is not None for t in step_time) and sum(step_time) > 0:
            s.tokens_per_s = per_step * len(ordered) / sum(step_time)
        else:
            rates = [v for v in (_num(r.get("tokens_per_s")) for r in ordered) if v is not None]
            s.tokens_per_s = statistics.fmean(rates) if rates else None
    else:
        per_step = None
    for step in sorted(events.get("eval", {})):
        loss = _num(events["eval"][step].get("loss"))
        if loss is None:
            continue
        tokens = steps.get(step, {}).get("tokens") or (step * per_step if per_step else None)
        s.evals.append((step, tokens, loss))
    if s.evals:
        s.eval_step, _, s.final_val_loss = s.evals[-1]
        ppl = _num(events["eval"][s.eval_step].get("perplexity"))
        s.final_val_ppl = ppl if ppl is not None else math.exp(min(s.final_val_loss, 50.0))
    s.lrs = [(r["step"], r["lr"]) for r in ordered if _num(r.get("lr")) is not None]
    s.merge_steps = sorted(events.get("merge", {}))
    s.merges = len(s.merge_steps) if (ordered or events) else None
    every = [*ordered, *(e for kind in events.values() for e in kind.values())]
    s.peak_mem_mb = _peak_mem(every)
    meta = _latest_meta(run_dir)
    params = meta.params if meta is not None else None
    if not params and events.get("switch"):
        params = events["switch"][max(events["switch"])].get("params")
    if isinstance(params, dict):
        s.trainable, s.total = params.get("trainable"), params.get("total")
    state_file = _read_json(run_dir / STATE_FILE)
    if _num(state_file.get("wall_s")) is not None:
        s.wall_s = state_file["wall_s"]
    else:
        times = [t for t in (_num(r.get("time")) for r in every) if t is not None]
        s.wall_s = max(times) - min(times) if len(times) > 1 else None
    s.tasks = read_task_scores(run_dir)
    return s


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def find_runs(paths: list[str]) -> list[Path]:
    """Run folders from run folders and sweep folders (in the sweep's point order)."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if (p / POINTS_FILE).is_file():
            out += [Path(e["run_dir"]) for e in json.loads((p / POINTS_FILE).read_text())]
        elif config_file(p).is_file() or metrics_file(p).is_file():
            out.append(p)
        elif p.is_dir() and any(config_file(c).is_file() for c in p.iterdir()):
            out += sorted(c for c in p.iterdir() if config_file(c).is_file())
        else:
            raise UserError(f"{p} is neither a run folder (config.yaml, metrics.jsonl) nor a sweep folder "
                            f"({POINTS_FILE}): pass run_dir folders or a sweep's folder")
    return out


# ----------------------------------------------------------------------------- tables
def _mean_std(values: list) -> tuple[Optional[float], Optional[float]]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def group_runs(runs: list[RunSummary]) -> list[list[RunSummary]]:
    """Groups in a sensible order: by model size (params), then method in first-seen order."""
    groups: dict[str, list[RunSummary]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    method_order = {m: i for i, m in enumerate(dict.fromkeys(r.method for r in runs))}

    def key(g):
        sizes = [r.total for r in g if r.total]
        return (min(sizes) if sizes else math.inf, g[0].size, method_order[g[0].method], g[0].variant)

    return sorted(groups.values(), key=key)


def task_columns(runs: list[RunSummary]) -> list[str]:
    return sorted({k for r in runs for k in r.tasks})


def group_row(g: list[RunSummary], tasks: list[str]) -> dict:
    counts: dict[str, int] = {}
    for r in g:
        counts[r.status] = counts.get(r.status, 0) + 1
    row = {"method": g[0].method, "variant": g[0].variant, "size": g[0].size, "runs": len(g),
           "seeds": " ".join(str(r.seed) for r in g), "status": ", ".join(f"{n} {k}" for k, n in counts.items()),
           "trainable_params": g[0].trainable, "total_params": g[0].total,
           "finished": all(r.status == "done" for r in g)}
    for field in ("tokens", "final_val_loss", "final_val_ppl", "wall_s", "tokens_per_s", "merges"):
        row[field], row[field + "_std"] = _mean_std([getattr(r, field) for r in g])
    peaks = [r.peak_mem_mb for r in g if r.peak_mem_mb is not None]
    row["peak_mem_mb"] = max(peaks) if peaks else None
    for t in tasks:
        row[t], row[t + "_std"] = _mean_std([r.tasks.get(t) for r in g])
    return row


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if v == 0 or abs(v) >= 1000 or (v.is_integer() and abs(v) >= 1):
            return f"{v:,.0f}"
        return f"{v:.{digits}g}" if abs(v) >= 1e-3 else f"{v:.3e}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _pm(mean, std, digits: int = 4) -> str:
    if mean is None:
        return ""
    return _fmt(mean, digits) + (f" ± {std:.2g}" if std is not None else "")


MD_HEADERS = ["method", "size", "runs", "status", "trainable params", "total params", "tokens", "final val loss",
              "val ppl", "wall s", "tokens/s", "peak MB/rank", "merges"]


def markdown_table(rows: list[dict], tasks: list[str]) -> str:
    headers = MD_HEADERS + tasks
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        label = row["method"] + (f" ({row['variant']})" if row["variant"] else "")
        cells = [label, row["size"], str(row["runs"]), row["status"], _fmt(row["trainable_params"]),
                 _fmt(row["total_params"]), _fmt(row["tokens"]), _pm(row["final_val_loss"], row["final_val_loss_std"]),
                 _pm(row["final_val_ppl"], row["final_val_ppl_std"]), _fmt(row["wall_s"], 3),
                 _fmt(row["tokens_per_s"], 3), _fmt(row["peak_mem_mb"], 4), _fmt(row["merges"])]
        cells += [_pm(row[t], row[t + "_std"], 3) for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


RUN_FIELDS = ["name", "method", "variant", "size", "seed", "status", "step", "total_steps", "trainable", "total",
              "tokens", "final_val_loss", "final_val_ppl", "eval_step", "wall_s", "tokens_per_s", "peak_mem_mb",
              "merges", "run_dir"]


def _csv(fields: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    return buf.getvalue()


def compare(paths: list[str], out: Path, plots: bool = True) -> dict:
    """Write compare.md, compare.csv (one row per group), runs.csv (one per run) and the PNGs."""

    runs = [summarize_run(p) for p in find_runs(paths)]
    if not runs:
        raise UserError("no run folders to compare: pass run folders or a sweep folder")
    tasks = task_columns(runs)
    groups = group_runs(runs)
    rows = [group_row(g, tasks) for g in groups]
    out.mkdir(parents=True, exist_ok=True)
    fits = fit_power_law(rows)
    text = markdown_table(rows, tasks)
    if fits:
        text += "\n\nscaling fits (final val loss = a x total params^b):\n"
        text += "\n".join(f"- {m}: b = {f['exponent']:.4f}, a = {f['coefficient']:.4g} ({f['points']} sizes)"
                          for m, f in fits.items())
    write_atomic(out / "compare.md", text + "\n")
    group_fields = list(rows[0])
    write_atomic(out / "compare.csv", _csv(group_fields, rows))
    run_rows = [{**{f: getattr(r, f) for f in RUN_FIELDS}, **r.tasks} for r in runs]
    write_atomic(out / "runs.csv", _csv(RUN_FIELDS + tasks, run_rows))
    files = [out / "compare.md", out / "compare.csv", out / "runs.csv"]
    if plots:
        files += plot_all(runs, rows, fits, out)
    return {"table": text, "runs": runs, "rows": rows, "fits": fits, "files": files}


__all__ = ["RESULTS_FILE", "RunSummary", "compare", "find_runs", "read_records", "summarize_run"]
