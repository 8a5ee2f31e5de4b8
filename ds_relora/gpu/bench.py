"""The GPU check's throughput part: full vs relora on ZeRO-2 at equal micro-batch and at each
method's largest micro-batch (tokens/s, MFU, peak memory), and which attention kernel ran."""

from __future__ import annotations

import gc
import importlib.metadata
import time

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend

from ds_relora.config import RunConfig
from ds_relora.estimate.flops import flops_per_token, params
from ds_relora.methods import DEFAULT_METHOD, get_method
from ds_relora.methods.lora_layer import wrap_model
from ds_relora.methods.schedule import JaggedCosine
from ds_relora.models import WRAPPED_TYPES, build_model, llama_config, preset_shape
from ds_relora.train.engine import build_engine, compile_engine
from ds_relora.zero.ds_config import SHIPPED, build_ds_config

_SDPA_NAMES = {"FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "mem-efficient", "CUDNN_ATTENTION": "cudnn",
               "MATH": "math", "OVERRIDEABLE": "overrideable"}


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def largest_micro_batch(mb1: int, mem1: float, mb2: int, mem2: float, capacity: float, margin: float = 0.85) -> int:
    """Largest micro-batch whose peak memory, extrapolated linearly from two measured points,
    stays under ``margin * capacity``."""
    per_sample = max((mem2 - mem1) / max(1, mb2 - mb1), 1.0)
    fixed = mem1 - per_sample * mb1
    return max(mb1, int((margin * capacity - fixed) // per_sample))


def pair_estimate_s(preset: str, vocab: int, compile_backend: str | None, smoke: bool) -> float:
    """Planned seconds of one throughput pair on an H100/H200 (two engine builds, whose CPU init
    grows with the params, plus ~30 timed steps each); compiling adds about a minute per engine."""
    if smoke:
        return 20.0
    billions = params(preset_shape(preset), vocab, "full")["total"] / 1e9
    return 2 * (15 + 70 * billions + (60 if compile_backend else 0))


class CudaMemory:
    """Peak allocated bytes between ``reset`` and ``peak`` on one GPU."""

    source = "torch.cuda.max_memory_allocated"

    def __init__(self, device: torch.device):
        self.device = device

    def admit(self, micro: int) -> None:
        pass  # the GPU itself raises OutOfMemoryError

    def reset(self) -> None:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self, micro: int) -> float:
        return float(torch.cuda.max_memory_allocated(self.device))

    def capacity(self) -> float:
        return float(torch.cuda.get_device_properties(self.device).total_memory)


class RehearsalMemory:
    """``--smoke`` on CPU, which has no resettable peak counter: a made-up card (1 GiB fixed + 1 GiB
    per sequence, 10 GiB) drives the same largest-micro-batch search. Its real limit (6 sequences)
    sits below the linear extrapolation (7), so the out-of-memory retry runs as well."""

    source = "simulated (smoke: 1 GiB + 1 GiB per sequence, 10 GiB card)"
    LIMIT = 6

    def admit(self, micro: int) -> None:
        if micro > self.LIMIT:
            raise torch.cuda.OutOfMemoryError(f"simulated: micro-batch {micro} > {self.LIMIT}")

    def reset(self) -> None:
        pass

    def peak(self, micro: int) -> float:
        return float((1 + micro) * 2**30)

    def capacity(self) -> float:
        return float(10 * 2**30)


def _sdpa_backend(q, k, v, *args, **kwargs) -> str:

    choice = getattr(torch, "_fused_sdp_choice", None)  # what SDPA's dispatcher will pick
    if choice is None:
        return f"backend unknown ({q.device.type})"
    name = SDPBackend(choice(q, k, v, *args, **kwargs)).name
    return f"{_SDPA_NAMES.get(name, name.lower())} ({q.device.type})"


def attention_ran(module, example: torch.Tensor) -> str:
    """The attention kernel one training forward of ``module`` runs, seen from inside the call:
    for SDPA the backend its dispatcher selects for the actual q/k/v (dtype, head dim, mask,
    is_causal, enabled-backend flags), not the configured implementation."""

    impl = module.config._attn_implementation
    seen: list[str] = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        seen.append(_sdpa_backend(q, k, v, *args, **kwargs))
        return sdpa(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = recording  # transformers looks it up on every call
    try:
        module(input_ids=example, labels=example)  # with grad: backends differ on requires_grad
    finally:
        F.scaled_dot_product_attention = sdpa
    if seen:
        return "sdpa: " + ", ".join(sorted(set(seen)))
    if impl == "flash_attention_2":
        return f"flash_attention_2 (flash-attn {importlib.metadata.version('flash-attn')})"
    return f"{impl} (no SDPA call)"


def _compiled_graphs() -> int:

    return int(counters["stats"]["unique_graphs"])


class Bench:
    """One engine per (preset, method); the input batch size varies (gradient accumulation 1:
    every backward is a boundary, so DeepSpeed's configured micro-batch is only bookkeeping)."""

    def __init__(self, preset: str, method: str, args, device: torch.device, meter):
        self.device, self.args, self.method, self.meter = device, args, method, meter
        self.retries = 0
        self.shape = preset_shape(preset)
        hf = llama_config(self.shape, args.vocab, args.seq_len, attn_implementation=args.attn)
        with torch.device(device):  # initialise on the GPU: seconds instead of a minute at 1.3B
            model = build_model(hf, seed=0)
        if get_method(method).adapters:
            # Outside the device context: A is drawn from a CPU generator, then moved to W's device.
            wrap_model(model, rank=args.rank, alpha=32.0, dropout=args.dropout, target_modules=list(WRAPPED_TYPES),
                       seed=1)
        run = RunConfig()
        run.deepspeed.config = str(SHIPPED / "zero2.json")  # package data: no checkout needed
        run.deepspeed.overrides = {"bf16": {"enabled": args.bf16}}
        run.train.micro_batch_size = args.micro_batch
        self.engine = build_engine(model, build_ds_config(run, 1), lr=1e-4, schedule=JaggedCosine(10**6, 0))
        # Probed on the engine's module in its training dtype, before any compile hides the call.
        self.attn = attention_ran(self.engine.module, self._batch(args.micro_batch, torch.Generator().manual_seed(1)))
        release_memory()
        if args.compile:
            compile_engine(self.engine, args.compile)  # the first warm-up step pays the compile

    def _batch(self, micro: int, gen: torch.Generator) -> torch.Tensor:
        x = torch.randint(0, self.args.vocab, (micro, self.args.seq_len), generator=gen).to(self.device)
        if self.args.compile:
            # One graph for every micro-batch the search tries: a static batch dim would recompile
            # (a minute at 1.3B) for each new size. "maybe": should the model specialise the batch
            # size, that costs a recompile, not an error.
            torch._dynamo.maybe_mark_dynamic(x, 0)
        return x

    def measure(self, micro: int) -> dict:
        args, cuda = self.args, self.device.type == "cuda"
        self.meter.admit(micro)
        self.meter.reset()
        graphs = _compiled_graphs()
        gen = torch.Generator().manual_seed(0)
        times = []
        for i in range(args.warmup + args.steps):
            x = self._batch(micro, gen)
            if cuda:
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            loss = self.engine(input_ids=x, labels=x).loss
            self.engine.backward(loss)
            self.engine.step()
            if cuda:
                torch.cuda.synchronize(self.device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        step = sorted(times)[len(times) // 2]
        tokens_per_s = micro * args.seq_len / step
        flops = flops_per_token(self.shape, args.vocab, args.seq_len, self.method, args.rank)["total"]
        return {"method": self.method, "micro_batch": micro, "tokens_per_s": round(tokens_per_s, 1),
                "step_s": round(step, 4), "flops_per_token": flops,
                "mfu": float(f"{tokens_per_s * flops / (args.peak_tflops * 1e12):.4g}"),
                "peak_mem_gib": round(self.meter.peak(micro) / 2**30, 2),
                "new_graphs": _compiled_graphs() - graphs}

    def largest(self, base: dict, double: dict) -> dict:
        """Measure at the largest micro-batch that fits, stepping down by 20% after an OOM."""
        args = self.args
        mb = largest_micro_batch(base["micro_batch"], base["peak_mem_gib"] * 2**30, double["micro_batch"],
                                 double["peak_mem_gib"] * 2**30, self.meter.capacity())
        mb = min(mb, args.max_micro_batch)
        while mb > double["micro_batch"]:
            try:
                return dict(self.measure(mb), oom_retries=self.retries)
            except torch.cuda.OutOfMemoryError:
                self.retries += 1
                release_memory()
                mb = max(double["micro_batch"], int(mb * 0.8))
        return dict(double, oom_retries=self.retries)

    def close(self) -> None:
        if hasattr(self.engine, "destroy"):
            self.engine.destroy()
        self.engine = None
        release_memory()


def throughput_pair(preset: str, args, device: torch.device, meter) -> dict:
    rows, attn = [], None
    for method in ("full", DEFAULT_METHOD):
        bench = Bench(preset, method, args, device, meter)
        try:
            attn = bench.attn
            base = bench.measure(args.micro_batch)
            rows.append(dict(base, kind="equal micro-batch"))
            try:
                double = bench.measure(2 * args.micro_batch)
            except torch.cuda.OutOfMemoryError:  # the equal micro-batch is already the largest
                release_memory()
                rows.append(dict(base, kind="largest micro-batch", oom_retries=1))
                continue
            rows.append(dict(bench.largest(base, double), kind="largest micro-batch"))
        finally:
            bench.close()
    by = {(r["method"], r["kind"]): r for r in rows}
    ratio = {kind: round(by[(DEFAULT_METHOD, kind)]["tokens_per_s"] / by[("full", kind)]["tokens_per_s"], 3)
             for kind in ("equal micro-batch", "largest micro-batch")}
    return {"preset": preset, "attn": attn, "rows": rows, "relora_over_full": ratio}
