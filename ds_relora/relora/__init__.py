"""ReLoRA mechanics: the adapter layer, the DeepSpeed-aware merge, the optimizer reset and the
jagged LR schedule."""

from .layer import ReLoRALinear, kaiming_uniform_A, relora_modules, wrap_model
from .merge import merge_and_reinit
from .optim_reset import check_reset_args, keep_mask, reset_moments
from .schedule import JaggedCosine, make_scheduler, merge_points

__all__ = [
    "ReLoRALinear", "kaiming_uniform_A", "relora_modules", "wrap_model", "merge_and_reinit",
    "check_reset_args", "keep_mask", "reset_moments", "JaggedCosine", "make_scheduler", "merge_points",
]
