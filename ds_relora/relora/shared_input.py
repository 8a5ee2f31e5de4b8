"""One dropout and one adapter GEMM for ReLoRA linears that read the same input.

q/k/v of a LLaMA attention block (and gate/up of its MLP) are called one after the other on the
same tensor. Unfused, each keeps its own dropped copy of that input (plus a mask) for backward
and runs its own r-wide GEMM; fused, the first member of the group to be called computes

    x_drop = dropout(x)                      # one mask, one saved copy for the whole group
    U      = x_drop @ cat(A_q, A_k, A_v).T   # one GEMM, split into each member's r columns

and the others take their slice from the cache. Dropout semantics change slightly: the members
see the *same* mask instead of independent ones. Each member's adapter still sees inputs dropped
with probability p and rescaled by 1/(1-p), so every member's expected update and the regulariser
strength are unchanged; only the correlation between q's, k's and v's noise differs. (Fused-QKV
models, whose single linear sees one dropped input, have exactly these semantics.)

ZeRO-3 gathers a module's parameters in that module's own forward hook, so a sibling's ``lora_A``
is not available when the first member runs. There the group shares the dropout only and every
member runs its own A GEMM on the shared ``x_drop`` (the memory saving is kept; the GEMM fusion,
a speed detail at r << h, is not).

The cache is keyed on the input's memory (identity or alias), version, grad mode and train/eval,
and is emptied once every member took its slice, so it holds nothing between forwards. Under
activation checkpointing the recompute sees a new input tensor (a cache miss), recomputes the
group, and draws the same mask because checkpoint restores the RNG state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Sibling names that are called on one shared tensor in HF LLaMA/Mistral/Qwen-style blocks.
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _is_zero3_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


class SharedInput:
    """The cache of one group of linears sharing an input; a plain object, not an ``nn.Module``
    (the members' parameters stay registered only in the members)."""

    def __init__(self, members: list[nn.Module]):
        self.members = members
        self._index = {id(m): i for i, m in enumerate(members)}
        self._clear()

    def _clear(self) -> None:
        self._x = None
        self._x_version = -1
        self._mode = None
        self._x_drop = None
        self._u = None
        self._served: set[int] = set()

    def _valid_for(self, x: torch.Tensor, mode: tuple) -> bool:
        # Same tensor, or an alias of the same memory: ZeRO-3's forward pre-hook hands every module
        # its own ``detach()``-ed alias of the input (for its post-backward hook). Reusing the first
        # member's x_drop then routes the adapter's input gradient through that member's alias,
        # which passes it on unchanged to the same producer. The cache holds x itself, so its memory
        # cannot be reused by another tensor while the entry lives; aliases share the version counter.
        c = self._x
        return (c is not None and self._mode == mode and self._x_version == x._version
                and (c is x or (c.data_ptr() == x.data_ptr() and c.shape == x.shape and c.stride() == x.stride()
                                and c.dtype == x.dtype and c.device == x.device)))

    def _fill(self, member: nn.Module, x: torch.Tensor, mode: tuple) -> None:
        self._clear()
        x_drop = member.dropout(x)
        a_params = [m.lora_A for m in self.members]
        if any(_is_zero3_partitioned(a) for a in a_params):
            self._x_drop = x_drop  # ZeRO-3: only this member's A is gathered; share the dropout only
        else:
            u = F.linear(x_drop, torch.cat(a_params, dim=0))
            self._u = u.split([a.shape[0] for a in a_params], dim=-1)
        self._x = x
        self._x_version = x._version
        self._mode = mode

    def adapter_input(self, member: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``dropout(x) @ member.lora_A.T`` with the dropout (and GEMM) shared by the group."""
        i = self._index[id(member)]
        mode = (torch.is_grad_enabled(), member.training)
        # A member called twice on the same tensor gets a fresh computation (a fresh mask), as
        # it would unfused.
        if not self._valid_for(x, mode) or i in self._served:
            self._fill(member, x, mode)
        self._served.add(i)
        u = self._u[i] if self._u is not None else F.linear(self._x_drop, member.lora_A)
        if len(self._served) == len(self.members):
            self._clear()
        return u


def link_shared_inputs(model: nn.Module) -> list[SharedInput]:
    """Give every group of sibling ReLoRA linears named in ``SHARED_INPUT_GROUPS`` (same parent,
    same input width, dropout probability and dtype) one ``SharedInput``."""
    from .layer import ReLoRALinear

    groups = []
    for parent in model.modules():
        for names in SHARED_INPUT_GROUPS:
            members = [getattr(parent, n, None) for n in names]
            members = [m for m in members if isinstance(m, ReLoRALinear)]
            if len(members) < 2:
                continue
            first = members[0]
            p = getattr(first.dropout, "p", 0.0)
            if any(m.in_features != first.in_features or getattr(m.dropout, "p", 0.0) != p
                   or m.lora_A.dtype != first.lora_A.dtype for m in members):
                continue
            group = SharedInput(members)
            for m in members:
                m.__dict__["shared_input"] = group
            groups.append(group)
    return groups


def unlink_shared_inputs(model: nn.Module) -> None:
    """Back to one dropout and one adapter GEMM per linear."""
    for m in model.modules():
        if "shared_input" in m.__dict__:
            m.__dict__["shared_input"] = None
