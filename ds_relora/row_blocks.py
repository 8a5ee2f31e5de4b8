"""The vocabulary-sized embedding and head as row blocks, each its own module and parameter.

ZeRO-3 gathers a parameter whole for every forward and backward, ZeRO-2 reduces a gradient
whole, and DeepSpeed's initialisation gathers every trainable param whole: what a rank holds
for a moment is a multiple of the largest parameter. At LLaMA's 32,000-row vocabulary that is the
embedding or the head (500 MiB fp32 at 7B, three times a decoder layer's largest linear). Split
into blocks of rows, each a module of its own, they are gathered, reduced and released one block
at a time (blocks of an attention projection's size, ``models.vocab_block``), so the largest
parameter is a decoder layer's (``tests/test_row_blocks.py``).

The split is a memory layout, not a format: the blocks' values are the whole tensor's rows
(initialised from the whole tensor's draw), and a checkpoint, an export and a pretrained model
hold the whole tensor under HF's name (:func:`whole_names` maps a block to its rows there).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ds_relora.zero.state import is_zero3_param, set_module_value, set_shard_slice, shard_bounds

BLOCKS_KEY = "blocks"


def block_rows(rows: int, cols: int, max_elements: int) -> list[int]:
    """Rows per block: as few equal blocks as keep each at most ``max_elements`` (the last may be
    shorter); one block when the whole tensor fits."""
    count = math.ceil(rows / max(1, max_elements // max(cols, 1)))  # blocks of at most that many whole rows
    size = math.ceil(rows / count)  # evened out: never more rows than that
    return [min(size, rows - start) for start in range(0, rows, size)]


class RowBlocks(nn.Module):
    """A ``(rows, cols)`` weight held as ``blocks[i].weight``, rows ``starts[i]:starts[i+1]``."""

    def __init__(self, blocks: list[nn.Module], rows: list[int], cols: int):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.starts = [sum(rows[:i]) for i in range(len(rows) + 1)]
        self.cols = cols

    @torch.no_grad()
    def write_flat(self, offset: int, values: torch.Tensor) -> None:
        """Write elements ``[offset, offset + len)`` of the flattened whole tensor into the blocks
        that hold them (a ZeRO-3 block: this rank's shard of them; a whole one: in place, and
        its shard too when ZeRO-3 keeps it persistent)."""
        bounds = [s * self.cols for s in self.starts]
        for block, lo_bound, hi_bound in zip(self.blocks, bounds, bounds[1:]):
            lo, hi = max(offset, lo_bound), min(offset + values.numel(), hi_bound)
            if hi <= lo:
                continue
            p, piece = block.weight, values[lo - offset: hi - offset]
            if shard_bounds(p) is not None:
                set_shard_slice(p, lo - lo_bound, piece)
                continue
            p.data.view(-1)[lo - lo_bound: hi - lo_bound].copy_(piece.to(p.device, p.dtype))
            if is_zero3_param(p):
                set_module_value(p, p.data)

    def zero_padding_row(self) -> None:
        """Zero the padding token's row (HF's init of an embedding with a ``padding_idx``)."""
        for start, block in zip(self.starts, self.blocks):
            if getattr(block, "padding_idx", None) is not None:
                self.write_flat((start + block.padding_idx) * self.cols, torch.zeros(self.cols))


class BlockedEmbedding(RowBlocks):
    """``nn.Embedding(num_embeddings, dim)`` in row blocks: each token's row is looked up in the
    block that holds it (the same values; the gradient of a row sums the same positions in the
    same order). Every block runs on every forward (an empty lookup where no token falls in it),
    so ZeRO-3 sees the same modules, in the same order, each step."""

    def __init__(self, num_embeddings: int, dim: int, rows: list[int], padding_idx: int | None = None):
        starts = [sum(rows[:i]) for i in range(len(rows))]
        pads = [padding_idx - s if padding_idx is not None and s <= padding_idx < s + r else None for s, r in zip(starts, rows)]
        super().__init__([nn.Embedding(r, dim, padding_idx=pad) for r, pad in zip(rows, pads)], rows, dim)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, dim, padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = None
        for start, stop, block in zip(self.starts, self.starts[1:], self.blocks):
            hit = (ids >= start) & (ids < stop)
            rows = block(ids[hit] - start)
            if out is None:
                out = rows.new_zeros((*ids.shape, self.embedding_dim))
            out[hit] = rows
        return out


class BlockedLinear(RowBlocks):
    """``nn.Linear(in_features, out_features, bias=False)`` in blocks of output rows: the output
    is the blocks' outputs side by side."""

    def __init__(self, in_features: int, out_features: int, rows: list[int]):
        super().__init__([nn.Linear(in_features, r, bias=False) for r in rows], rows, in_features)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([block(x) for block in self.blocks], dim=-1)


