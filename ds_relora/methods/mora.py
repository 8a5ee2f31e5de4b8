"""MoRA: a square, zero-initialised adapter M (r̂ x r̂) with non-parametric compression.

``y = W x + b + f_decomp(M f_comp(x))`` (seed 003, Eq. 2). ``r̂ = int(sqrt((d + k) * r) + 0.5)``
gives M as many parameters as LoRA of rank r on a (d x k) layer: the rounding is the paper
code's (kongds/MoRA, ``peft-mora/src/peft/tuners/lora/layer.py``, ``update_layer``); the paper's
text writes ``floor``. Two compression kinds:

* ``sharing`` (Eq. 6-7, for large r; what the paper's pre-training uses): input dimension j is
  summed into group ``g(j)``, output dimension i reads group ``g'(i)``, so
  ``ΔW[i, j] = M[g'(i), g(j)]``. The base pattern is cyclic, ``g(j) = j mod r̂`` (the code's
  ``mora_type=1``), with zero padding, so every input dimension sits in exactly one group as in
  Eq. 7 (the code pads by repeating x's first entries, which counts them twice).
* ``rope`` (Eq. 8-10, for small r; ``mora_type=6`` in the code): x is cut into
  ``n = ceil(k / r̂)`` chunks of r̂ (zero padded), chunk b is rotated by the RoPE-like block
  rotation R_b (angles ``b * θ_c``, ``θ_c = 10000^(-2c/r̂)``, pairs ``(c, c + r̂/2)`` as in the
  code's rotate-half), M is applied to every chunk and the chunks are concatenated, truncated to
  d, or repeated cyclically when ``d > n r̂`` (as the code does). So ΔW is block diagonal with
  blocks ``P_b = M R_b``. For odd r̂ the last coordinate is left unrotated (the code assumes an
  even r̂).

Group switching (ReMoRA, §5.3: without it merged updates share one expansion pattern): pattern
``o`` permutes the input and output dimensions before the base pattern, ``ΔW_o[i, j] =
ΔW_0[π'_o(i), π_o(j)]``; pattern 0 is the identity. The permutations come from a CPU
``torch.Generator`` seeded from (seed, o, side), so every rank and every later fold rebuilds the
same ones from the two integers kept in the ``mora_pattern`` buffer.

The forward never materialises ΔW (index gathers/adds and a small matmul per token);
:func:`delta_rows` computes any row block of ΔW from M alone, which is what a ZeRO-3 merge adds
into a rank's own shard of W (M-sized communication, no W gather).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ds_relora.errors import ConfigError
from ds_relora.methods.base import AdapterMethod, adapter_rank, register, wrap_targets
from ds_relora.methods.fold import fold_rows
from ds_relora.methods.lora_layer import adopt_frozen_base
from ds_relora.methods.merging import MergingMethod

KINDS = ("sharing", "rope")
ROPE_BASE = 10000.0


def mora_rank(out_features: int, in_features: int, rank: int) -> int:
    """Side r̂ of M with the parameter count of LoRA rank ``rank`` (paper code's rounding)."""
    return int(math.sqrt((in_features + out_features) * rank) + 0.5)


def max_rank_for(out_features: int, in_features: int) -> int:
    """The largest LoRA-equivalent rank r whose r̂ still fits ``min(out, in)``."""
    limit = min(out_features, in_features)
    r = 0
    while mora_rank(out_features, in_features, r + 1) <= limit:
        r += 1
    return r


def check_layer(name: str, out_features: int, in_features: int, rank: int, kind: str) -> int:
    """Validate one layer; returns r̂. Raises a one-line ConfigError naming the fix."""
    if kind not in KINDS:
        raise ConfigError(f"mora.compression='{kind}' is unknown: use one of {', '.join(KINDS)}")
    if rank < 1:
        raise ConfigError(f"mora.rank={rank} must be at least 1")
    r_hat = mora_rank(out_features, in_features, rank)
    limit = min(out_features, in_features)
    if r_hat > limit:
        raise ConfigError(
            f"mora.rank={rank} gives r̂={r_hat} for layer '{name}' ({out_features}x{in_features}), more than "
            f"min(out, in)={limit}: set mora.rank to at most {max_rank_for(out_features, in_features)}"
        )
    return r_hat


def permutation(n: int, seed: int, pattern: int, side: int, device=None) -> torch.Tensor:
    """Permutation of ``range(n)`` for grouping pattern ``pattern`` (0: identity); ``side`` 0/1 = in/out."""
    if pattern == 0:
        return torch.arange(n, device=device)
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(pattern) * 2 + side) % (2**63 - 1))
    return torch.randperm(n, generator=generator).to(device)


