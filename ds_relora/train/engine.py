"""Building the DeepSpeed engine around a (possibly ReLoRA-wrapped) model."""

from __future__ import annotations

import torch

from ds_relora.errors import ConfigError
from ds_relora.methods.base import default_param_groups
from ds_relora.methods.schedule import JaggedCosine, make_scheduler
from ds_relora.zero.grad_order import write_grads_in_partition_order
from ds_relora.zero.projected_adam import ProjectedAdamW
from ds_relora.zero.projected_layout import attach_layout
from ds_relora.zero.weight_gather import gather_weights_in_buckets_on_gloo


def build_engine(model, ds_config: dict, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, schedule: JaggedCosine, groups: list[dict] | None = None):
    """``deepspeed.initialize`` with a client AdamW over the method's param ``groups`` (default:
    matrices decay, vectors do not) and the jagged LambdaLR (stepped by DeepSpeed once per
    successful optimizer step). ZeRO-1/2 gradients are kept in partition order, so that
    DeepSpeed's step need not copy them (``zero/grad_order.py``), and on gloo its gather of the
    updated weights goes in buckets (``zero/weight_gather.py``). A projection method's groups
    (``proj_rank``) get the projected optimizer instead, told right here where DeepSpeed put
    each matrix's elements (``zero/projected_layout.py``): before the first step, on every stage."""
    import deepspeed  # noqa: PLC0415  (deepspeed takes seconds to import and patches torch; only code that builds an engine needs it)

    gather_weights_in_buckets_on_gloo()
    groups = groups if groups is not None else default_param_groups(model, weight_decay)
    optimizer = make_optimizer(groups, ds_config, lr=lr, betas=betas, eps=eps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: make_scheduler(opt, schedule),
        config=ds_config,
    )
    write_grads_in_partition_order(engine.optimizer)
    # DeepSpeed copies zero_to_fp32.py / zero_to_torch.py into checkpoints/ on every ZeRO save (no
    # flag turns it off); our checkpoints hold whole fp32 tensors already, so they are only clutter.
    if isinstance(optimizer, ProjectedAdamW):
        attach_layout(engine, optimizer)
    if hasattr(engine, "_copy_recovery_script"):
        engine._copy_recovery_script = lambda save_path: None
    return engine


