"""The method seam: what a low-rank (or full-rank) pre-training method decides, in one place.

A method is a small class registered under its ``train.method`` name (torchtitan's
``ModelConverter`` idea: the trainer asks, the method answers). The trainer, the planner and the
memory estimate talk to a method only through these hooks and class attributes; none of them
tests a method's name. One instance per run and rank; the full-rank phase of any run (a warm
start, or method ``full``) is driven by the base :class:`Method` itself (the full-rank defaults).

Before any worker starts (``train/plan.py``):

* ``validate(cfg, zero_stage)``: one-line ``ConfigError`` for settings it cannot honour;
  ``check_shapes(cfg, [(name, out, in)])`` the per-layer part (also run by ``wrap``);
* ``check_model(cfg, hf_config)``: limits read from the HF config alone (LoRA's rank against
  the model's smallest wrapped dimension);
* ``model_shape(shape, vocab, rank)``: the preset shape the method trains (``control`` shrinks it);
* ``writes_base`` / ``adapters`` / ``merges`` / ``resume_keys``: what the DeepSpeed config, the
  plan and the resume check need to know.

Building a phase (``train/trainer.py``, ``_build_phase``), in this order:

* ``wrap(model, cfg, seed)``: replace target linears in place (through :func:`wrap_targets`),
  return ``[(name, module)]`` in a fixed order (the same on every rank);
* ``param_groups(model, cfg)``: optimizer groups; extra keys are hints the method itself reads
  later (GaLore's ``eps_scale``);
* ``schedule(cfg, start)``: a :class:`ScheduleSpec` (peak LR, jagged restarts or not) that the
  trainer turns into a ``JaggedCosine``: plain for full rank, one re-warm-up ramp for an adapter
  phase after a warm start (:class:`AdapterMethod`), a ramp after every merge for the merging
  methods (``merging.MergingMethod``);
* ``start_phase(cfg, start, offset)``: the phase's engine is built and holds its starting values.

Every step (``Trainer._loop``), ``step`` is always the phase's LR-scheduler count
(``engine.lr_scheduler.last_epoch``: DeepSpeed does not step it on an update it skipped):

* ``before_step(engine, step, micro_batches)``: GaLore's eps and projector update (before the
  update that uses them);
* ``after_step(engine, step)``: merge-and-reinit of ReLoRA/ReMoRA (after the update that ran at
  LR 0), through ``merging.merge_and_reinit`` (GaLore's projector update takes the same road);
* both return an event dict for the metrics log or None;
* ``after_load(engine, step)``: a checkpoint was loaded into the phase's engine (resume).

Afterwards: ``meta(cfg)`` (checkpoint metadata) and ``fold(state, meta)``, a pure tensor function
from a consolidated fp32 state dict to the effective weights (eval, export, spectrum, warm-start
hand-off). The memory estimate reads ``adapter_counts(out, in, rank)`` and ``needs_rank``.

The methods: ``full`` and ``control`` (``full.py``), ``lora`` and ``relora`` (``lora.py``),
``mora`` and ``remora`` (``mora.py``), ``galore`` (``galore.py``), the projection methods
``apollo`` and ``apollo_mini`` (``apollo.py``) and ``fira`` (``fira.py``). Adapter methods share the
``relora`` section's phase settings (targets, freeze list, warm start, adapter-phase LR, and for
the merging ones reset_every / optimizer_reset / jagged schedule); their own sections hold only
what is theirs (``mora``, ``galore``). The list of names is written twice: here (the registry)
and in ``config.py``'s schema, which sits below this package; ``tests/test_methods_math.py``
holds the two (and the CLI's choices) equal.

The ZeRO-exact layer every method shares (not a ReLoRA detail):

* ``zero/state.py``: ``get_master``/``set_master`` and ``get_moment``/``set_moment`` read
  and write the optimizer's fp32 copy and Adam moments of one *whole* trainable parameter on
  every stage (collective on ZeRO 1/2/3, same value on every rank for the setters);
* a merge adds ΔW into the frozen W: replicated on ZeRO 0-2 (every rank adds the same delta), and
  on ZeRO-3 each rank adds only the rows of ΔW that cover its flat shard ``W.ds_tensor``
  (``merging.add_delta_rows``; :func:`shard_delta` is the same slice arithmetic, pure).
  So a method only supplies :meth:`MergeableLayer.delta_rows`: rows ``row0:row1`` of its ΔW
  from the full adapter values (M for MoRA, C and the projector for GaLore, A and B for ReLoRA);
* re-inits are written to the module tensors *and* the masters (otherwise DeepSpeed's next
  ``step()`` copies the old adapter back while its product already sits in W).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from ds_relora.errors import CheckpointError, ConfigError
from ds_relora.zero.state import full_shape


@dataclasses.dataclass
class ScheduleSpec:
    """How the LR schedule of a method's phase looks; the trainer builds the phase's
    ``methods.schedule.JaggedCosine`` from it (one global cosine, restarts from the phase start)."""

    lr: float | None = None            # peak LR of the phase (None: optim.lr)
    restart_every: int | None = None   # LR drops to 0 every this many steps (None: plain cosine)
    restart_warmup_steps: int = 0      # linear re-warm-up after each restart


@runtime_checkable
class MergeableLayer(Protocol):
    """An adapted linear whose adapter can be merged into its frozen ``weight`` exactly."""

    weight: nn.Parameter
    out_features: int
    in_features: int

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The trainable adapter tensors by attribute name (read through their fp32 masters)."""

    def delta_rows(self, values: dict[str, torch.Tensor], row0: int, row1: int) -> torch.Tensor:
        """Rows ``row0:row1`` (fp32, ``(row1-row0) x in``) of ΔW from the full adapter ``values``."""

    def reset_values(self, values: dict[str, torch.Tensor], generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Adapter values right after a merge (seeded identically on every rank)."""


def shard_delta(start: int, end: int, cols: int, rows: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """The flat slice ``[start, end)`` of the row-major ΔW (``? x cols``), built from the rows it spans.

    This is all a ZeRO-3 per-shard merge needs from a method: rank ``q`` owns flat elements
    ``[q * P, min((q + 1) * P, numel))`` of W, computes only rows ``start // cols`` to
    ``(end - 1) // cols`` of ΔW and adds this slice into ``W.ds_tensor``; no W gather."""
    if end <= start:
        return torch.zeros(0)
    row0, row1 = start // cols, (end - 1) // cols + 1
    block = rows(row0, row1).reshape(-1)
    return block[start - row0 * cols: end - row0 * cols]


class Method:
    """Base class: the full-rank defaults (the trainer drives every full-rank phase with it).
    Subclasses override what they decide.

    One instance per run and rank: ``wrap`` keeps the layers it made (``self.layers``) for the
    hooks that need them."""

    name: ClassVar[str] = ""
    adapters: ClassVar[bool] = False   # the method wraps linears (a frozen W plus trainables)
    merges: ClassVar[bool] = False     # merge-and-reinit at relora.reset_every (jagged LR, optimizer reset)
    # The method adds into the frozen W during training (merges, GaLore's projector changes): a
    # ZeRO++ second copy of W (hpZ, quantized weights) would go stale, so the DeepSpeed config refuses one.
    writes_base: ClassVar[bool] = False
    needs_rank: ClassVar[bool] = False  # relora.rank shapes what is trained (adapters, control's smaller model)
    resume_keys: ClassVar[tuple[str, ...]] = ()  # "section.key" settings a resume must not change
    # Computes projectors from each wrapped linear's full gradient (estimate-memory counts its transient).
    full_gradient_probe: ClassVar[bool] = False
    # The method keeps W trainable and projects gradients in its optimizer (APOLLO, Fira): a phase
    # of its own like an adapter method's (warm start, phase "adapters" in checkpoints), nothing wrapped.
    projects: ClassVar[bool] = False
    default_rank: ClassVar[int] = 128  # the rank ``estimate-memory`` assumes when none is given

    def __init__(self):
        self.layers: list[tuple[str, nn.Module]] = []

    # ----------------------------------------------------------------- before any worker starts
    def validate(self, cfg, zero_stage: int) -> None:
        """Raise a one-line ConfigError for anything this method cannot honour."""

    def check_shapes(self, cfg, shapes: list[tuple[str, int, int]]) -> None:
        """Validate each target layer ``(name, out_features, in_features)``."""

    def check_model(self, cfg, hf_config) -> None:
        """Validate what the HF config alone tells (before the meta-device wrap)."""

    def model_shape(self, shape, vocab_size: int, rank: int):
        """The preset ``models.Shape`` this method trains (the preset's own)."""
        return shape

    def adapter_counts(self, out_features: int, in_features: int, rank: int) -> tuple[int, int]:
        """(trainable, frozen) adapter elements the method adds to one ``out x in`` linear."""
        return 0, 0

    # ----------------------------------------------------------------- building a phase
    def wrap(self, model: nn.Module, cfg, seed: int) -> list[tuple[str, nn.Module]]:
        return []

    def param_groups(self, model: nn.Module, cfg) -> list[dict]:
        return default_param_groups(model, cfg.optim.weight_decay)

    def schedule(self, cfg, start: int) -> ScheduleSpec:
        """The phase's LR schedule; ``start`` is the global step where the adapter phase begins
        (``relora_start``: 0 without a warm start). Full rank: ``optim.lr``, one plain cosine."""
        return ScheduleSpec(lr=cfg.optim.lr)

    def start_phase(self, cfg, start: int, offset: int) -> None:
        """The phase's engine is built and holds its starting values, no checkpoint loaded yet:
        ``start`` as in :meth:`schedule`, ``offset`` the global step of the LR scheduler's count 0."""

    # ----------------------------------------------------------------- every step
    def before_step(self, engine, step: int, micro_batches) -> dict | None:
        """Before the phase's update ``step`` (0-based, the LR scheduler's count)."""
        return None

    def before_step_phase(self, step: int) -> str | None:
        """The name of the memory phase :meth:`before_step` opens at update ``step`` when it does
        heavy work of its own (GaLore's projector update), so its peak is measured on its own."""
        return None

    def after_step(self, engine, step: int) -> dict | None:
        """After ``engine.step()`` of every micro-batch; ``step``: the LR scheduler's count now."""
        return None

    def after_load(self, engine, step: int) -> None:
        """A checkpoint was loaded into the phase's engine; ``step``: its restored scheduler count."""

    def after_merge(self, layer: nn.Module) -> None:
        """Called on every rank after each layer's merge (ReMoRA switches its grouping)."""

    # ----------------------------------------------------------------- checkpoints and folding
    def meta(self, cfg) -> dict:
        """Checkpoint metadata ``fold`` needs later (e.g. the adapter scale)."""
        return {}

    def fold(self, state: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
        return dict(state)


class AdapterMethod(Method):
    """The adapter methods' shared phase: wrapped linears, ``relora.lr`` (or ``optim.lr``) and,
    after a warm start with ``relora.jagged_schedule``, one linear LR ramp for the fresh optimizer
    (no further restarts: nothing is merged). LoRA's ``r (out + in)`` adapter elements per linear."""

    adapters = True
    needs_rank = True

    def schedule(self, cfg, start: int) -> ScheduleSpec:
        r = cfg.relora
        lr = r.lr or cfg.optim.lr
        if start > 0 and r.jagged_schedule:
            # One restart at ``start`` (JaggedCosine's cycle start), the next one past the end.
            return ScheduleSpec(lr=lr, restart_every=cfg.train.total_steps + 1,
                                restart_warmup_steps=r.restart_warmup_steps)
        return ScheduleSpec(lr=lr)

    def adapter_counts(self, out_features: int, in_features: int, rank: int) -> tuple[int, int]:
        return rank * (out_features + in_features), 0


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices decay, vectors (norms, biases) do not; frozen params are left out."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if len(full_shape(p)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``train.method: <cls.name>``."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> Method:
    """The method registered as ``name``; one line naming the known ones otherwise."""
    try:
        return METHODS[name]()
    except KeyError:
        raise ConfigError(
            f"train.method='{name}' is unknown: use one of {', '.join(sorted(METHODS))}"
        ) from None


def target_linears(model: nn.Module, patterns: list[str], section: str) -> list[tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` whose name matches a regex (re.search), in module order; none is an error."""
    compiled = [re.compile(t) for t in patterns]
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(p.search(n) for p in compiled)]
    if not found:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:4]
        raise ConfigError(
            f"no module matches {section}.target_modules={list(patterns)}: the model's linear layers are named "
            f"like {names}; set {section}.target_modules to regexes of those names"
        )
    return found


def wrap_targets(model: nn.Module, target_modules: list[str], freeze_modules: list[str],
                 make: Callable[[str, nn.Linear], nn.Module],
                 check: Callable[[list[tuple[str, int, int]]], None]) -> list[tuple[str, nn.Module]]:
    """The one wrapper of every adapter method: replace each linear matching ``target_modules``
    (``relora.target_modules``) by ``make(name, linear)``, in module order, after ``check`` saw
    every shape; then freeze the parameters matching ``freeze_modules``. Returns ``[(name, layer)]``."""
    targets = target_linears(model, target_modules, "relora")
    check([(n, t.out_features, t.in_features) for n, t in targets])
    layers = []
    for name, base in targets:
        layer = make(name, base)
        replace_module(model, name, layer)
        layers.append((name, layer))
    freeze = [re.compile(f) for f in freeze_modules]
    for pname, param in model.named_parameters():
        if any(f.search(pname) for f in freeze):
            param.requires_grad_(False)
    return layers


def adapter_rank(cfg, section: str) -> int:
    """``<section>.rank``, or ``relora.rank`` when it is null (one rank for a method comparison)."""
    rank = getattr(getattr(cfg, section), "rank", None)
    return cfg.relora.rank if rank is None else rank


def adapter_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The saved state of adapter layers that is not a parameter (MoRA's pattern, GaLore's
    projector), by full name: replicated on every stage (ZeRO partitions parameters only)."""
    out = {}
    for name, mod in model.named_modules():
        for key, buf in getattr(mod, "adapter_buffers", dict)().items():
            out[f"{name}.{key}" if name else key] = buf
    return out


def load_adapter_buffers(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Write saved adapter buffers back (resume); a missing one is a damaged checkpoint."""
    for name, mod in model.named_modules():
        own = getattr(mod, "adapter_buffers", dict)()
        if own:
            try:
                mod.load_adapter_buffers({k: values[f"{name}.{k}"] for k in own})
            except KeyError as exc:
                raise CheckpointError(f"the checkpoint has no adapter buffer {exc}: it was written by another method "
                                      "or is damaged; resume from a checkpoint of this run") from None


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
