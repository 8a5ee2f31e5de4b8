"""Per-GPU memory planner for full-rank, LoRA and ReLoRA pre-training on DeepSpeed ZeRO 0-3.

Model states (exact arithmetic, checked against live 2-rank engines by
``tests/workers/mem_worker.py``). P = all params (adapters included), T = trainable, N = GPUs.
DeepSpeed 0.19.8 keeps gradients in the model dtype unless ``data_types.grad_accum_dtype`` is
set (``engine.get_data_types``), so under bf16 they are 2 bytes:

    bytes per GPU   lp weights        grads        fp32 master       Adam (m, v)
    stage 0         e*P               e*T          4T (bf16) / 0     8T
    stage 1         e*P               e*T/N (*)    4T/N              8T/N
    stage 2         e*P               e*T/N        4T/N              8T/N
    stage 3         e*P/N             e*T/N        4T/N              8T/N

(*) At gradient_accumulation_steps 1 (and the default contiguous_gradients) DeepSpeed 0.19.8
reduces stage 1's gradients in buckets during backward and keeps only this rank's partition,
exactly like stage 2 (measured); with accumulation every rank holds the full e*T between
micro-steps. Stages 1/2 size that partition buffer by the *whole* params that touch it, so a
rank can hold up to the two params cut by its partition edges on top of e*T/N.

e = 2 for bf16 and 4 for fp32 or ``keep_base_fp32``: that option runs DeepSpeed's
``torch_autocast``, which leaves *every* param in fp32, the frozen W and the trainable ones
alike. The fp32 master is a separate clone on stages 1-3 even in fp32 (``stage_1_and_2.py``
clones its partition; stage 3's aliasing branch compares a torch.device with a string and is
not taken, measured with fp32 and torch_autocast); only stage 0 + fp32 updates the params
directly. So bf16 costs "2 per frozen param + 16 per trainable param".

Not in the table (transient, or buffers sized by config rather than by the model): the ZeRO
reduce buckets (``reduce_bucket_size`` elements), the fp32 copy of the gradient partition that
stages 1-3 build inside ``step()`` (4T/N for the duration of the step; 4T on stage 0 + bf16),
the params ZeRO-3 gathers for the layers in flight, and allocator fragmentation. Nor is
``data_types.grad_accum_dtype: fp32``: on stage 1 + bf16 it selects ``BF16_Optimizer``, which
keeps an unpartitioned fp32 gradient buffer (4T) besides the bf16 gradients.
``offload_optimizer`` moves master, Adam and the fp32 gradient partition to host memory
(``cpu``); ``offload_params`` (stage 3) moves the lp partitions there too.

Activations are an approximation. Bytes saved for backward per token of one HF LLaMA decoder
layer, with a = 2 bytes (bf16) or 4 (fp32), h hidden, f intermediate, n heads, s seq_len:

    full rank (SDPA / flash attention)   8h + 8*a*h + 4*a*f + 4n + 8
      (fp32 RMSNorm input and rsqrt, bf16 norm outputs, q/k after RoPE, v, attention output,
       fp32 log-sum-exp, gate/up/SiLU/product of the MLP)
    eager attention                      + 6*n*s - 4n   (fp32 and bf16 softmax probabilities)
    adapters (any dropout)               + 7*a*r
      (A's output per wrapped linear; the adapter's dropout saves no dropped copy and no mask,
       see ``methods/dropout_gemm.py``, and the input it saves is the one the full-rank layer
       saves for its weight gradient)
plus, once per model: final norm, lm_head input and the fp32 log-softmax of the logits,
``4h + 4 + 2ah + 4V + 16``. With activation checkpointing each layer keeps only its input
(a*h) and one layer is recomputed at a time (+ one layer's full set). The counts match
``saved_tensors_hooks`` measurements on transformers' LlamaForCausalLM to ~1 %; working
buffers of the backward pass (e.g. the logits' gradient, 4V + aV per token) come on top.
"""

from __future__ import annotations

import dataclasses

from ds_relora.errors import ConfigError
from ds_relora.estimate.transients import host_transients, projection_bytes, step_bytes
from ds_relora.methods import METHODS, get_method
from ds_relora.models import Shape, largest_param, linear_shapes, param_counts, preset_shape


