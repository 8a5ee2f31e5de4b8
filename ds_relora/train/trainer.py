"""The training loop: full-rank warm start, ReLoRA phase, eval, checkpoints and exact resume. One
``Trainer`` per rank; a run's phases ``full`` and ``adapters`` share one step counter and LR schedule.
The switch checkpoints the full-rank model, keeps each rank's fp32 shards, frees the rest, rebuilds."""

from __future__ import annotations

import gc
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ds_relora import __version__
from ds_relora.checkpoint.choose import agree_on_resume
from ds_relora.checkpoint.elastic import engine_counters
from ds_relora.checkpoint.format import CheckpointMeta, open_weights
from ds_relora.checkpoint.pretrained import pretrained_weights
from ds_relora.checkpoint.snapshot import local_snapshot, restore_snapshot
from ds_relora.checkpoint.state_io import load_weights
from ds_relora.checkpoint.store import load_checkpoint, optimizer_update_count, save_checkpoint
from ds_relora.config import RunConfig, dump_config
from ds_relora.config_base import to_dict
from ds_relora.data import DistributedBatchIterator, PackedDataset, validation_batches
from ds_relora.device import comm_device, host_scalars
from ds_relora.display import human, plural
from ds_relora.faults import fault_point
from ds_relora.methods import Method, get_method
from ds_relora.methods.schedule import JaggedCosine
from ds_relora.models import build_model, describe_params, enable_activation_checkpointing, import_model_code
from ds_relora.run_folder import checkpoint_root
from ds_relora.train.engine import build_engine, compile_engine, record_grad_norm_without_zero, release_engine
from ds_relora.train.job_limits import REQUEUE_EXIT_CODE, JobLimits
from ds_relora.train.metrics import MetricsLogger
from ds_relora.train.phase_memory import PhaseMemory
from ds_relora.train.plan import plan_run
from ds_relora.train.prefetch import StepPrefetcher
from ds_relora.zero.ds_config import compute_dtype, zero_stage
from ds_relora.zero.frozen_base import apply_zero3_frozen_base