def splits(config, max_elements: int | None) -> bool:
    """Whether :func:`split_vocab` splits a model of this HF config: an untied embedding and head
    (one tensor for both would need its blocks shared) larger than one block."""
    return bool(max_elements) and not getattr(config, "tie_word_embeddings", False) \
        and len(block_rows(config.vocab_size, config.hidden_size, max_elements)) > 1


def placeholder_vocab(config):
    """A copy of ``config`` with a one-row vocabulary: the model is built with it, so the whole
    embedding and head are never made (ZeRO-3's construction allocates and broadcasts each
    param whole), then :func:`split_vocab` puts the real ones in, in blocks."""
    config = copy.deepcopy(config)
    config.vocab_size, config.pad_token_id = 1, None
    return config


def split_vocab(model, vocab_size: int, pad_token_id: int | None, max_elements: int) -> None:
    """Give a causal LM built with :func:`placeholder_vocab` its ``vocab_size``-row embedding and
    head in row blocks of at most ``max_elements``, built under the caller's context (a ZeRO-3
    ``zero.Init`` partitions each block as it is made)."""
    dim = model.config.hidden_size
    rows = block_rows(vocab_size, dim, max_elements)
    model.set_input_embeddings(BlockedEmbedding(vocab_size, dim, rows, pad_token_id))
    model.set_output_embeddings(BlockedLinear(dim, vocab_size, rows))
    model.config.vocab_size, model.config.pad_token_id = vocab_size, pad_token_id
    for module in model.modules():  # transformers' models keep their own copy (LlamaModel, LlamaForCausalLM)
        if hasattr(module, "vocab_size") and not isinstance(module, RowBlocks):
            module.vocab_size = vocab_size


def whole_names(module) -> dict[str, tuple[str, int, int, int]]:
    """``{block param name: (whole tensor's name, first row, end row, whole rows)}`` of every
    row-blocked weight in ``module`` (empty when nothing is split)."""
    found = {}
    for prefix, sub in module.named_modules():
        if isinstance(sub, RowBlocks):
            dot = f"{prefix}." if prefix else ""
            for i, (start, stop) in enumerate(zip(sub.starts, sub.starts[1:])):
                found[f"{dot}{BLOCKS_KEY}.{i}.weight"] = (f"{dot}weight", start, stop, sub.starts[-1])
    return found


class BlockReader:
    """A checkpoint's tensors (a ``TensorSet`` or a dict of whole values) seen through a model's
    row blocks: a block param's name, or its name with a suffix (``.exp_avg``), reads its rows of
    the whole tensor; every other name passes through. Loads go through it, so a checkpoint,
    an export and a pretrained model keep the whole tensors under HF's names."""

    def __init__(self, tensors, blocks: dict[str, tuple[str, int, int, int]]):
        self.tensors, self.blocks = tensors, blocks

    def _find(self, name: str) -> tuple[str, int, int] | None:
        for block, (whole, start, stop, _) in self.blocks.items():
            if name == block or name.startswith(block + "."):
                return whole + name[len(block):], start, stop
        return None

    def _whole_shape(self, whole: str) -> tuple[int, ...]:
        return tuple(self.tensors.shape(whole) if hasattr(self.tensors, "shape") else self.tensors[whole].shape)

    def __contains__(self, name: str) -> bool:
        found = self._find(name)
        return (found[0] if found else name) in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        found = self._find(name)
        if found is None:
            return self._whole_shape(name)
        whole, start, stop = found
        return (stop - start, *self._whole_shape(whole)[1:])

    def __getitem__(self, name: str) -> torch.Tensor:
        found = self._find(name)
        if found is None:
            return self.tensors[name]
        whole, start, stop = found
        if hasattr(self.tensors, "get_flat"):  # only the block's bytes
            cols = math.prod(self._whole_shape(whole)[1:])
            return self.tensors.get_flat(whole, start * cols, stop * cols).view(stop - start, cols)
        return self.tensors[whole][start:stop]

    get = __getitem__

    def __getattr__(self, attr: str):
        if attr == "get_flat" and hasattr(self.tensors, "get_flat"):
            return self._get_flat
        return getattr(self.tensors, attr)

    def _get_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        found = self._find(name)
        if found is None:
            return self.tensors.get_flat(name, start, stop)
        whole, first, end = found
        cols = math.prod(self._whole_shape(whole)[1:])
        return self.tensors.get_flat(whole, first * cols + start, first * cols + min(stop, (end - first) * cols))


def reader(tensors, module):
    """``tensors`` as ``module``'s params name them (:class:`BlockReader` where it has row blocks)."""
    blocks = whole_names(module)
    return BlockReader(tensors, blocks) if blocks else tensors