def method_adapter_params(shape: Shape, method: str, rank: int) -> tuple[int, int]:
    """(trainable adapter params, frozen adapter buffers) of a method on every wrapped linear,
    from the method's ``adapter_counts``: LoRA/ReLoRA r(out+in); MoRA/ReMoRA r̂² with
    r̂ = int(sqrt((out+in) r) + 0.5) (the same count up to rounding); GaLore its C, r max(out, in),
    plus the projector buffer r min(out, in)."""
    counts = get_method(method).adapter_counts
    trainable = frozen = 0
    for o, i in linear_shapes(shape).values():
        t, f = counts(o, i, rank)
        trainable, frozen = trainable + t, frozen + f
    return trainable * shape.layers, frozen * shape.layers


def projection_state_bytes(shape: Shape, vocab_size: int, rank: int, zero_stage: int, num_gpus: int) -> int:
    """Optimizer-state bytes per rank of a projection method (APOLLO, APOLLO-Mini, Fira: the
    ``zero/projected_adam.py`` layout), in place of AdamW's 8 bytes per trainable element:

    * a tall target (out >= in): Adam moments of R (out x r), each rank those of the rows it
      holds: ``8 r out`` on ZeRO-0, ``8 r ceil(out / N)`` on ZeRO 1-3, plus a rank sharing a row
      cut by a partition edge keeps that row too (at most ``8 r`` per edge, not counted);
    * a wide target (out < in): moments of R (r x in), whole on every rank: ``8 r in``;
    * the projector (r x in or out x r, fp32, whole on every rank): ``4 r min(out, in)``, and the
      limiter's previous norm, 4 bytes;
    * every other trainable element: AdamW's 8 bytes (``1/N`` of them per rank on ZeRO 1-3).

    On ZeRO 1-3 this is the mean over ranks: ZeRO-1/2 cut one flat buffer of all parameters
    into equal element ranges, so a rank holding embeddings keeps more state than one holding
    projected rows; ZeRO-3 splits every parameter, and each rank holds about the mean.
    APOLLO-Mini (r = 1) keeps ``8 out / N + 4 in`` per tall matrix: O(max side), not O(out x in)."""
    n = 1 if zero_stage == 0 else num_gpus
    counts = param_counts(shape, vocab_size)
    total = 8 * _ceil_div(counts["other"], n)
    for out_f, in_f in linear_shapes(shape).values():
        moments = 8 * rank * _ceil_div(out_f, n) if out_f >= in_f else 8 * rank * in_f
        total += shape.layers * (moments + 4 * rank * min(out_f, in_f) + 4)
    return total


