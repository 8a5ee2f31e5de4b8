"""LLaMA-shaped model presets and model construction.

Shapes of 60M-1.3B follow the ReLoRA paper's Table 1; 3B is OpenLLaMA-3B's shape and 7B is
LLaMA-7B's and 13B LLaMA-13B's; tiny/9m/20m/35m are debug and CPU-benchmark sizes.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import zlib

import torch

from ds_relora.errors import ConfigError
from ds_relora.row_blocks import RowBlocks, block_rows, placeholder_vocab, split_vocab, splits
from ds_relora.zero.ds_config import bf16_available, zero_stage
from ds_relora.zero.state import full_shape, set_module_value, set_shard_slice, shard_bounds


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int


PRESETS: dict[str, Shape] = {
    "tiny": Shape(64, 172, 2, 4),
    "9m": Shape(128, 344, 4, 4),
    "20m": Shape(256, 688, 4, 4),
    "35m": Shape(384, 1024, 6, 6),
    "60m": Shape(512, 1376, 8, 8),
    "130m": Shape(768, 2048, 12, 12),
    "250m": Shape(768, 2560, 24, 16),
    "350m": Shape(1024, 2736, 24, 16),
    "1.3b": Shape(2048, 5461, 24, 32),
    "3b": Shape(3200, 8640, 26, 32),
    "7b": Shape(4096, 11008, 32, 32),
    "13b": Shape(5120, 13824, 40, 40),
    # CPU quality benchmark (benchmarks/quality/sweep_shape85.yaml): tiny's width at 10 layers, so
    # that with a 512-token vocabulary the wrapped linears hold 88% of the params (>= 85%).
    "cpu85": Shape(64, 172, 10, 4),
}

WRAPPED_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def preset_shape(name: str) -> Shape:
    key = name.lower()
    if key not in PRESETS:
        hint = difflib.get_close_matches(key, list(PRESETS), n=1, cutoff=0.0)
        raise ConfigError(
            f"unknown model preset '{name}': use one of {', '.join(PRESETS)}"
            + (f" (did you mean '{hint[0]}'?)" if hint else "")
        )
    return PRESETS[key]


def linear_shapes(shape: Shape) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each wrapped linear type in one decoder layer."""
    h, f = shape.hidden, shape.intermediate
    return {
        "q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
        "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f),
    }


def param_counts(shape: Shape, vocab_size: int, rank: int | None = None) -> dict[str, int]:
    """Analytic parameter counts: wrapped linears, the rest (embeddings, norms, head), adapters."""
    lin = sum(o * i for o, i in linear_shapes(shape).values()) * shape.layers
    other = 2 * vocab_size * shape.hidden + (2 * shape.layers + 1) * shape.hidden
    adapters = 0
    if rank:
        adapters = sum(rank * (o + i) for o, i in linear_shapes(shape).values()) * shape.layers
    return {"linear": lin, "other": other, "adapters": adapters, "total": lin + other}


def control_shape(shape: Shape, vocab_size: int, rank: int) -> Shape:
    """The largest same-depth shape whose total params do not exceed ReLoRA's trainable params.

    The paper's "control" baseline: a smaller full-rank model with as many trainable parameters
    as the ReLoRA model (adapters + embeddings, norms, head).
    """
    counts = param_counts(shape, vocab_size, rank)
    budget = counts["adapters"] + counts["other"]
    head_dim = shape.hidden // shape.heads
    best = None
    for heads in range(1, shape.heads + 1):
        hidden = heads * head_dim
        inter = int(round(shape.intermediate * hidden / shape.hidden))
        cand = Shape(hidden, max(inter, 1), shape.layers, heads)
        if param_counts(cand, vocab_size)["total"] <= budget:
            best = cand
    if best is None:
        raise ConfigError(
            f"no control model fits ReLoRA's {budget} trainable params at depth {shape.layers}: "
            "use a larger preset or a larger relora.rank"
        )
    return best


HALF_DTYPES = (torch.bfloat16, torch.float16)


