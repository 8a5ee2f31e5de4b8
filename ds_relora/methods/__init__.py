"""Pre-training methods behind one seam (see ``base``): one file per method, a registry.

Importing this package registers ``mora``, ``remora`` and ``galore``; ``full``, ``control``,
``lora`` and ``relora`` move onto the seam next (their mapping is in ``base``'s docstring)."""

from . import galore, mora  # noqa: F401  (registers the methods)
from .base import METHODS, MergeableLayer, Method, ScheduleSpec, get_method, register, shard_delta

__all__ = ["METHODS", "MergeableLayer", "Method", "ScheduleSpec", "get_method", "register", "shard_delta"]
