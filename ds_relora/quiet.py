"""Worker-side quieting: keep a rank's console to what a user acts on.

Every rank of a CPU/GPU run otherwise prints the same library notices around the progress
bar (one copy per rank): torch's FutureWarning that ``all_gather_into_tensor`` is deprecated
(DeepSpeed 0.19 calls it on every ZeRO step), DeepSpeed's INFO banners and transformers'
advisory logs. :func:`quiet_worker` silences exactly those; our own messages, tracebacks and
every other warning stay. ``DS_RELORA_VERBOSE=1`` turns it off for debugging (and keeps the
deepspeed launcher at its INFO level, see ``launch.launcher_quiet``).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping

# (category, message regex) of library warnings that say nothing about the user's run.
IGNORED_WARNINGS = (
    # torch 2.x deprecates the c10d names DeepSpeed 0.19 still calls (all_gather_into_tensor, ...).
    (FutureWarning, r"`torch\.distributed\.\w+` is deprecated"),
    # DeepSpeed's own deprecation notices for torch APIs it uses internally.
    (FutureWarning, r"`torch\.cuda\.amp\.\w+\(args\.\.\.\)` is deprecated"),
)


def verbose_requested(env: Mapping[str, str]) -> bool:
    """``DS_RELORA_VERBOSE=1``: keep every library's console output (debugging, launch tests)."""
    return env.get("DS_RELORA_VERBOSE", "0").lower() not in ("", "0", "false", "no")


def quiet_worker(verbose: bool | None = None) -> bool:
    """Install the filters in this process (idempotent); returns whether anything was quieted."""
    if verbose is None:
        verbose = verbose_requested(os.environ)
    if verbose:
        return False
    for category, pattern in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    from deepspeed.utils import logger as ds_logger  # noqa: PLC0415  (deepspeed takes seconds to import and patches torch; only code that builds an engine needs it)

    ds_logger.setLevel(logging.WARNING)
    try:
        import transformers  # noqa: PLC0415  (optional dependency: imported only where it is used)

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass
    return True


def quiet_transformers_loading() -> None:
    """For ``from_pretrained`` in a command whose output is its result (``ds-relora eval``):
    transformers >= 5 draws a "Loading weights" progress bar per load and logs advisory notices
    (e.g. the ``torch_dtype`` rename). Errors still raise; ``DS_RELORA_VERBOSE=1`` keeps them all."""
    if verbose_requested(os.environ):
        return
    from transformers.utils import logging as hf_logging  # noqa: PLC0415  (transformers takes seconds to import; only code that builds a model needs it)

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
