"""The three comparison plots (PNG): validation loss against tokens, LR schedules with merge
points, and final loss against parameters (log-log) with a fitted power law per method."""

from __future__ import annotations

import math
from pathlib import Path


def fit_power_law(rows: list[dict]) -> dict[str, dict]:
    """Per method, least squares of log(loss) = log(a) + b log(N) over the groups' mean final
    loss (N = total params); only methods with at least two distinct sizes get a fit. A group with
    an unfinished run is left out: its last eval is from earlier in the token budget."""
    import numpy as np  # noqa: PLC0415  (numpy is needed only here)

    by_method: dict[str, dict[float, float]] = {}
    for row in rows:
        n, loss = row.get("total_params"), row.get("final_val_loss")
        if n and loss and loss > 0 and not row.get("variant") and row.get("finished", True):
            by_method.setdefault(row["method"], {})[float(n)] = float(loss)
    fits = {}
    for method, points in by_method.items():
        if len(points) < 2:
            continue
        xs, ys = np.log(list(points)), np.log(list(points.values()))
        b, log_a = np.polyfit(xs, ys, 1)
        fits[method] = {"exponent": float(b), "coefficient": float(math.exp(log_a)), "points": len(points),
                        "sizes": sorted(points)}
    return fits


def _colours(runs):
    import matplotlib.pyplot as plt  # noqa: PLC0415  (optional dependency: imported only where it is used)

    methods = list(dict.fromkeys(r.method for r in runs))
    return {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}


def plot_all(runs, rows: list[dict], fits: dict, out: Path) -> list[Path]:
    import matplotlib  # noqa: PLC0415  (optional dependency: imported only where it is used)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415  (optional dependency: imported only where it is used)

    colour = _colours(runs)
    sizes = list(dict.fromkeys(r.size for r in runs))
    markers = "os^Dv<>p*h"
    files = []

    fig, ax = plt.subplots(figsize=(8, 5))
    labelled = set()
    for r in runs:
        pts = [(t, loss) for _, t, loss in r.evals if t is not None]
        if not pts:
            continue
        label = f"{r.method} {r.size}"
        xs, ys = zip(*pts)
        ax.plot(xs, ys, color=colour[r.method], marker=markers[sizes.index(r.size) % len(markers)], ms=3, lw=1.2,
                alpha=0.85, label=None if label in labelled else label)
        labelled.add(label)
    ax.set(xlabel="training tokens", ylabel="validation loss", title="validation loss vs tokens")
    ax.grid(alpha=0.3)
    if labelled:
        ax.legend(fontsize=7, ncol=2)
    files.append(_save(fig, out / "val_loss.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    shown = set()
    for r in runs:  # one run per group: seeds share the schedule
        if r.group in shown or not r.lrs:
            continue
        shown.add(r.group)
        steps, lrs = zip(*r.lrs)
        ax.plot(steps, lrs, color=colour[r.method], lw=1.2, label=f"{r.method} {r.size}")
        lr_at = dict(r.lrs)
        merges = [(s, lr_at[s]) for s in r.merge_steps if s in lr_at]
        if merges:
            ax.scatter(*zip(*merges), color=colour[r.method], marker="x", s=30, zorder=3)
    ax.set(xlabel="step", ylabel="learning rate", title="LR schedule (x: merges)")
    ax.grid(alpha=0.3)
    if shown:
        ax.legend(fontsize=7, ncol=2)
    files.append(_save(fig, out / "lr_schedule.png"))

    fig, ax = plt.subplots(figsize=(6.5, 5))
    plotted = False
    for row in rows:
        if row.get("total_params") and row.get("final_val_loss") and not row.get("variant"):
            ax.errorbar([row["total_params"]], [row["final_val_loss"]], yerr=[row.get("final_val_loss_std") or 0],
                        color=colour.get(row["method"], "k"), marker="o", ms=5, capsize=3)
            plotted = True
    for method, f in fits.items():
        lo, hi = min(f["sizes"]), max(f["sizes"])
        xs = [lo * (hi / lo) ** (i / 20) for i in range(21)]
        ax.plot(xs, [f["coefficient"] * x ** f["exponent"] for x in xs], color=colour.get(method, "k"), lw=1,
                ls="--", label=f"{method}: loss ∝ N^{f['exponent']:.3f}")
    for method in colour:
        if method not in fits:
            ax.plot([], [], color=colour[method], marker="o", ls="", label=method)
    if plotted:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set(xlabel="total parameters N", ylabel="final validation loss", title="scaling (log-log)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    files.append(_save(fig, out / "scaling.png"))
    return files


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt  # noqa: PLC0415  (optional dependency: imported only where it is used)

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
