"""Device correctness without a GPU.

A CPU run cannot tell a GPU tensor from a CPU one, so the bug class (a tensor made on the CPU
meeting GPU tensors: in a collective, a mask product, a merge into an offloaded shard) is caught
three ways here:

* the pure functions run on ``meta`` tensors (a second device that refuses to mix with CPU
  tensors: "Tensor on device cpu is not on the expected device meta") and their outputs must
  stay on ``meta``;
* 2-rank ZeRO-3 runs where W's shard really is a shard (persistence threshold 0) and lives
  apart (parameter offload) must merge exactly;
* a real 2-rank training (merge, eval, checkpoint) runs under an audit that fails on every
  tensor factory called from ds_relora's training code without a device, and counts the host
  reads the step loop makes (at most one per optimizer step).
"""

import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from harness.ranks import results, run_workers
from ds_relora.zero.optim_reset import keep_mask, reset_moments
from ds_relora.methods.merging import _add_delta_to_base, base_delta, compute_device, reinit_values
from ds_relora.zero.optim_reset import pruned_count, reset_generator
from ds_relora.train import trainer as trainer_mod
from ds_relora.worker import dist_backend, local_rank_from_env

META = torch.device("meta")


@pytest.mark.parametrize("mode", ["magnitude", "random", "full", "none"])
def test_keep_mask_lives_on_the_score_device(mode):
    score = torch.rand(6, 5, device=META)
    keep = keep_mask(score, mode, 0.9, reset_generator(0, 1, 2))
    assert keep.device == META and keep.dtype == torch.bool and keep.shape == (6, 5)


def test_random_mask_is_device_invariant():
    # The permutation comes from the CPU generator whatever the score's device: equal on CPU and
    # (moved) on any accelerator, so masks do not depend on where the moments live.
    score = torch.rand(40)
    a = keep_mask(score, "random", 0.75, reset_generator(3, 4, 5))
    b = keep_mask(score.double(), "random", 0.75, reset_generator(3, 4, 5))
    assert torch.equal(a, b) and int((~a).sum()) == pruned_count("random", 0.75, 40) == 30


def test_moment_reset_writes_on_the_moments_device():
    p = torch.nn.Parameter(torch.empty(4, 3, device=META))
    state = {"exp_avg": torch.empty(4, 3, device=META), "exp_avg_sq": torch.empty(4, 3, device=META)}
    engine = SimpleNamespace(optimizer=SimpleNamespace(state={p: state}))
    stats = reset_moments(engine, p, "magnitude", 0.5)
    assert stats == {"numel": 12, "pruned": 6}
    assert state["exp_avg"].device == META and state["exp_avg_sq"].device == META


def test_merge_into_replicated_weight_on_another_device():
    # W on the "accelerator" (meta), masters A/B on the CPU (optimizer offload).
    w = torch.nn.Parameter(torch.empty(6, 5, device=META, dtype=torch.bfloat16), requires_grad=False)
    a, b = torch.rand(2, 5), torch.rand(6, 2)
    _add_delta_to_base(w, a, b, 0.5)
    assert w.device == META and w.dtype == torch.bfloat16
    assert compute_device(w.data, a) == META


class FakeZ3Param(torch.nn.Parameter):
    """What merge reads of a ZeRO-3 param: ds_id, ds_tensor (this rank's flat shard), ds_numel."""


