"""Pre-training methods behind one seam (see ``base``): one file per method, a registry.

Importing this package registers ``full``, ``control``, ``lora``, ``relora``, ``mora``,
``remora`` and ``galore``."""

from ds_relora.methods import full, galore, lora, mora  # noqa: F401  (registers the methods)
from ds_relora.methods.base import METHODS, MergeableLayer, Method, ScheduleSpec, adapter_buffers, get_method, load_adapter_buffers, register, shard_delta

__all__ = ["METHODS", "MergeableLayer", "Method", "ScheduleSpec", "adapter_buffers", "get_method",
           "load_adapter_buffers", "register", "shard_delta"]
