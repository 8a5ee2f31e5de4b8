"""ds_relora: ReLoRA and other low-rank pre-training methods on DeepSpeed ZeRO 0-3."""

# The one source of the version: pyproject.toml reads it from here (setuptools dynamic
# version), so a source tree, an editable and a wheel install all report the same string.
__version__ = "0.1.0"

__all__ = ["__version__"]