def _z3_weight(out, inp, rank, world, shard_device, gathered):
    full = torch.arange(out * inp, dtype=torch.float32).reshape(out, inp) / 7
    w = FakeZ3Param(full.clone() if gathered else torch.empty(0), requires_grad=False)
    part = -(-full.numel() // world)
    shard = torch.zeros(part)
    end = min(full.numel(), (rank + 1) * part)
    shard[: end - rank * part] = full.reshape(-1)[rank * part:end]
    w.ds_id, w.ds_numel, w.ds_shape, w.ds_process_group = 0, full.numel(), (out, inp), None
    w.ds_tensor = shard.to(shard_device)
    return w, full


@pytest.mark.parametrize("rank", [0, 1, 2])
@pytest.mark.parametrize("gathered", [False, True])
def test_zero3_row_slice_merge_matches_full_product(monkeypatch, rank, gathered):
    # 7 x 5 over 3 ranks: partitions of 12 cut through rows; the last one is padded.
    monkeypatch.setattr("ds_relora.methods.merging._partition_rank", lambda p: rank)
    a, b = torch.rand(3, 5), torch.rand(7, 3)
    w, full = _z3_weight(7, 5, rank, 3, "cpu", gathered)
    _add_delta_to_base(w, a, b, 0.25)
    expect = (full + 0.25 * (b @ a)).reshape(-1)
    start, end = rank * 12, min(35, rank * 12 + 12)
    assert torch.allclose(w.ds_tensor[: end - start], expect[start:end], atol=1e-6)
    assert not w.ds_tensor[end - start:].any(), "padding stays zero"
    if gathered:
        # Both copies of a persistent W from one product: bit-identical.
        assert torch.equal(w.data.reshape(-1)[start:end], w.ds_tensor[: end - start])


def test_zero3_merge_into_shard_on_another_device(monkeypatch):
    # The shard lives apart (meta stands for pinned CPU memory vs. GPU masters): the rows are
    # computed and moved to the shard's device; nothing mixes devices.
    monkeypatch.setattr("ds_relora.methods.merging._partition_rank", lambda p: 1)
    w, _ = _z3_weight(7, 5, 1, 2, META, gathered=False)
    _add_delta_to_base(w, torch.rand(3, 5), torch.rand(7, 3), 0.25)
    assert w.ds_tensor.device == META


def test_reinit_write_reaches_a_shard_on_another_device(monkeypatch):
    from ds_relora.zero.state import set_module_value

    monkeypatch.setattr("ds_relora.zero.state._partition_rank", lambda p: 1)
    w, _ = _z3_weight(7, 5, 1, 2, META, gathered=False)
    set_module_value(w, torch.rand(7, 5))  # the new A/B come from the masters' device
    assert w.ds_tensor.device == META
    w, _ = _z3_weight(7, 5, 1, 2, "cpu", gathered=True)
    value = torch.rand(7, 5)
    set_module_value(w, value)
    assert torch.equal(w.data, value) and torch.equal(w.ds_tensor[:17], value.reshape(-1)[18:])


def test_reinit_values_on_the_masters_device():
    a, b = reinit_values((3, 8), (5, 3), reset_generator(0, 1, 0), META)
    assert a.device == META and b.device == META and a.dtype == b.dtype == torch.float32
    a_cpu, b_cpu = reinit_values((3, 8), (5, 3), reset_generator(0, 1, 0), torch.device("cpu"))
    assert a_cpu.abs().max() <= 8 ** -0.5 and a_cpu.std() > 0 and not b_cpu.any()
    assert base_delta(a_cpu, b_cpu, 2.0, torch.device("cpu")).shape == (5, 8)


def test_all_reduce_mean_stays_on_the_value_device(monkeypatch):
    seen = []
    monkeypatch.setattr(trainer_mod.dist, "all_reduce", lambda t, **kw: seen.append(t.device))
    out = trainer_mod._all_reduce_mean(torch.ones((), device=META), 2)
    assert seen == [META] and out.device == META


def test_backend_and_local_rank_selection():
    assert dist_backend(True, {}) == "nccl" and dist_backend(False, {}) == "gloo"
    assert dist_backend(True, {"DS_RELORA_DIST_BACKEND": "cuda:nccl,cpu:gloo"}) == "cuda:nccl,cpu:gloo"
    assert local_rank_from_env({"OMPI_COMM_WORLD_LOCAL_RANK": "3"}) == 3
    assert local_rank_from_env({"LOCAL_RANK": "1", "SLURM_LOCALID": "2"}) == 1
    assert local_rank_from_env({}) == 0


def test_merge_orders_shard_writes_with_zero3_streams(monkeypatch):
    # ZeRO-3 gathers (and copies offloaded shards) on its own CUDA stream: a merge's in-place
    # writes to ds_tensor must come after a device sync and be followed by one.
    from ds_relora.methods import merging as merge_mod
    from ds_relora.methods.lora_layer import ReLoRALinear

    events = []
    monkeypatch.setattr("ds_relora.methods.merging._partition_rank", lambda p: 1)
    monkeypatch.setattr("ds_relora.zero.state._partition_rank", lambda p: 1)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: events.append("sync"))
    for name in ("add_delta_rows", "set_module_value"):
        real = getattr(merge_mod, name)
        monkeypatch.setattr(merge_mod, name, lambda *a, _real=real, **k: (events.append("write"), _real(*a, **k))[1])
    layer = ReLoRALinear(torch.nn.Linear(5, 7), 2, 2.0, 0.0, reset_generator(0, 0, 0))
    layer.weight, _ = _z3_weight(7, 5, 1, 2, "cpu", gathered=False)
    engine = SimpleNamespace(optimizer=SimpleNamespace(state={}))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    merge_mod.merge_layer(engine, layer, reset_generator(0, 1, 0))
    assert events == ["sync", "write", "write", "write", "sync"], events
    events.clear()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # no CUDA in use: nothing to order
    merge_mod.merge_layer(engine, layer, reset_generator(0, 2, 0))
    assert events == ["write", "write", "write"], events