class Pattern:
    """Index tables of one expansion pattern of a (d x k) layer (all int64, on ``device``)."""

    def __init__(self, out_features: int, in_features: int, r_hat: int, kind: str, seed: int, pattern: int, device=None):
        self.d, self.k, self.r, self.kind = out_features, in_features, r_hat, kind
        perm_in = permutation(in_features, seed, pattern, 0, device)   # perm_in[p] = column at position p
        self.perm_out = permutation(out_features, seed, pattern, 1, device)  # row i reads position perm_out[i]
        self.perm_in = perm_in
        self.pos_in = torch.empty_like(perm_in)
        self.pos_in[perm_in] = torch.arange(in_features, device=device)  # position of column j
        if kind == "sharing":
            self.group_in = self.pos_in % r_hat          # g(j)
            self.group_out = self.perm_out % r_hat       # g'(i)
        else:
            self.blocks = -(-in_features // r_hat)       # n = ceil(k / r̂)
            self.out_pos = self.perm_out % (self.blocks * r_hat)  # truncation / cyclic repeat
        self._rotations: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def rotation(self, dtype, device):
        """cos and sin (n, r̂) of the block rotations R_b; the unpaired odd coordinate gets cos 1, sin 0.

        Cached per (device, dtype): every layer's forward needs them, and building them (fp64 on
        the CPU, then a host-to-device copy that waits for the GPU) per call stalled each step."""
        key = (torch.device(device), dtype)
        tables = self._rotations.get(key)
        if tables is None:
            # A table first built inside inference_mode (an eval) must still serve training forwards.
            with torch.inference_mode(False):
                cos, sin = rotation_tables(self.blocks, self.r)
                tables = (cos.to(device, dtype), sin.to(device, dtype))
            self._rotations[key] = tables
        return tables


def rotation_tables(blocks: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 cos and sin (blocks, r) of the rope compression: angle ``b * θ_c`` on pairs (c, c + r/2)."""
    half = r // 2
    theta = ROPE_BASE ** (-2.0 * torch.arange(half, dtype=torch.float64) / r)
    angle = torch.arange(blocks, dtype=torch.float64)[:, None] * theta[None, :]
    cos = torch.ones(blocks, r, dtype=torch.float64)
    sin = torch.zeros(blocks, r, dtype=torch.float64)
    c, s = angle.cos(), angle.sin()
    cos[:, :half], cos[:, half:2 * half] = c, c
    sin[:, :half], sin[:, half:2 * half] = s, s
    return cos, sin


def _rotate_half(t: torch.Tensor, r: int) -> torch.Tensor:
    """(-t[h:2h], t[:h], t[2h:]) on the last dim: the partner terms of R_b t."""
    half = r // 2
    return torch.cat([-t[..., half:2 * half], t[..., :half], torch.zeros_like(t[..., 2 * half:])], dim=-1)


def _unrotate_half(t: torch.Tensor, r: int) -> torch.Tensor:
    """(t[h:2h], -t[:h], 0) on the last dim: the partner terms of M R_b, column-wise."""
    half = r // 2
    return torch.cat([t[..., half:2 * half], -t[..., :half], torch.zeros_like(t[..., 2 * half:])], dim=-1)


def apply_delta(m: torch.Tensor, x: torch.Tensor, pat: Pattern) -> torch.Tensor:
    """``ΔW x`` for the last dim of ``x``, computed with compression ops (ΔW never built)."""
    r = pat.r
    if pat.kind == "sharing":
        comp = x.new_zeros(*x.shape[:-1], r).index_add(-1, pat.group_in, x)
        return F.linear(comp, m).index_select(-1, pat.group_out)
    xp = x.index_select(-1, pat.perm_in)
    pad = pat.blocks * r - pat.k
    if pad:
        xp = F.pad(xp, (0, pad))
    chunks = xp.reshape(*x.shape[:-1], pat.blocks, r)
    cos, sin = pat.rotation(x.dtype, x.device)
    rotated = chunks * cos + _rotate_half(chunks, r) * sin
    out = F.linear(rotated, m).reshape(*x.shape[:-1], pat.blocks * r)
    return out.index_select(-1, pat.out_pos)


def delta_rows(m: torch.Tensor, row0: int, row1: int, pat: Pattern) -> torch.Tensor:
    """Rows ``row0:row1`` of ΔW (d x k) from M alone: index gathers (and, for rope, the rotation)."""
    if pat.kind == "sharing":
        return m.index_select(0, pat.group_out[row0:row1]).index_select(1, pat.group_in)
    r = pat.r
    q = pat.out_pos[row0:row1]
    block, within = q // r, q % r
    cos, sin = pat.rotation(m.dtype, m.device)
    rows = m.index_select(0, within)  # M[a, :]
    values = rows * cos[block] + _unrotate_half(rows, r) * sin[block]  # (M R_b)[a, :]
    padded = m.new_zeros(q.numel(), pat.blocks * r)
    cols = block[:, None] * r + torch.arange(r, device=m.device)[None, :]
    padded.scatter_(1, cols, values)
    return padded.index_select(1, pat.pos_in)


def delta_weight(m: torch.Tensor, shape: tuple[int, int], kind: str, group_offset: int = 0, seed: int = 0) -> torch.Tensor:
    """The whole ΔW (d x k) of M for pattern ``group_offset``: for folds, exports and tests."""
    pat = Pattern(shape[0], shape[1], m.shape[0], kind, seed, group_offset, m.device)
    return delta_rows(m, 0, shape[0], pat)


class MoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus MoRA's M. Keeps ``weight``/``bias`` names; adds ``mora_M`` and the
    int64 buffer ``mora_pattern = [seed, pattern]`` (saved, so checkpoints and folds rebuild ΔW)."""

    def __init__(self, base: nn.Linear, rank: int, kind: str, seed: int = 0, name: str = "layer"):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.kind = kind
        self.r_hat = check_layer(name, self.out_features, self.in_features, rank, kind)
        adopt_frozen_base(self, base)
        device, dtype = base.weight.device, base.weight.dtype
        self.mora_M = nn.Parameter(torch.zeros(self.r_hat, self.r_hat, device=device, dtype=dtype))
        self.register_buffer("mora_pattern", torch.tensor([int(seed), 0], dtype=torch.int64, device=device))
        # Python-side copy of the buffer, so the forward never syncs a device to read it.
        self._pattern_key = (int(seed), 0)
        self._pattern_cache: tuple | None = None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._pattern_key = tuple(int(v) for v in self.mora_pattern.tolist())

    def pattern(self, device=None) -> Pattern:
        device = self.mora_pattern.device if device is None else device
        key = (*self._pattern_key, device)
        if self._pattern_cache is None or self._pattern_cache[0] != key:
            seed, index = self._pattern_key
            pat = Pattern(self.out_features, self.in_features, self.r_hat, self.kind, seed, index, device)
            self._pattern_cache = (key, pat)
        return self._pattern_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + apply_delta(self.mora_M, x, self.pattern())

    def delta_rows(self, values: dict[str, torch.Tensor], row0: int, row1: int) -> torch.Tensor:
        """Rows of ΔW from the full fp32 value of M (read from the optimizer's master)."""
        m = values["mora_M"]
        return delta_rows(m, row0, row1, self.pattern(m.device))

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"mora_M": self.mora_M}

    def reset_values(self, values: dict[str, torch.Tensor], generator=None) -> dict[str, torch.Tensor]:
        """M = 0 after a merge (a fresh MoRA layer computes exactly W x)."""
        return {"mora_M": torch.zeros_like(values["mora_M"])}

    def adapter_buffers(self) -> dict[str, torch.Tensor]:
        return {"mora_pattern": self.mora_pattern}

    def load_adapter_buffers(self, values: dict[str, torch.Tensor]) -> None:
        self.mora_pattern.copy_(values["mora_pattern"])
        self._pattern_key = tuple(int(v) for v in values["mora_pattern"].tolist())

    def switch_pattern(self) -> None:
        """Next grouping (ReMoRA); deterministic, so every rank does the same."""
        self.mora_pattern[1] += 1
        self._pattern_key = (self._pattern_key[0], self._pattern_key[1] + 1)

    @torch.no_grad()
    def merge_local(self, switch: bool = True) -> None:
        """Single-process ReMoRA merge: ``W += ΔW(M)`` in fp32, M = 0, next grouping."""
        work = torch.promote_types(self.weight.dtype, torch.float32)  # at least fp32, fp64 stays fp64
        delta = self.delta_rows({"mora_M": self.mora_M.detach().to(work)}, 0, self.out_features)
        self.weight.copy_((self.weight.to(work) + delta).to(self.weight.dtype))
        self.mora_M.zero_()
        if switch:
            self.switch_pattern()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r_hat={self.r_hat}, kind={self.kind}"


def fold_state(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Fold every ``X.mora_M`` into ``X.weight`` (fp64, row blocks: :func:`~ds_relora.methods.fold.fold_rows`)
    using its saved ``X.mora_pattern``; drop both."""
    folded = {}
    for name, tensor in state.items():
        if name.endswith(".mora_M") or name.endswith(".mora_pattern"):
            continue
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix is not None and prefix + ".mora_M" in state:
            seed, index = (int(v) for v in state[prefix + ".mora_pattern"].tolist())
            m = state[prefix + ".mora_M"].double()
            pat = Pattern(tensor.shape[0], tensor.shape[1], m.shape[0], kind, seed, index, m.device)
            tensor = fold_rows(tensor, lambda r0, r1, m=m, pat=pat: delta_rows(m, r0, r1, pat))
        folded[name] = tensor
    return folded


# ----------------------------------------------------------------------------- the methods


@register
class MoRAMethod(AdapterMethod):
    """``train.method: mora``: M trained, never merged (``remora`` merges). Targets, freeze list,
    warm start and the adapter-phase LR come from the ``relora`` section."""

    name = "mora"
    resume_keys = ("mora.rank", "mora.compression", "relora.rank", "relora.target_modules")

    def validate(self, cfg, zero_stage: int) -> None:
        if cfg.mora.compression not in KINDS:
            raise ConfigError(f"mora.compression='{cfg.mora.compression}' is unknown: use one of {', '.join(KINDS)}")
        if adapter_rank(cfg, "mora") < 1:
            raise ConfigError(f"mora.rank={adapter_rank(cfg, 'mora')} must be at least 1")

    def check_shapes(self, cfg, shapes) -> None:
        # Tightest layer first: its bound is the one every layer meets, so one fix is enough.
        for name, out_features, in_features in sorted(shapes, key=lambda s: max_rank_for(s[1], s[2])):
            check_layer(name, out_features, in_features, adapter_rank(cfg, "mora"), cfg.mora.compression)

    def wrap(self, model, cfg, seed: int):
        rank, kind = adapter_rank(cfg, "mora"), cfg.mora.compression
        self.layers = wrap_targets(model, cfg.relora.target_modules, cfg.relora.freeze_modules,
                                   lambda name, base: MoRALinear(base, rank, kind, seed=seed, name=name),
                                   lambda shapes: self.check_shapes(cfg, shapes))
        return self.layers

    def adapter_counts(self, out_features: int, in_features: int, rank: int) -> tuple[int, int]:
        """M is r̂ x r̂ (about LoRA's count, up to r̂'s rounding)."""
        return mora_rank(out_features, in_features, rank) ** 2, 0

    def meta(self, cfg) -> dict:
        return {"mora_compression": cfg.mora.compression}

    def fold(self, state, meta):
        return fold_state(state, meta.get("mora_compression", "sharing"))


@register
class ReMoRAMethod(MergingMethod, MoRAMethod):
    """``train.method: remora``: MoRA plus ReLoRA's merge-and-reinit (``relora.reset_every``,
    optimizer reset, jagged schedule) through the shared ZeRO-exact merge, and a grouping switch
    after every merge (``mora.switch_groups``)."""

    name = "remora"

    def wrap(self, model, cfg, seed: int):
        self.switch = cfg.mora.switch_groups
        return super().wrap(model, cfg, seed)

    def after_merge(self, layer) -> None:
        if self.switch:
            layer.switch_pattern()
