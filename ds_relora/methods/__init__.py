"""Pre-training methods behind one seam (see ``base``): one file per method, a registry."""

from .base import METHODS, MergeableLayer, Method, ScheduleSpec, get_method, register, shard_delta

__all__ = ["METHODS", "MergeableLayer", "Method", "ScheduleSpec", "get_method", "register", "shard_delta"]
