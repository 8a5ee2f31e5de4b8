"""Singular-value spectrum of the weight change between two checkpoints (ReLoRA paper, Fig. 3/4).

ReLoRA's claim is that a sum of low-rank merges is itself high-rank. The check: take the
effective weights (adapters merged with ``lora_scale``) of two checkpoints or exports,
``dW = W_after - W_before`` for every wrapped matrix type, and look at its singular values;
the paper counts those below 0.1 per type, summed over layers (Fig. 4): few small singular
values means a high-rank update.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ds_relora.checkpoint.weights import EffectiveWeights
from ds_relora.errors import CheckpointError
from ds_relora.models import WRAPPED_TYPES

DEFAULT_THRESHOLD = 0.1


def _layer_key(name: str) -> tuple:
    # Natural order (layer 2 before layer 10) so per-layer lists line up with the model.
    return tuple(int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name))


def _matrix_type(name: str) -> str | None:
    for kind in WRAPPED_TYPES:
        if name == f"{kind}.weight" or name.endswith(f".{kind}.weight"):
            return kind
    return None


def compute_spectrum(before: str | Path, after: str | Path) -> dict[str, list[np.ndarray]]:
    """Singular values (float64, descending) of ``W_after - W_before`` per wrapped matrix type.

    Each list holds one array per matching parameter, in layer order. Both folders may be
    ds_relora checkpoints or exported models; read one layer at a time (two modules in memory).
    """

    for label, folder in (("before", before), ("after", after)):
        if not Path(folder).is_dir():
            raise CheckpointError(f"{label} folder {folder} does not exist: pass a checkpoints/step-N or exported model folder")
    w_before = EffectiveWeights(before)
    w_after = EffectiveWeights(after)
    names = sorted((n for n in w_after.raw_names() if _matrix_type(n)), key=_layer_key)
    if not names:
        raise CheckpointError(
            f"{after} has no weights named *.<type>.weight for type in {', '.join(WRAPPED_TYPES)}: "
            "point at a LLaMA-shaped ds_relora checkpoint or export"
        )
    spectra: dict[str, list[np.ndarray]] = {}
    for name in names:
        a, b = w_after.get(name), w_before.get(name)
        if b is None:
            raise CheckpointError(f"{name} is in {after} but not in {before}: compare two checkpoints of the same model")
        if a.shape != b.shape:
            raise CheckpointError(
                f"{name} has shape {tuple(b.shape)} in {before} but {tuple(a.shape)} in {after}: "
                "compare two checkpoints of the same model"
            )
        delta = a.to(torch.float64) - b.to(torch.float64)
        spectra.setdefault(_matrix_type(name), []).append(torch.linalg.svdvals(delta).numpy())
    return spectra


def count_small(spectra: dict[str, list[np.ndarray]], threshold: float = DEFAULT_THRESHOLD) -> dict[str, int]:
    """Singular values below ``threshold`` per matrix type, summed over layers (paper, Fig. 4)."""
    return {kind: int(sum(int((s < threshold).sum()) for s in values)) for kind, values in spectra.items()}


def plot_spectrum(spectra: dict[str, list[np.ndarray]], out_png: str | Path, *, per_layer: bool = False,
                  threshold: float = DEFAULT_THRESHOLD, title: str | None = None) -> Path:
    """One line per matrix type: its singular values in descending order, on a log y axis.

    By default the line is the mean over layers of the i-th largest singular value; with
    ``per_layer`` every layer is drawn (thin, same colour per type). Exact zeros are drawn at
    1e-12 because a log axis cannot show them.
    """
    import matplotlib  # noqa: PLC0415  (optional dependency: imported only where it is used)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415  (optional dependency: imported only where it is used)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (kind, values) in enumerate(spectra.items()):
        colour = colours[i % len(colours)]
        if per_layer:
            for j, s in enumerate(values):
                ax.plot(np.maximum(s, 1e-12), color=colour, lw=0.6, alpha=0.6, label=kind if j == 0 else None)
        else:
            mean = np.mean(np.stack(values), axis=0)  # same type => same shape in every layer
            ax.plot(np.maximum(mean, 1e-12), color=colour, lw=1.5, label=kind)
    ax.axhline(threshold, color="grey", ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("singular value index (descending)")
    ax.set_ylabel("singular value of ΔW" + ("" if per_layer else " (mean over layers)"))
    ax.set_title(title or "Spectrum of ΔW = W_after − W_before")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def format_report(spectra: dict[str, list[np.ndarray]], threshold: float = DEFAULT_THRESHOLD) -> str:
    """Markdown table: type, #matrices, #singular values, #below threshold, median singular value."""
    small = count_small(spectra, threshold)
    lines = [f"| type | #matrices | #singular values | #below {threshold:g} | median σ |",
             "|---|---:|---:|---:|---:|"]
    everything = []
    for kind, values in spectra.items():
        flat = np.concatenate(values)
        everything.append(flat)
        lines.append(f"| {kind} | {len(values)} | {flat.size} | {small[kind]} | {np.median(flat):.4g} |")
    if not everything:
        return "\n".join(lines)
    flat = np.concatenate(everything)
    n_matrices = sum(len(v) for v in spectra.values())
    lines.append(f"| all | {n_matrices} | {flat.size} | {sum(small.values())} | {np.median(flat):.4g} |")
    return "\n".join(lines)