def flash_attn_importable() -> bool:
    """Whether ``flash_attn`` really imports here. ``find_spec`` also finds a wheel built for
    another torch or CUDA, whose extension then fails to load (undefined symbols)."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        import flash_attn  # noqa: F401, PLC0415  (optional dependency: only its importability is asked)
    except Exception:  # ImportError / OSError of a mismatched binary, RuntimeError from its CUDA setup
        return False
    return True


def resolve_attn_implementation(requested: str, compute_dtype: torch.dtype | None = None) -> str:
    """The attention kernel for ``model.attn_implementation``. ``auto``: flash-attn for a bf16 or
    fp16 forward on CUDA when it imports (its kernels take only those dtypes), else SDPA.
    ``compute_dtype`` None means what ``bf16: auto`` resolves to on this machine."""
    if requested != "auto":
        if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("model.attn_implementation=flash_attention_2 needs flash-attn: pip install 'ds_relora[gpu]' or use sdpa")
        return requested
    if not torch.cuda.is_available():
        return "sdpa"
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if bf16_available() else torch.float32
    if compute_dtype in HALF_DTYPES and flash_attn_importable():
        return "flash_attention_2"
    return "sdpa"


def llama_config(shape: Shape, vocab_size: int, max_positions: int, *, eos_token_id: int | None = None,
                 attn_implementation: str = "sdpa", init_std: float = 0.02):
    from transformers import LlamaConfig  # noqa: PLC0415  (transformers takes seconds to import; only code that builds a model needs it)

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        initializer_range=init_std,
        tie_word_embeddings=False,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
    )
    cfg._attn_implementation = attn_implementation
    return cfg


def largest_linear(shape: Shape) -> int:
    """Elements of a decoder layer's largest wrapped linear."""
    return max(o * i for o, i in linear_shapes(shape).values())


def vocab_block(hidden: int) -> int:
    """Elements per row block of the embedding and head (``model.split_vocab``, ``row_blocks``): an
    attention projection's (hidden x hidden), a decoder layer's smallest linear. A block's
    backward holds it gathered and its gradient (on CPU ranks also gloo's copy of the gather),
    so at this size no block's moment outweighs a decoder linear's, not even a frozen one's
    (ReLoRA's W, gathered with no gradient)."""
    return hidden * hidden


def largest_param(shape: Shape, vocab_size: int, split_vocab: bool = False) -> int:
    """Elements of the model's largest parameter: the embedding (or one of its row blocks with
    ``model.split_vocab``) or a decoder layer's largest linear."""
    vocab_rows = max(block_rows(vocab_size, shape.hidden, vocab_block(shape.hidden))) if split_vocab else vocab_size
    return max(vocab_rows * shape.hidden, largest_linear(shape))


def build_model(hf_config, seed: int, ds_config: dict | None = None, device: torch.device | str | None = None,
                vocab_block: int | None = None):
    """A freshly initialised causal LM; the same values on every rank and every ZeRO stage for
    the same seed. With a ZeRO-3 ``ds_config`` it is built already partitioned
    (``deepspeed.zero.Init``: each module is whole only while it is constructed, then each rank
    keeps its shard), so no rank ever holds the whole model. Otherwise it is built directly on
    ``device`` (the device the engine trains on; default CPU), so a GPU run never holds a whole
    fp32 model in host memory. With ``vocab_block`` (elements) an untied embedding and head
    larger than it are held in row blocks of at most that many (``row_blocks``), built in the same
    context, with the whole tensors' values. Either way the weights are initialised once, by
    :func:`init_weights`: transformers' own initialisation is skipped (it would draw every
    weight a second time, for nothing)."""

    from transformers import AutoModelForCausalLM  # noqa: PLC0415  (transformers takes seconds to import; only code that builds a model needs it)

    partitioned = ds_config is not None and zero_stage(ds_config) == 3
    if partitioned:
        import deepspeed  # noqa: PLC0415  (deepspeed takes seconds to import and patches torch; only code that builds an engine needs it)

        import_model_code(hf_config)  # zero.Init patches tensor constructors, which breaks modules first imported inside it
        context = deepspeed.zero.Init(config_dict_or_path=ds_config)
    else:
        context = torch.device(device or "cpu")
    split = splits(hf_config, vocab_block)
    torch.manual_seed(seed)
    with context, _no_hf_init():
        built = placeholder_vocab(hf_config) if split else hf_config
        model = AutoModelForCausalLM.from_config(built, attn_implementation=hf_config._attn_implementation)
        model.tie_weights()  # part of the initialisation skipped above (tie_word_embeddings)
        if split:
            split_vocab(model, hf_config.vocab_size, hf_config.pad_token_id, vocab_block)
    if not partitioned:
        model = model.float()
    init_weights(model, seed, getattr(hf_config, "initializer_range", 0.02))
    torch.manual_seed(seed)  # what follows (dropout) draws from a state that does not depend on the stage
    return model