def make_optimizer(groups, ds_config: dict, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """The client AdamW, fused wherever its parameters will live; the projected optimizer when a
    group asks for a projection (``proj_rank``: APOLLO, APOLLO-Mini, Fira).

    Fused on the GPU, and in CPU memory (optimizer offload, CPU ranks) wherever this torch has
    the fused CPU kernel: torch's default there is the multi-tensor path, which makes a
    denominator temporary the size of the whole partition it steps (4 bytes per trainable
    param / N: 0.4 GiB per rank at two layers of the 1.3B shape on 2 ranks, measured) and, with
    offload, a Python loop of a dozen small kernels per parameter. The fused kernel does the same
    update in one pass in place (equal to the loop within 1e-6 over 25 steps:
    ``tests/test_train_engine.py``)."""
    if any("proj_rank" in g for g in groups):
        return ProjectedAdamW(groups, lr=lr, betas=tuple(betas), eps=eps)
    on_gpu = torch.cuda.is_available() and not _offloads_optimizer(ds_config)
    fused = on_gpu or fused_cpu_adamw_supported()
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


def fused_cpu_adamw_supported() -> bool:
    """Whether this torch has the fused AdamW kernel for CPU tensors (torch >= 2.4): one real step."""
    p = torch.nn.Parameter(torch.zeros(2))
    try:
        opt = torch.optim.AdamW([p], lr=1e-3, fused=True)
        p.grad = torch.ones(2)
        opt.step()
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


def check_compile_backend(backend: str) -> None:
    """Refuse a ``train.compile_backend`` torch.compile does not know, before any worker starts."""
    from torch._dynamo import list_backends  # noqa: PLC0415  (2 s of import: only a run that compiles pays it)

    known = sorted(set(list_backends(exclude_tags=())) | {"eager"})
    if backend not in known:
        raise ConfigError(f"train.compile_backend={backend!r} is not a torch.compile backend here: "
                          f"use one of {', '.join(known)}")


def compile_engine(engine, backend: str) -> None:
    """``torch.compile`` the engine's module in place (``nn.Module.compile``: parameter names and
    state dicts unchanged) through DeepSpeed, which keeps its ZeRO hooks out of the graphs.
    Merges and resets write the same parameter tensors the graphs read, so they need no
    recompile; eval mode compiles a second graph once."""
    engine.compile(backend=backend, compile_kwargs={"dynamic": False})


def release_engine(engine) -> None:
    """Cut what keeps an engine that is done (the warm-start switch) reachable, so that its
    optimizer's masters and moments need not sit next to the next engine's. ``destroy`` releases
    DeepSpeed's own buffers; under ZeRO-3 the root module also stays in DeepSpeed's module-level
    ``FWD_MODULE_STACK`` (appended at initialisation, never popped), whose hooks would keep the
    whole engine reachable.

    The engine's hooks and lambdas still form reference cycles: the caller drops its own
    references and then runs ``gc.collect()``. A collection in here, while the caller still
    holds the engine, frees nothing: the engine went at the next automatic collection, in the
    middle of the next engine's build."""

    module = engine.module
    if hasattr(engine, "destroy"):
        engine.destroy()
    try:
        from deepspeed.runtime.zero import parameter_offload  # noqa: PLC0415  (optional dependency: imported only where it is used)
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator  # noqa: PLC0415  (optional dependency: imported only where it is used)
    except ImportError:
        parameter_offload = PartitionedParameterCoordinator = None
    if parameter_offload is not None:
        stack = parameter_offload.FWD_MODULE_STACK
        stack[:] = [m for m in stack if m is not module]
    # An lru_cache on a method (class level, keyed by self) keeps every ZeRO-3 parameter
    # coordinator, and through it the module, alive (DeepSpeed 0.19).
    cached = getattr(PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", None)
    while cached is not None and not hasattr(cached, "cache_clear"):  # under DeepSpeed's nvtx wrapper
        inner = getattr(cached, "__wrapped__", None)
        if inner is None:
            cells = [c.cell_contents for c in (getattr(cached, "__closure__", None) or ()) if callable(c.cell_contents)]
            inner = cells[0] if cells else None
        cached = inner
    if cached is not None:
        cached.cache_clear()


def _offloads_optimizer(ds_config: dict) -> bool:
    zero = ds_config.get("zero_optimization", {})
    return zero.get("offload_optimizer", {}).get("device", "none") not in (None, "none")


def record_grad_norm_without_zero(engine) -> None:
    """DeepSpeed reports the global grad norm only through its ZeRO/fp16/bf16 optimizers; on fp32
    ZeRO-0 ``get_global_grad_norm()`` is None. There the engine clips through
    ``clip_fp32_gradients`` (when optim.grad_clip > 0) and then copies ``optimizer._global_grad_norm``
    if it exists: record the pre-clip norm there (grads are already averaged over ranks)."""
    if engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization():
        return
    from deepspeed.runtime.utils import clip_grad_norm_  # noqa: PLC0415  (deepspeed takes seconds to import and patches torch; only code that builds an engine needs it)

    optimizer = engine.optimizer
    params = [p for p in engine.module.parameters() if p.requires_grad]

    def norm_before_step(*_args):
        if engine.gradient_clipping() <= 0.0:
            grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
            optimizer._global_grad_norm = torch.stack(grads).norm() if grads else None

    def clip_and_record():
        optimizer._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                      max_norm=engine.gradient_clipping(), mpu=engine.mpu)

    engine.clip_fp32_gradients = clip_and_record
    if hasattr(optimizer, "register_step_pre_hook"):
        optimizer.register_step_pre_hook(norm_before_step)
