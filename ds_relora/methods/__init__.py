"""Pre-training methods behind one seam (see ``base``): one file per method, a registry.

Importing this package registers ``full``, ``control``, ``lora``, ``relora``, ``mora``,
``remora``, ``galore``, ``apollo``, ``apollo_mini`` and ``fira``."""

from ds_relora.methods import apollo, fira, full, galore, lora, mora  # noqa: F401  (registers the methods)
from ds_relora.methods.base import (
           METHODS,
           MergeableLayer,
           Method,
           ScheduleSpec,
           adapter_buffers,
           get_method,
           load_adapter_buffers,
           register,
           shard_delta,
)

# The project's own method: what `estimate-memory`, the throughput pair and the GPU check run when
# not told otherwise. Code outside this package names methods only through these constants.
DEFAULT_METHOD = "relora"
# Format-1 checkpoints recorded no method: they held ReLoRA/LoRA adapters (folded alike) or none.
FORMAT_1_METHOD = "relora"

__all__ = ["DEFAULT_METHOD", "FORMAT_1_METHOD", "METHODS", "MergeableLayer", "Method", "ScheduleSpec", "adapter_buffers", "get_method",
           "load_adapter_buffers", "register", "shard_delta"]
