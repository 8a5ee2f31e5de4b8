"""One dropout and one adapter GEMM for ReLoRA linears that read the same input.

q/k/v of a LLaMA attention block (and gate/up of its MLP) are called one after the other on the
same tensor. Unfused, each draws its own mask and runs its own r-wide GEMM; fused, the first
member of the group to be called computes

    U = dropout(x) @ cat(A_q, A_k, A_v).T    # one mask, one GEMM, split into each member's r columns

and the others take their slice from the cache. Dropout semantics change slightly: the members
see the *same* mask instead of independent ones. Each member's adapter still sees inputs dropped
with probability p and rescaled by 1/(1-p), so every member's expected update and the regulariser
strength are unchanged; only the correlation between q's, k's and v's noise differs. (Fused-QKV
models, whose single linear sees one dropped input, have exactly these semantics.)

ZeRO-3 gathers a module's parameters in that module's own forward hook, so a sibling's ``lora_A``
is not available when the first member runs. There the group shares the mask's seed only and
every member runs its own dropout GEMM on its own input alias (the GEMM fusion, a speed detail at
r << h, is lost; memory is the same, as no member saves a dropped copy, see ``dropout_gemm.py``).
Under ``torch.compile`` the cache is bypassed: each member draws its own mask, as unfused.

The cache is keyed on the input's memory (identity or alias), version, grad mode and train/eval,
and is emptied once every member took its slice, so it holds nothing between forwards. Under
activation checkpointing the recompute sees a new input tensor (a cache miss), recomputes the
group, and draws the same mask because checkpoint restores the RNG state.
"""

from __future__ import annotations

import torch
from torch import nn

from ds_relora.methods.dropout_gemm import draw_seed, dropout_gemm

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
        self._seed = None
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
        p, training = member.dropout_p, member.training
        seed = draw_seed() if training and p > 0 else None
        a_params = [m.lora_A for m in self.members]
        if any(_is_zero3_partitioned(a) for a in a_params):
            self._seed = seed  # ZeRO-3: only this member's A is gathered; share the mask only
        else:
            u = dropout_gemm(x, torch.cat(a_params, dim=0), p, training, seed)
            self._u = u.split([a.shape[0] for a in a_params], dim=-1)
        self._x = x
        self._x_version = x._version
        self._mode = mode

    def adapter_input(self, member: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``dropout(x) @ member.lora_A.T`` with the dropout (and GEMM) shared by the group."""
        if torch.compiler.is_compiling():
            # Identity and version checks of a Python-side cache break graphs: compiled, every
            # member computes its own adapter input (its own mask, as unfused).
            return dropout_gemm(x, member.lora_A, member.dropout_p, member.training)
        i = self._index[id(member)]
        mode = (torch.is_grad_enabled(), member.training)
        # A member called twice on the same tensor gets a fresh computation (a fresh mask), as
        # it would unfused.
        if not self._valid_for(x, mode) or i in self._served:
            self._fill(member, x, mode)
        self._served.add(i)
        if self._u is not None:
            u = self._u[i]
        else:
            u = dropout_gemm(x, member.lora_A, member.dropout_p, member.training, self._seed)
        if len(self._served) == len(self.members):
            self._clear()
        return u


def link_shared_inputs(model: nn.Module, layer_type: type[nn.Module]) -> list[SharedInput]:
    """Give every group of sibling adapter linears of ``layer_type`` (the LoRA layer) named in
    ``SHARED_INPUT_GROUPS`` (same parent, same input width, dropout probability and dtype) one
    ``SharedInput``. The type is a parameter so that this module does not import the layer's."""
    groups = []
    for parent in model.modules():
        for names in SHARED_INPUT_GROUPS:
            members = [getattr(parent, n, None) for n in names]
            members = [m for m in members if isinstance(m, layer_type)]
            if len(members) < 2:
                continue
            first = members[0]
            if any(m.in_features != first.in_features or m.dropout_p != first.dropout_p
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