def _all_reduce_mean(value: torch.Tensor, world: int) -> torch.Tensor:
    """Mean over ranks, on the device ``value`` lives on (NCCL refuses CPU tensors); no host read."""
    value = value.detach().float().clone()
    dist.all_reduce(value)
    return value / world


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        log = (lambda m: print(m, file=sys.stderr, flush=True)) if self.rank == 0 else None
        # Every check of the run, once per worker; the checkpoint to resume from is chosen by rank
        # 0 and hashed by every rank (agree_on_resume), then checked like the parent's choice.
        self.plan = plan_run(cfg, self.world, resolve=lambda resume, run_dir: agree_on_resume(resume, run_dir, log))
        self.method = get_method(cfg.train.method)
        self.run_dir = Path(cfg.train.run_dir)
        self.ckpt_root = checkpoint_root(self.run_dir)
        self.seq_len = cfg.data.seq_len
        self.tokens_per_step = self.plan.global_batch * self.seq_len
        self.train_data = PackedDataset(cfg.data.path, "train", self.seq_len)
        self.val_data = PackedDataset(cfg.data.path, "validation", self.seq_len)
        val = validation_batches(self.val_data, self.plan.micro_batch, cfg.train.eval_batches, self.rank, self.world)
        # Every rank must run the same number of forwards (ZeRO-3 gathers are collective).
        count = torch.full((), len(val), device=comm_device())
        dist.all_reduce(count, op=dist.ReduceOp.MIN)
        # Pinned once (CUDA): every eval then copies them without blocking.
        pin = comm_device().type == "cuda"
        self.val_batches = [b.pin_memory() if pin else b for b in val[: int(count)]]
        self.tokenizer_dir = Path(cfg.data.path) / "tokenizer"
        self.engine, self.phase_method, self.modules = None, None, []
        self.tokens_seen, self.last_saved_step, self.metrics_note = 0, None, None

    # ----------------------------------------------------------------------------- phases
    def _phase_lr_and_schedule(self, method: Method, offset: int) -> tuple[float, JaggedCosine]:
        """The phase's peak LR and schedule, as ``method.schedule`` describes them: one global
        cosine over the run, restarts counted from the adapter phase's start."""
        o = self.cfg.optim
        spec = method.schedule(self.cfg, self.relora_start)
        schedule = JaggedCosine(self.cfg.train.total_steps, o.warmup_steps, o.min_lr_ratio,
                                restart_every=spec.restart_every, restart_warmup_steps=spec.restart_warmup_steps,
                                cycle_start=self.relora_start, offset=offset)
        return (o.lr if spec.lr is None else spec.lr), schedule

    def _build_phase(self, phase: str, offset: int, *, weights=None, snapshot: dict | None = None) -> None:
        """Build the phase's model (partitioned under ZeRO-3), wrap it, build its engine, then
        write its starting values into every rank's shards and masters: ``weights`` (a tensor set:
        warm start, continued pre-training) or ``snapshot`` (the warm-start switch, this rank's
        shards of the full-rank engine); else the seeded init.

        The phase's method (``self.phase_method``) is the run's method in the adapter phase and
        the base ``Method`` (the full-rank defaults) in a full-rank phase: every method's warm
        start trains like method full. The trainer talks to it only through its hooks."""
        cfg = self.cfg
        if self.engine is not None:
            old, self.engine, self.phase_method, self.modules = self.engine, None, None, []
            release_engine(old)
            del old
            gc.collect()  # the engine's reference cycles, now that nothing here holds it
        method = self.method if phase == "adapters" else Method()
        model = build_model(self.plan.hf_config, cfg.train.seed, self.plan.ds_config, comm_device(), self.plan.vocab_block)
        self.modules = method.wrap(model, cfg, seed=cfg.train.seed + 1)
        if cfg.train.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.params = describe_params(model)
        lr, schedule = self._phase_lr_and_schedule(method, offset)
        o = cfg.optim
        self.engine = build_engine(model, self.plan.ds_config, lr=lr, betas=o.betas, eps=o.eps, schedule=schedule,
                                   groups=method.param_groups(model, cfg))
        record_grad_norm_without_zero(self.engine)
        if cfg.train.compile:
            compile_engine(self.engine, cfg.train.compile_backend)
        if weights is not None:
            adapters = {id(t) for _, layer in self.modules for t in layer.adapter_params().values()}
            skip = {n for n, p in self.engine.module.named_parameters() if id(p) in adapters}
            load_weights(self.engine.module, weights, source=str(weights.folder), engine=self.engine, skip=skip)
        elif snapshot is not None:
            restore_snapshot(self.engine, snapshot)
        if method.adapters and zero_stage(self.plan.ds_config) == 3:
            apply_zero3_frozen_base(self.engine, cfg.relora.zero3_frozen_base)
        self.phase, self.phase_offset = phase, offset
        method.start_phase(cfg, self.relora_start, offset)
        self.phase_method = method

    @property
    def step(self) -> int:
        """Optimizer updates completed so far (global, over both phases)."""
        return self.phase_offset + self.engine.lr_scheduler.last_epoch

    # ----------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self, batches=None) -> float:
        batches = self.val_batches if batches is None else batches
        self.engine.eval()
        total = torch.zeros((), device=self.engine.device)
        for b in batches:
            b = b.to(self.engine.device, non_blocking=True)
            total += self.engine(input_ids=b, labels=b).loss.float()
        self.engine.train()
        return _all_reduce_mean(total / max(1, len(batches)), self.world).item()

    # ----------------------------------------------------------------------------- checkpoints
    def _meta(self) -> CheckpointMeta:
        """The one writer's record of a checkpoint of this run (the one reader: read_meta)."""
        adapters = self.phase == "adapters"
        data = self.iterator.state_dict()
        return CheckpointMeta(
            ds_relora_version=__version__, step=self.step, phase=self.phase, phase_offset=self.phase_offset,
            relora_start=self.relora_start, method=self.cfg.train.method, world_size=self.world,
            zero_stage=zero_stage(self.plan.ds_config),
            compute_dtype=str(compute_dtype(self.plan.ds_config)).removeprefix("torch."),
            method_settings=self.method.meta(self.cfg) if adapters else {},
            consumed_samples=data["consumed_samples"], tokens_seen=self.tokens_seen,
            **self.plan.layout(self.seq_len), data_state=data, optimizer_step=optimizer_update_count(self.engine),
            engine_counters=engine_counters(self.engine),
            data_path=self.cfg.data.path, params=self.params,
        )

    def _memory_phase(self, phase: str | None) -> str | None:
        """End the current memory phase (collective: logs every rank's peaks), start ``phase``;
        returns the phase that ended."""
        ended = self.memory.phase
        record = self.memory.finish()
        if record is not None:
            self.metrics.event("memory", self.step, **record)
        if phase is not None:
            self.memory.start(phase)
        return ended

    def save(self) -> Path:
        self.engine.empty_partition_cache()  # ZeRO-3's gathered params: the save's first act, before its phase
        resume_phase = self._memory_phase("save")
        folder = save_checkpoint(self.engine, self.ckpt_root, self.step, meta=self._meta(),
                                 config_yaml=dump_config(self.cfg), hf_config=self.plan.hf_config,
                                 tokenizer_dir=self.tokenizer_dir, keep_last=self.cfg.train.keep_last)
        self.last_saved_step = self.step
        self.metrics.event("checkpoint", self.step, path=str(folder))
        self._memory_phase(resume_phase)
        return folder

    # ----------------------------------------------------------------------------- run
    def _start(self) -> None:
        """Act on the plan: resume its checkpoint, start from its warm-start checkpoint, or start
        fresh (every check was made by plan_run)."""
        cfg, resume, warm = self.cfg, self.plan.resume, self.plan.warm_start
        self.relora_start = self.plan.relora_start
        consumed, phase, offset, weights = 0, "full", 0, None
        if resume is not None:
            meta = resume.meta
            if meta.relora_start is not None:
                self.relora_start = meta.relora_start
            phase, offset = meta.phase, meta.phase_offset
        elif warm is not None:
            weights = open_weights(cfg.relora.warm_start_from)
            self.relora_start = warm.step
            phase, offset, consumed = "adapters", warm.step, warm.consumed_samples
            self.tokens_seen = warm.tokens_seen
        elif self.plan.adapters and self.relora_start == 0:
            phase = "adapters"
        if resume is None and weights is None and cfg.model.name_or_path and cfg.model.from_pretrained:
            weights = pretrained_weights(cfg.model.name_or_path)
        self.iterator = DistributedBatchIterator(self.train_data, self.plan.micro_batch, self.plan.grad_accum,
                                                 self.rank, self.world, cfg.train.seed, consumed)
        self._build_phase(phase, offset, weights=weights)
        self.resumed_at = None
        if resume is not None:
            load_checkpoint(self.engine, resume.folder, meta, same_layout=not resume.elastic)
            if resume.elastic:
                self.metrics_note = (f"resumed {resume.folder} (written by {plural(meta.world_size, 'rank')} on "
                                     f"ZeRO-{meta.zero_stage}) on {plural(self.world, 'rank')} on "
                                     f"ZeRO-{zero_stage(self.plan.ds_config)}")
            else:
                self.metrics_note = f"resumed from {resume.folder.name}"
            # The one copy of the data position, the meta's (same and elastic resumes alike).
            self.iterator.load_state_dict(meta.data_position())
            self.tokens_seen = meta.tokens_seen
            self.resumed_at = self.last_saved_step = self.step
            self.phase_method.after_load(self.engine, self.engine.lr_scheduler.last_epoch)
        self.resumed_from = resume.folder if resume is not None else None

    def _switch_to_adapters(self) -> None:
        # Never rewrite the step just saved (by the loop, or the checkpoint resumed from).
        if self.cfg.relora.save_at_switch and self.last_saved_step != self.step:
            self.save()
        self._memory_phase("switch")
        probe = self.val_batches[:1]
        before = self.evaluate(probe)
        if zero_stage(self.plan.ds_config) == 3:
            self.engine.empty_partition_cache()  # what the probe left gathered
        # This rank's fp32 shards, the old engine's own tensors (no copy); the rest of that engine
        # is freed before the new one is built, which starts from exactly these values.
        self._build_phase("adapters", self.step, snapshot=local_snapshot(self.engine))
        after = self.evaluate(probe)
        self.metrics.event("switch", self.step, to=self.cfg.train.method, probe_loss_before=before,
                           probe_loss_after=after, params=self.params,
                           compiled=bool(getattr(self.engine, "is_compiled", False)))
        self.metrics.info(f"step {self.step}: switched to {self.cfg.train.method} "
                          f"(trainable {human(self.params['trainable'])} of {human(self.params['total'])})")
        self._memory_phase("train adapters")

    def run(self) -> dict:
        cfg = self.cfg
        self.memory = PhaseMemory()
        import_model_code(self.plan.hf_config)  # the code is the process's baseline, not the build's
        self.memory.start("init")
        self._start()
        total = cfg.train.total_steps
        self.metrics = MetricsLogger(self.run_dir, self.rank, total, self.step, tensorboard=cfg.train.tensorboard,
                                     wandb_project=cfg.train.wandb_project, config=to_dict(cfg),
                                     resumed_from=self.resumed_from)
        if self.metrics_note:
            self.metrics.info(self.metrics_note)
        self._memory_phase(f"train {self.phase}")
        limits = JobLimits(cfg.train, self.step)
        limits.install_signal_handlers()
        self.prefetch = StepPrefetcher(self.iterator)
        try:
            result = self._loop(limits)
            self._memory_phase(None)
            return result
        finally:
            self.prefetch.close()
            limits.restore_signal_handlers()
            self.metrics.close()

    def _loop(self, limits: JobLimits) -> dict:
        cfg, total = self.cfg, self.cfg.train.total_steps
        # The first line names the phase that is running: a warm start trains full-rank first.
        phase = "full-rank warm start" if self.phase == "full" and self.plan.adapters else cfg.train.method
        self.metrics.info(f"{phase}: {human(self.params['total'])} params, "
                          f"{human(self.params['trainable'])} trainable, {plural(self.world, 'rank')}, "
                          f"ZeRO-{zero_stage(self.plan.ds_config)}, global batch {self.plan.global_batch} x {self.seq_len}"
                          + (f", torch.compile {cfg.train.compile_backend}" if cfg.train.compile else ""))
        last_eval = None
        device = self.engine.device
        while self.step < total:
            if self.phase == "full" and self.plan.adapters and self.step >= self.relora_start:
                self._switch_to_adapters()
                device = self.engine.device
            lr_used = self.engine.get_lr()[0]  # this step's update runs at it; the scheduler steps after
            started = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            batches = self.prefetch.next_step(device)  # on the device already; the next step is being read
            update = self.engine.lr_scheduler.last_epoch
            heavy = self.phase_method.before_step_phase(update)  # its peak measured apart (collective)
            resume_phase = self._memory_phase(heavy) if heavy else None
            pre_event = self.phase_method.before_step(self.engine, update, batches)
            if heavy:
                self._memory_phase(resume_phase)
            for mb in batches:
                loss = self.engine(input_ids=mb, labels=mb).loss
                self.engine.backward(loss)
                self.engine.step()
                loss_sum += loss.detach().float()
            del loss  # its graph's hooks reference the engine (which the warm-start switch frees)
            event = self.phase_method.after_step(self.engine, self.engine.lr_scheduler.last_epoch)
            loss_mean = _all_reduce_mean(loss_sum / len(batches), self.world)
            fault_point("signal", self.step)
            fault_point("error", self.step)
            fault_point("hold", self.step)
            stop_code = limits.agreed_code(self.step, device) if self.step < total else None
            # The step's one host read (it also waits for the GPU, so the step time is real).
            loss_value, norm, stop_code = host_scalars(loss_mean, self.engine.get_global_grad_norm(), stop_code)
            elapsed = time.perf_counter() - started
            self.tokens_seen += self.tokens_per_step
            self.metrics.step({
                "step": self.step, "loss": loss_value, "lr": lr_used,
                "tokens": self.tokens_seen, "tokens_per_s": self.tokens_per_step / elapsed,
                "step_time": elapsed, "grad_norm": norm,
            })
            if pre_event:
                fields = {k: v for k, v in pre_event.items() if k not in ("event", "step")}
                self.metrics.event(pre_event["event"], self.step, lr_index=self.phase_offset + pre_event["step"], **fields)
            if event:
                fields = {k: v for k, v in event.items() if k not in ("event", "step")}
                self.metrics.event(event["event"], self.step, lr_index=event["step"], **fields)
                pruned = fields.get("moments_pruned_fraction")
                self.metrics.info(f"step {self.step}: merged {fields['modules']} adapters into W in "
                                  f"{fields['seconds']:.2f}s, pruned "
                                  f"{'no' if pruned is None else f'{pruned:.1%} of their'} Adam moments")
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < total:
                last_eval = self._eval_event()
            reason = limits.reason(stop_code)
            if reason:
                # Logged before the checkpoint: a resume keeps the log up to the checkpoint's record.
                self.metrics.event("stop", self.step, reason=reason, exit_code=REQUEUE_EXIT_CODE)
                self.save()
                self.metrics.info(f"step {self.step}: stopped by {reason}, checkpoint saved; exit code "
                                  f"{REQUEUE_EXIT_CODE}: requeue with resume: auto")
                return {"step": self.step, "eval_loss": last_eval, "stopped": True, "exit_code": REQUEUE_EXIT_CODE}
            if cfg.train.save_every and self.step % cfg.train.save_every == 0 and self.step < total:
                self.save()
        last_eval = self._eval_event()
        if self.last_saved_step != self.step:
            self.save()
        return {"step": self.step, "eval_loss": last_eval, "exit_code": 0}

    def _eval_event(self) -> float:
        loss = self.evaluate()
        # The in-loop eval covers train.eval_batches micro-batches per rank, `ds-relora eval` the
        # whole split (or --max-batches): the counts say which part of the split a number is from.
        sequences = sum(int(b.shape[0]) for b in self.val_batches) * self.world
        self.metrics.event("eval", self.step, loss=loss, perplexity=math.exp(min(loss, 50.0)),
                           batches=len(self.val_batches) * self.world, sequences=sequences,
                           tokens=sequences * self.seq_len, split_sequences=len(self.val_data))
        self.metrics.info(f"step {self.step}: eval loss {loss:.4f}, perplexity {math.exp(min(loss, 50.0)):.2f}")
        return loss