STEP_LOOP_FILES = tuple(str(Path(trainer_mod.__file__).parent / f) for f in
                        ("trainer.py", "prefetch.py", "job_limits.py")) + (str(Path(trainer_mod.__file__).parents[1] / "device.py"),)
MERGE_DIR = str(Path(trainer_mod.__file__).parents[1] / "relora") + "/"
FACTORIES = {torch.tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.rand, torch.randn,
             torch.randint, torch.randperm, torch.eye, torch.linspace, torch.zeros_like, torch.ones_like,
             torch.empty_like, torch.full_like}


class LoopAudit(torch.overrides.TorchFunctionMode):
    """With ``meta`` standing for the GPU: host copies a step would wait on (``.to``/``.cuda``
    of a CPU tensor to the device without ``non_blocking``, ``torch.tensor(data, device=...)``)
    made in the step loop, and tensors made on the CPU in the step loop or the merge (the
    tensors they meet live on ``meta``; a generator draw and the A re-init are CPU by design)."""

    def __init__(self):
        super().__init__()
        self.blocking, self.cpu_made = Counter(), Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        frame = sys._getframe(1)
        path, where = frame.f_code.co_filename, f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"
        out = func(*args, **kwargs)
        in_loop, in_merge = path in STEP_LOOP_FILES, path.startswith(MERGE_DIR)
        if in_loop and func in (torch.Tensor.to, torch.Tensor.cuda) and args[0].device.type == "cpu" \
                and out.device.type != "cpu" and kwargs.get("non_blocking") is not True:
            self.blocking[where] += 1
        if in_loop and func in (torch.tensor, torch.as_tensor) and out.device.type != "cpu":
            self.blocking[where] += 1
        if (in_loop or in_merge) and func in FACTORIES and "generator" not in kwargs \
                and frame.f_code.co_name != "kaiming_uniform_A" and out.device.type == "cpu":
            self.cpu_made[where] += 1
        return out