PRECISIONS = ("bf16", "fp32")
GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU (``cpu``: bytes per rank in host memory) and parameter counts."""

    weights: int
    grads: int
    master: int
    adam: int
    activations: int
    total: int
    cpu: int
    total_params: int
    trainable_params: int
    frozen_params: int
    # Host memory each rank holds for a moment (not per GPU): see host_transients.
    init_host: int = 0
    save_host: int = 0
    switch_host: int = 0
    projection_host: int = 0
    # Where the optimizer steps (the GPU; host memory with optimizer offload), for a moment: see step_bytes.
    step_transient: int = 0
    setting: str = ""


def _ceil_div(x: int, n: int) -> int:
    return -(-x // n)


def model_state_bytes(total_params: int, trainable_params: int, zero_stage: int, num_gpus: int,
                      precision: str = "bf16", keep_base_fp32: bool = False,
                      offload_optimizer: bool = False, offload_params: bool = False,
                      grad_accum_steps: int = 1, zero3_frozen_base: str = "partition") -> dict[str, int]:
    """Bytes of lp weights, grads, fp32 master and Adam moments on one rank (see module doc).

    ``zero3_frozen_base="replicate"`` (``zero/frozen_base.py``): on stage 3 every rank also
    holds the whole frozen W next to its shard, e*(P-T) more weight bytes, and gathers no W in
    forward or backward (one coalesced re-gather per optimizer step).
    """
    n, p, t = num_gpus, total_params, trainable_params
    elt = 4 if precision == "fp32" or keep_base_fp32 else 2
    weights = elt * (p if zero_stage < 3 else _ceil_div(p, n))
    if zero_stage == 3 and zero3_frozen_base == "replicate":
        weights += elt * (p - t)
    full_grads = zero_stage == 0 or (zero_stage == 1 and grad_accum_steps > 1)
    grads = elt * (t if full_grads else _ceil_div(t, n))
    if zero_stage == 0:
        master = 4 * t if elt == 2 else 0
        adam = 8 * t
    else:
        master, adam = 4 * _ceil_div(t, n), 8 * _ceil_div(t, n)
    cpu = 0
    if offload_optimizer:
        # Stages 1/2 accumulate the reduced gradient straight into a pinned fp32 host buffer;
        # stage 3 keeps its gradient partitions (model dtype) on the host.
        cpu += master + adam + (4 * _ceil_div(t, n) if zero_stage < 3 else grads)
        master = adam = 0
        if not full_grads:
            grads = 0
    if offload_params:
        cpu += weights
        weights = 0
    return {"weights": weights, "grads": grads, "master": master, "adam": adam, "cpu": cpu}


def activation_bytes(shape: Shape, method: str, rank: int, micro_batch: int, seq_len: int,
                     vocab_size: int = 32000, precision: str = "bf16",
                     activation_checkpointing: bool = False, attn_implementation: str = "sdpa") -> int:
    """Approximate activation bytes of one micro-batch (formula in the module docstring); an
    adapter method's saved low-dim tensors (MoRA's, GaLore's) are about LoRA's."""
    h, f, n = shape.hidden, shape.intermediate, shape.heads
    a = 4 if precision == "fp32" else 2
    layer = 8 * h + 8 * a * h + 4 * a * f + 4 * n + 8
    if attn_implementation == "eager":
        layer += 6 * n * seq_len - 4 * n
    if get_method(method).adapters:
        layer += 7 * a * rank
    top = 4 * h + 4 + 2 * a * h + 4 * vocab_size + 16
    if activation_checkpointing:
        per_token = shape.layers * a * h + layer + top
    else:
        per_token = shape.layers * layer + top
    return micro_batch * seq_len * per_token


def _check(method, rank, zero_stage, num_gpus, micro_batch, seq_len, vocab_size, precision,
           offload_optimizer, offload_params, keep_base_fp32, attn_implementation, grad_accum_steps):
    if method not in METHODS:
        raise ConfigError(f"method '{method}' is unknown: use one of {', '.join(METHODS)}")
    if (get_method(method).needs_rank or get_method(method).projects) and (not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank={rank!r} with method={method}: give the adapter rank as a positive integer")
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_stage={zero_stage!r} is not a ZeRO stage: use 0, 1, 2 or 3")
    for name, value in (("num_gpus", num_gpus), ("micro_batch", micro_batch), ("seq_len", seq_len),
                        ("vocab_size", vocab_size), ("grad_accum_steps", grad_accum_steps)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision '{precision}' is unknown: use bf16 or fp32")
    if keep_base_fp32 and precision != "bf16":
        raise ConfigError("keep_base_fp32 only applies with precision=bf16: drop it or set precision=bf16")
    if offload_optimizer and zero_stage == 0:
        raise ConfigError("offload_optimizer needs ZeRO stage 1, 2 or 3: raise zero_stage or drop the offload")
    if offload_params and zero_stage != 3:
        raise ConfigError("offload_params needs ZeRO stage 3: set zero_stage=3 or drop the offload")
    if attn_implementation not in ("sdpa", "flash_attention_2", "eager"):
        raise ConfigError(f"attn_implementation '{attn_implementation}' is unknown: use sdpa, flash_attention_2 or eager")


def estimate_memory(preset: str | Shape, method: str, rank: int | None, zero_stage: int, num_gpus: int,
                    micro_batch: int, seq_len: int, vocab_size: int = 32000, precision: str = "bf16",
                    keep_base_fp32: bool = False, activation_checkpointing: bool = False,
                    offload_optimizer: bool = False, offload_params: bool = False, *,
                    attn_implementation: str = "sdpa", grad_accum_steps: int = 1,
                    zero3_frozen_base: str = "partition", split_vocab: bool = False) -> MemoryEstimate:
    """Per-GPU bytes of a training run: model states exactly, activations approximately.

    ReLoRA and LoRA freeze every wrapped linear (q/k/v/o/gate/up/down) and train their
    adapters plus embeddings, norms and lm_head; ``full`` trains everything; ``control`` is
    the paper's smaller full-rank model with as many params as ReLoRA trains
    (``models.control_shape``); the projection methods train everything with their own
    optimizer state (:func:`projection_state_bytes`). ``rank`` None: the method's default
    (``Method.default_rank``). ``split_vocab``: the embedding and head in row blocks
    (``model.split_vocab``), which bounds the transients by the largest block.
    """
    if rank is None and method in METHODS:
        rank = get_method(method).default_rank
    _check(method, rank, zero_stage, num_gpus, micro_batch, seq_len, vocab_size, precision,
           offload_optimizer, offload_params, keep_base_fp32, attn_implementation, grad_accum_steps)
    shape = preset_shape(preset) if isinstance(preset, str) else preset
    name = preset if isinstance(preset, str) else f"h{shape.hidden}xL{shape.layers}"
    trained = get_method(method)
    own = trained.model_shape(shape, vocab_size, rank)  # control's smaller model
    if own != shape:
        shape, name = own, name + f" -> h{own.hidden}"
    full_rank = not trained.adapters
    counts = param_counts(shape, vocab_size)
    if full_rank:
        total = trainable = counts["total"]
    else:
        adapters, buffers = method_adapter_params(shape, method, rank)
        total = counts["total"] + adapters + buffers
        trainable = counts["other"] + adapters
    states = model_state_bytes(total, trainable, zero_stage, num_gpus, precision, keep_base_fp32,
                               offload_optimizer, offload_params, grad_accum_steps,
                               zero3_frozen_base if zero_stage == 3 else "partition")
    if trained.projects:
        adam = projection_state_bytes(shape, vocab_size, rank, zero_stage, num_gpus)
        if offload_optimizer:
            states["cpu"] += adam - 8 * _ceil_div(trainable, num_gpus)  # AdamW's, moved to the host
        else:
            states["adam"] = adam
    acts = activation_bytes(shape, method, rank, micro_batch, seq_len, vocab_size,
                            precision, activation_checkpointing, attn_implementation)
    setting = (f"{name} {method}" + (f" r={rank}" if trained.needs_rank or trained.projects else "")
               + f", ZeRO-{zero_stage} x {num_gpus} GPU, {precision}"
               + (" + fp32 base (autocast)" if keep_base_fp32 else "")
               + f", micro-batch {micro_batch} x {seq_len}"
               + (f", grad. accum. {grad_accum_steps}" if grad_accum_steps > 1 else "")
               + (", act. ckpt" if activation_checkpointing else "")
               + (", frozen W replicated" if zero_stage == 3 and zero3_frozen_base == "replicate" and not full_rank else "")
               + (", offload opt" if offload_optimizer else "") + (", offload params" if offload_params else ""))
    gpu = states["weights"] + states["grads"] + states["master"] + states["adam"] + acts
    largest = largest_param(shape, vocab_size, split_vocab)
    return MemoryEstimate(weights=states["weights"], grads=states["grads"], master=states["master"],
                          adam=states["adam"], activations=acts, total=gpu, cpu=states["cpu"],
                          total_params=total, trainable_params=trainable, frozen_params=total - trainable,
                          setting=setting, projection_host=projection_bytes(shape) if trained.full_gradient_probe else 0,
                          step_transient=step_bytes(trainable, zero_stage, num_gpus, precision, largest),
                          **host_transients(shape, counts["total"], largest, zero_stage, num_gpus, switch=not full_rank))


def format_table(est: MemoryEstimate) -> str:
    """A markdown table of one estimate, in GiB per GPU."""
    rows = [("lp weights", est.weights), ("gradients", est.grads), ("fp32 master", est.master),
            ("Adam moments", est.adam), ("activations (approx.)", est.activations), ("**total per GPU**", est.total)]
    if est.cpu:
        rows.append(("host memory per rank (offload)", est.cpu))
    rows.append(("host, every rank while building the model (transient)", est.init_host))
    rows.append(("host, every rank while saving a checkpoint (transient)", est.save_host))
    if est.switch_host:
        rows.append(("host, every rank at the warm-start switch (transient)", est.switch_host))
    if est.projection_host:
        rows.append(("every rank in a projector update, where the engine trains (transient)", est.projection_host))
    if est.step_transient:
        rows.append(("the optimizer step, where it steps (transient)", est.step_transient))
    lines = [f"{est.setting}", "",
             f"params: {est.total_params:,} total, {est.trainable_params:,} trainable, {est.frozen_params:,} frozen", "",
             "| part | GiB | bytes |", "|---|---:|---:|"]
    lines += [f"| {name} | {value / GiB:.3f} | {value:,} |" for name, value in rows]
    return "\n".join(lines)
