"""The ReLoRA linear layer and the wrapper that puts it into a model.

``y = W x + b + s * B(A(dropout(x)))`` with ``s = alpha / r``; W (and b) frozen, A (r x in)
Kaiming-uniform, B (out x r) zero, so a freshly wrapped or re-initialised layer computes
exactly ``W x + b``. (The reference code initialised A = B = 0, which gives no adapter gradient
for the whole first cycle.)

Linears that read the same input (q/k/v of attention, gate/up of the MLP) can share it
(``fuse_shared_inputs``, see ``fused_input.py``): one dropout of the input and one adapter GEMM
``dropout(x) @ cat(A_q, A_k, A_v).T`` for the group, then each member adds its own slice through
``B`` into its base output in place (no output-sized temporary). Every module keeps its own
``lora_A``/``lora_B`` (names, shapes, merge and checkpoints unchanged).

The dropout keeps no dropped copy of the input for backward (``dropout_gemm.py``): the backward
redraws the mask from its seed, so with or without dropout an adapter saves only its input (the
tensor the full-rank layer saves for its weight gradient), ``A x`` and ``A``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ds_relora.errors import ConfigError
from ds_relora.methods.base import wrap_targets
from ds_relora.methods.dropout_gemm import dropout_gemm
from ds_relora.methods.fused_input import link_shared_inputs


def kaiming_uniform_A(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """``kaiming_uniform_(a=sqrt(5))`` for an (r, in) matrix: U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(shape[1])
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def base_delta(a: torch.Tensor, b: torch.Tensor, scale: float, device: torch.device,
               rows: slice = slice(None)) -> torch.Tensor:
    """``scale * b[rows] @ a`` in fp32 on ``device``."""
    return (b[rows].to(device, torch.float32) @ a.to(device, torch.float32)).mul_(scale)  # in place: one W-sized block


def reinit_values(shape_a, shape_b, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh fp32 A (Kaiming, drawn from the CPU ``generator``: the same values on every
    device and rank) and B = 0, both on ``device``."""
    new_a = kaiming_uniform_A(tuple(shape_a), generator).to(device)
    return new_a, torch.zeros(tuple(shape_b), dtype=torch.float32, device=device)


def adopt_frozen_base(module: nn.Module, base: nn.Linear) -> None:
    """Take over ``base``'s ``weight`` and ``bias`` under the same names, frozen: the adapter
    layers of every method (ReLoRA, MoRA) keep a wrapped model's state dict the plain one's."""
    module.weight = base.weight
    module.weight.requires_grad_(False)
    module.bias = base.bias
    if module.bias is not None:
        module.bias.requires_grad_(False)


class ReLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank adapter. Keeps the base's parameter names
    (``weight``, ``bias``) so a wrapped model's state dict is the plain model's plus
    ``lora_A``/``lora_B``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, generator: torch.Generator):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = rank
        self.scale = alpha / rank
        adopt_frozen_base(self, base)
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(kaiming_uniform_A((rank, self.in_features), generator).to(device, dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        self.dropout_p = float(dropout)
        # Set by ``link_shared_inputs`` when this linear shares its input with siblings; kept out of the
        # module tree (a plain attribute, not a submodule) so that state dicts do not change.
        self.__dict__["shared_input"] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.__dict__["shared_input"]
        if group is not None:
            u = group.adapter_input(self, x)
        else:
            u = dropout_gemm(x, self.lora_A, self.dropout_p, self.training)
        return add_adapter(F.linear(x, self.weight, self.bias), u, self.lora_B, self.scale)

    # The MergeableLayer protocol (methods/base.py): what the shared ZeRO-exact merge needs.
    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def delta_rows(self, values: dict[str, torch.Tensor], row0: int, row1: int) -> torch.Tensor:
        """Rows ``row0:row1`` of ``s * B @ A`` in fp32, on the device of ``values``."""
        a = values["lora_A"]
        return base_delta(a, values["lora_B"], self.scale, a.device, slice(row0, row1))

    def reset_values(self, values: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        a = values["lora_A"]
        new_a, new_b = reinit_values(tuple(a.shape), tuple(values["lora_B"].shape), generator, a.device)
        return {"lora_A": new_a, "lora_B": new_b}

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.rank}, scale={self.scale:g}, "
                f"dropout={self.dropout_p:g}")


def add_adapter(y: torch.Tensor, u: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``y + scale * u @ B.T`` written into ``y`` (the base output: nothing in its backward needs
    its value, so autograd allows the in-place ``addmm_``): no output-sized temporary."""
    out = y.reshape(-1, y.shape[-1])
    # In-place ops are not autocast: under torch_autocast (keep_base_fp32) y and u come back in
    # bf16 while B is an fp32 param, so cast the adapter-sized operands to y's dtype.
    out.addmm_(u.reshape(-1, u.shape[-1]).to(out.dtype), lora_b.t().to(out.dtype), alpha=scale)
    return out.view(y.shape)


def check_lora_shapes(rank: int, shapes: list[tuple[str, int, int]]) -> None:
    """Every target ``(name, out, in)`` fits ``relora.rank``; one line naming the fix."""
    if rank < 1:
        raise ConfigError(f"relora.rank={rank} must be at least 1")
    # Smallest layer first: its bound is the one every layer meets, so one fix is enough.
    for name, out_features, in_features in sorted(shapes, key=lambda s: min(s[1], s[2])):
        limit = min(in_features, out_features)
        if rank > limit:
            raise ConfigError(
                f"relora.rank={rank} exceeds min(in, out)={limit} of layer '{name}' "
                f"({out_features}x{in_features}): set relora.rank to at most {limit}"
            )


def wrap_model(
    model: nn.Module,
    *,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: list[str],
    freeze_modules: list[str] = (),
    seed: int = 0,
    fuse_shared_inputs: bool = True,
) -> list[tuple[str, ReLoRALinear]]:
    """Replace every ``nn.Linear`` whose name matches a target regex by a ReLoRA layer, in place,
    through the adapter methods' one wrapper (``base.wrap_targets``); A is drawn from one
    generator seeded with ``seed``, layer by layer in module order.

    Other parameters stay trainable full-rank unless their name matches ``freeze_modules``.
    ``fuse_shared_inputs``: one dropout and one adapter GEMM per shared input (q/k/v, gate/up).
    """
    generator = torch.Generator().manual_seed(seed)
    layers = wrap_targets(model, target_modules, freeze_modules,
                          lambda name, base: ReLoRALinear(base, rank, alpha, dropout, generator),
                          lambda shapes: check_lora_shapes(rank, shapes))
    if fuse_shared_inputs:
        link_shared_inputs(model, ReLoRALinear)
    return layers