class MetaEngine:
    """What the step loop uses of a DeepSpeed engine, computing on ``meta``."""

    def __init__(self, module, accum):
        self.module, self.accum, self.device, self.micro = module, accum, META, 0
        self.lr_scheduler = SimpleNamespace(last_epoch=0)
        self.optimizer = SimpleNamespace(state={p: {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                                                for p in module.parameters() if p.requires_grad})
        self.batch_devices = []

    def __call__(self, input_ids, labels):
        self.batch_devices.append(input_ids.device)
        return SimpleNamespace(loss=self.module(input_ids).float().pow(2).mean())

    def backward(self, loss):
        pass

    def step(self):
        self.micro += 1
        self.lr_scheduler.last_epoch += self.micro % self.accum == 0

    def get_lr(self):
        return [1e-3]

    def get_global_grad_norm(self):
        return torch.ones((), device=self.device)

    def eval(self):
        pass

    train = eval


def test_step_loop_and_merge_on_an_accelerator_never_block_or_mix_devices(prepared_data, monkeypatch):
    from ds_relora.data import DistributedBatchIterator, PackedDataset, validation_batches
    from ds_relora.methods import get_method
    from ds_relora.methods.lora_layer import wrap_model
    from harness.configs import merging_method
    from ds_relora.train.job_limits import JobLimits
    from ds_relora.train.prefetch import StepPrefetcher

    collectives, host_reads = [], []

    def all_reduce(t, **kw):
        collectives.append(t.device)

    class MetaScalar(torch.Tensor):
        def item(self):  # evaluate's one host read; a meta tensor has no value to read
            return 0.0

    def all_reduce_mean(value, world):
        collectives.append(value.device)
        return value.detach().clone().as_subclass(MetaScalar)

    def scalars(*values):
        host_reads.extend(v.device for v in values if isinstance(v, torch.Tensor))
        return [0.0 for _ in values]

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(trainer_mod, "_all_reduce_mean", all_reduce_mean)
    monkeypatch.setattr(trainer_mod, "host_scalars", scalars)

    train, val = PackedDataset(prepared_data, "train", 16), PackedDataset(prepared_data, "validation", 16)
    model = torch.nn.Sequential(torch.nn.Embedding(train.vocab_size, 16), torch.nn.Linear(16, 16)).to(META)
    modules = wrap_model(model, rank=2, alpha=4, dropout=0.0, target_modules=["^1$"], seed=0)
    engine = MetaEngine(model, accum=2)
    total = 4
    t = object.__new__(trainer_mod.Trainer)
    t.cfg = SimpleNamespace(train=SimpleNamespace(total_steps=total, method="relora", compile=False, eval_every=2,
                                                  save_every=0, time_limit=None, max_steps_per_job=None,
                                                  stop_after_steps=None))
    t.plan = SimpleNamespace(ds_config={"zero_optimization": {"stage": 3}}, global_batch=4, adapters=True)
    t.engine, t.modules, t.method, t.phase, t.phase_offset, t.relora_start = engine, modules, get_method("relora"), \
        "adapters", 0, 0
    t.phase_method = merging_method(total_steps=total, reset_every=1, layers=modules)
    t.phase_method.merge_at = {1}  # one merge, after the update of step 1
    t.iterator = DistributedBatchIterator(train, 2, 2, 0, 1, seed=0)
    t.val_data, t.val_batches = val, validation_batches(val, 2, 2, 0, 1)
    t.world, t.rank, t.seq_len, t.tokens_per_step, t.tokens_seen = 1, 0, 16, 64, 0
    t.params, t.last_saved_step = {"total": 1, "trainable": 1}, None
    t.metrics = SimpleNamespace(step=lambda rec: None, info=lambda msg: None, events=[])
    t.metrics.event = lambda name, step, **f: t.metrics.events.append((name, step))
    saved = []
    t.save = lambda: saved.append(t.step)
    t.prefetch = StepPrefetcher(t.iterator)
    audit = LoopAudit()
    try:
        with audit:
            result = t._loop(JobLimits(t.cfg.train, 0))
    finally:
        t.prefetch.close()
    assert result["step"] == total and saved == [total]
    assert ("merge", 2) in t.metrics.events, "the loop must merge on the accelerator"
    assert engine.batch_devices and set(engine.batch_devices) == {META}
    assert set(collectives) == {META} and set(host_reads) == {META}
    assert not audit.blocking, f"blocking host copies in the step loop: {dict(audit.blocking)}"
    assert not audit.cpu_made, f"tensors made on the CPU, consumed on the accelerator: {dict(audit.cpu_made)}"
    # The prefetch reads one step ahead, but the state a checkpoint saves counts trained steps only.
    assert t.iterator.state_dict()["consumed_samples"] == total * 4


def test_init_draws_the_same_values_under_a_device_redirect():
    # The GPU check builds its model inside ``with torch.device("cuda")``, which sends bare
    # factories (torch.empty) to the GPU but leaves the CPU generator where it is. ``meta`` stands
    # for that GPU here: the values must still come from the CPU generator, equal to a plain init.
    from ds_relora.models import build_model, init_weights, llama_config, preset_shape

    model = build_model(llama_config(preset_shape("tiny"), 64, 16), seed=3)
    plain = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.data.zero_()
    with torch.device(META):
        init_weights(model, 3, 0.02)
    for n, p in model.named_parameters():
        assert p.device.type == "cpu"
        if "norm" not in n:  # norms keep their (zeroed here) constructor values
            assert torch.equal(p.detach(), plain[n]), n


# ----------------------------------------------------------------------------- 2 ranks
@pytest.fixture(scope="module")
def device_runs(prepared_data, tmp_path_factory):
    from harness import REPO
    from harness.checks import read_metrics
    from harness.configs import tiny_run_config, write_config

    run_dir = tmp_path_factory.mktemp("device_audit")
    # ZeRO-3 with parameter and optimizer offload and persistence 0: every W is a real shard.
    cfg = tiny_run_config(prepared_data, run_dir, relora={"warm_start_steps": 2, "reset_every": 3},
                          train={"total_steps": 8, "eval_every": 4, "save_every": 4, "eval_batches": 2},
                          deepspeed={"config": str(REPO / "ds_configs" / "zero3_offload.json"),
                                     "overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}})
    config = write_config(run_dir / "config.yaml", cfg)
    res = results(run_workers(["tests/workers/device_worker.py", "--config", str(config)], 2, timeout=400))
    losses, events = read_metrics(run_dir)
    return {"res": res, "losses": losses, "events": events}


def test_training_creates_no_deviceless_tensor_and_reads_the_host_once_per_step(device_runs):
    train = [r for r in device_runs["res"] if r["part"] == "train"]
    events = device_runs["events"]
    assert len(train) == 2 and all(r["rc"] == 0 for r in train)
    assert [e["lr_index"] for e in events if e.get("event") == "merge"] == [5], "the run must merge"
    assert sorted(device_runs["losses"]) == list(range(1, 9))
    evals = len([e for e in events if e.get("event") == "eval"])
    assert evals == 2
    for r in train:
        # On a GPU any of these would be a CPU tensor in an NCCL collective or next to GPU state.
        assert r["deviceless"] == {}, r["deviceless"]
        assert r["blocking_copies"] == {}, f"blocking host copies in the step loop: {r['blocking_copies']}"
        reads = Counter()
        for where, n in r["host_reads"].items():
            reads[where.split(":")[1]] += n
        assert reads.pop("host_scalars") == 8, "one host read per optimizer step, for all its scalars"
        assert reads.pop("evaluate") == evals + 2, "one per eval (plus the two switch probes)"
        assert reads.pop("__init__", 0) <= 1
        assert not reads, f"host reads elsewhere (the step loop must not sync): {r['host_reads']}"


@pytest.mark.parametrize("offload", [False, True])
def test_zero3_sharded_and_offloaded_base_merges_exactly(device_runs, offload):
    ranks = [r for r in device_runs["res"] if r["part"] == "checks" and r["offload"] == offload]
    assert len(ranks) == 2
    for r in ranks:
        assert r["base_sharded"], "threshold 0: W must be partitioned, not persistent"
        assert r["merge_logit_diff"] <= 1e-5 * max(1.0, r["logit_scale"]) and r["weight_changed"] > 1e-3
        assert r["reinit_module"] and r["reinit_master"] and r["after_lr0_master"] and r["masks_ok"]
        assert r["others_untouched"]
