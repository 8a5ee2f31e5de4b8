"""The names of the files and folders in a run folder (``train.run_dir``), owned here once.

::

    run_dir/
      config.yaml           the resolved run config the workers read (also in every checkpoint)
      metrics.jsonl         the metrics log (train.metrics)
      checkpoints/step-N/   the checkpoints (checkpoint.format, checkpoint.store)
      .ds-relora.lock       one writer per run folder (run_lock)
      .ds-relora-exits/     why each failed rank ended (rank_exits)

Every module that looks into a run folder (the trainer, the resume, the launcher, the sweep and
its comparison, the GPU check) builds those paths from these names, so a folder written by one
is found by the others.
"""

from __future__ import annotations

from pathlib import Path

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LOCK = ".ds-relora.lock"
EXITS = ".ds-relora-exits"


def config_file(run_dir: str | Path) -> Path:
    """The resolved run config ``ds-relora train`` writes and every worker reads."""
    return Path(run_dir) / CONFIG


def metrics_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / METRICS


def checkpoint_root(run_dir: str | Path) -> Path:
    """The folder holding the run's ``step-N`` checkpoints."""
    return Path(run_dir) / CHECKPOINTS


def is_started(run_dir: str | Path) -> bool:
    """Whether a run has written anything of its own (a metrics log or a checkpoint folder)."""
    return metrics_file(run_dir).is_file() or checkpoint_root(run_dir).is_dir()
