"""ds_relora: ReLoRA and other low-rank pre-training methods on DeepSpeed ZeRO 0-3."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("ds_relora")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