def import_model_code(hf_config) -> None:
    """Import every module that building this model imports (transformers' model classes; through
    their generation utils, torch._dynamo: tens of MiB), by building it on the meta device. The
    trainer does it before its build phase starts, so a run's host-memory baseline holds the code
    whatever the method (an adapter method's checks build a meta model before it anyway)."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415  (transformers takes seconds to import; only code that builds a model needs it)

    with torch.device("meta"):
        AutoModelForCausalLM.from_config(hf_config, attn_implementation=hf_config._attn_implementation)


def _no_hf_init():
    """transformers' context that skips its weight initialisation (moved between 4.x and 5.x).
    Norm weights and rotary tables come from the module constructors either way."""
    try:
        from transformers.initialization import no_init_weights  # noqa: PLC0415  (transformers 5)
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # noqa: PLC0415  (transformers 4)
    return no_init_weights()


def _param_generator(seed: int, name: str) -> torch.Generator:

    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63))


@torch.no_grad()
def init_weights(model, seed: int, std: float) -> None:
    """HF's causal-LM init (``normal(0, std)`` for every linear and embedding weight, zero biases
    and padding row), each parameter drawn from its own generator seeded by ``seed`` and its name:
    the values do not depend on construction order, the stage or what else was drawn, and under
    ZeRO-3 every rank computes a parameter and writes only its own shard (one whole parameter in
    memory at a time, no communication). Other parameters (norms) keep their constructor's
    constant values."""

    blocked = set()
    for module_name, module in model.named_modules():
        if isinstance(module, RowBlocks):
            # The whole tensor's draw (its own name's generator), streamed: the unsplit values.
            for offset, values in normal_chunks(module.starts[-1] * module.cols, std, _param_generator(seed, f"{module_name}.weight")):
                module.write_flat(offset, values)
            module.zero_padding_row()
            blocked.update(id(b) for b in module.blocks)
            continue
        if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) or id(module) in blocked:
            continue
        for key, p in module.named_parameters(recurse=False):
            name = f"{module_name}.{key}" if module_name else key
            shape = full_shape(p)
            if key == "weight" and shard_bounds(p) is not None and math.prod(shape) > DRAW_CHUNK:
                _init_shard(p, module, _param_generator(seed, name), shape, std)
                continue
            if key == "weight":
                gen = _param_generator(seed, name)
                # Drawn on the generator's device (CPU) whatever device context the model is built
                # under: a CUDA normal_ rejects a CPU generator, and a CUDA generator would draw
                # other values than a CPU-built model of the same seed.
                value = torch.empty(shape, device=gen.device).normal_(0.0, std, generator=gen)
                pad = getattr(module, "padding_idx", None)
                if pad is not None:
                    value[pad].zero_()
            else:
                value = torch.zeros(shape, device=p.device)
            set_module_value(p, value.to(p.device))


# Elements drawn at a time for a partitioned parameter (16 MiB fp32): a multiple of 16, see normal_chunks.
DRAW_CHUNK = 1 << 22


def normal_chunks(numel: int, std: float, generator: torch.Generator, chunk: int | None = None):
    """``(offset, values)`` pieces of ``torch.empty(numel).normal_(0, std, generator=generator)``,
    the same bits, ``chunk`` elements at a time. torch's CPU ``normal_`` fills a tensor of at
    least 16 elements with uniforms in order and transforms them in blocks of 16 (its last 16
    redrawn when the size is not a multiple of 16): pieces that are multiples of 16, the last at
    least 16 long, continue the one stream exactly (``tests/test_models.py`` checks it against
    the one-shot draw, tails included)."""
    chunk = chunk or DRAW_CHUNK
    if chunk % 16:
        raise ValueError(f"chunk={chunk} must be a multiple of 16")
    start = 0
    while start < numel:
        size = min(chunk, numel - start)
        if numel - start - size < 16:  # a tail shorter than 16 goes with this piece
            size = numel - start
        yield start, torch.empty(size, device=generator.device).normal_(0.0, std, generator=generator)
        start += size


def _init_shard(p, module, generator: torch.Generator, shape: tuple[int, ...], std: float) -> None:
    """:func:`init_weights` of one ZeRO-3 weight without its whole value: the draw streams in
    :data:`DRAW_CHUNK` pieces and each rank keeps the elements its shard holds (the build's host
    transient is one piece, not a second copy of the embedding)."""
    for offset, values in normal_chunks(math.prod(shape), std, generator):
        set_shard_slice(p, offset, values)
    pad = getattr(module, "padding_idx", None)
    if pad is not None:
        row = math.prod(shape[1:])
        set_shard_slice(p, pad * row, torch.zeros(row))


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of every decoder layer, through transformers' own
    switch: ``activation_checkpointing_enable`` where it exists (transformers 5.x, which
    deprecates ``gradient_checkpointing_enable`` and drops it in v6), the old name before it."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def describe_params(model) -> dict[str, int]:
    def count(p):  # a ZeRO-3 param holds only its shard
        return getattr(p, "ds_numel", p.numel())

    total = sum(count(p) for p in model.parameters())
    trainable = sum(count(p) for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "frozen": total - trainable}
