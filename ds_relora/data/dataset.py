"""Reading prepared data: memory-mapped token shards and the deterministic batch order.

The batch order depends only on (seed, consumed_samples, global batch size), never on how
the global batch is spread over ranks and micro-steps. That is what makes a resumed run
continue at the exact sample, and lets a run change its world size or gradient
accumulation between restarts without seeing different data.
"""

from __future__ import annotations

import bisect
import json
import operator
import warnings
from pathlib import Path

import numpy as np
import torch

from ds_relora.errors import DataError

FORMAT_VERSION = 1
SPLITS = ("train", "validation")
_PREPARE_HINT = "run `ds-relora prepare-data` first"


def read_data_meta(data_dir: str | Path) -> dict:
    """``meta.json`` of a prepared data folder (DataError when missing or from another format)."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise DataError(f"prepared data folder {folder} does not exist: {_PREPARE_HINT} (or set data.path)")
    path = folder / "meta.json"
    if not path.is_file():
        raise DataError(f"{folder} has no meta.json, so it is not (completely) prepared: {_PREPARE_HINT}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is unreadable ({exc}): {_PREPARE_HINT} to rebuild it") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise DataError(f"{path} has format_version {version!r}, this version reads {FORMAT_VERSION}: {_PREPARE_HINT} to rebuild it")
    return meta


class PackedDataset:
    """Non-overlapping ``seq_len`` windows of one split's token stream (``torch`` Dataset-like).

    A window never crosses a shard end; each shard's tail shorter than ``seq_len`` is dropped.
    """

    def __init__(self, data_dir: str | Path, split: str, seq_len: int):
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
        if int(seq_len) < 1:
            raise DataError(f"data.seq_len={seq_len} must be at least 1: set a positive sequence length")
        self.data_dir = Path(data_dir)
        self.split = split
        self.seq_len = int(seq_len)
        self.meta = read_data_meta(self.data_dir)
        self.vocab_size = int(self.meta["vocab_size"])
        self.eos_token_id = int(self.meta["eos_token_id"])
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.num_tokens = int(self.meta["num_tokens"][split])
        self.shard_paths = [self.data_dir / name for name in self.meta["shards"][split]]
        self._check_shards()
        if self.num_tokens < self.seq_len:
            more = "prepare more data (or raise prepare.val_fraction)" if split == "validation" else "prepare more data"
            raise DataError(
                f"{split} split of {self.data_dir} has {self.num_tokens} tokens, fewer than seq_len={self.seq_len}: "
                f"{more} or lower data.seq_len"
            )
        # _starts[k] = index of the first window of shard k; binary search maps a sample to its shard.
        counts = [n // self.seq_len for n in self._shard_tokens]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64).tolist()
        self._len = self._starts[-1]
        if self._len == 0:
            raise DataError(
                f"{split} split of {self.data_dir} has {self.num_tokens} tokens but no shard holds seq_len={self.seq_len} of them: "
                "re-run prepare-data with a larger prepare.shard_tokens or lower data.seq_len"
            )
        self._maps: list[np.memmap] | None = None

    def _check_shards(self) -> None:
        sizes = []
        for path in self.shard_paths:
            if not path.is_file():
                raise DataError(f"shard {path} listed in meta.json is missing: re-run `ds-relora prepare-data`")
            nbytes = path.stat().st_size
            if nbytes % self.dtype.itemsize:
                raise DataError(f"shard {path} is truncated ({nbytes} bytes): re-run `ds-relora prepare-data`")
            sizes.append(nbytes // self.dtype.itemsize)
        if sum(sizes) != self.num_tokens:
            raise DataError(
                f"{self.split} shards of {self.data_dir} hold {sum(sizes)} tokens but meta.json says {self.num_tokens}: "
                "re-run `ds-relora prepare-data`"
            )
        self._shard_tokens = sizes

    def _memmaps(self) -> list[np.memmap]:
        # Opened lazily, per process: a pickled memmap would copy the whole shard into each worker.
        if self._maps is None:
            self._maps = [np.memmap(p, dtype=self.dtype, mode="r") for p in self.shard_paths]
        return self._maps

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = None
        return state

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index) -> torch.Tensor:
        i = operator.index(index)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"sample {index} out of range for {self._len} samples")
        shard = bisect.bisect_right(self._starts, i) - 1
        start = (i - self._starts[shard]) * self.seq_len
        window = self._memmaps()[shard][start:start + self.seq_len]
        return torch.from_numpy(window.astype(np.int64))

    def __repr__(self) -> str:
        return f"PackedDataset({str(self.data_dir)!r}, split={self.split!r}, seq_len={self.seq_len}, samples={self._len})"


def _positive(name: str, value: int) -> int:
    value = operator.index(value)
    if value < 1:
        raise DataError(f"{name}={value} must be at least 1: fix the batch settings")
    return value


class DistributedBatchIterator:
    """This rank's micro-batches for each optimizer step, from a seeded per-epoch permutation.

    The sample stream is ``perm(seed, 0) ++ perm(seed, 1) ++ ...``; optimizer step ``k`` takes
    the global batch of positions ``[consumed, consumed + G)``. Rank ``r`` owns the contiguous
    slice ``[r * micro * accum, (r + 1) * micro * accum)`` of it and micro-step ``m`` the
    ``m``-th ``micro`` samples of that slice, so the union over ranks and micro-steps (and the
    mean loss over it) does not depend on the split of ``G`` into world x accum x micro.
    """

    def __init__(self, dataset, micro_batch_size: int, grad_accum_steps: int, rank: int, world_size: int,
                 seed: int, consumed_samples: int = 0):
        self.dataset = dataset
        self.micro_batch_size = _positive("micro_batch_size", micro_batch_size)
        self.grad_accum_steps = _positive("grad_accum_steps", grad_accum_steps)
        self.world_size = _positive("world_size", world_size)
        self.rank = operator.index(rank)
        if not 0 <= self.rank < self.world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}: check the launcher's RANK/WORLD_SIZE")
        self.seed = int(seed)
        self.global_batch_size = self.micro_batch_size * self.grad_accum_steps * self.world_size
        self.num_samples = len(dataset)
        if self.num_samples < self.global_batch_size:
            what = f"{getattr(dataset, 'split', 'the')} split"
            raise DataError(
                f"{what} has {self.num_samples} sequences, fewer than one global batch of {self.global_batch_size} "
                f"(micro {self.micro_batch_size} x accum {self.grad_accum_steps} x world {self.world_size}): "
                "prepare more data, lower data.seq_len or lower the batch size"
            )
        if consumed_samples < 0:
            raise DataError(f"consumed_samples={consumed_samples} is negative: resume from a valid checkpoint")
        self.consumed_samples = int(consumed_samples)
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.num_samples

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            # A global batch spans at most two epochs, so two cached permutations are enough.
            for old in [e for e in self._perms if e < epoch - 1]:
                del self._perms[old]
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
            self._perms[epoch] = torch.randperm(self.num_samples, generator=gen)
        return self._perms[epoch]

    def sample_indices(self, start: int, count: int) -> list[int]:
        """Dataset indices at global stream positions ``[start, start + count)``."""
        out: list[int] = []
        pos = start
        while len(out) < count:
            epoch, offset = divmod(pos, self.num_samples)
            take = min(count - len(out), self.num_samples - offset)
            out.extend(self._permutation(epoch)[offset:offset + take].tolist())
            pos += take
        return out

    def next_step(self) -> list[torch.Tensor]:
        """``grad_accum_steps`` tensors ``[micro, seq_len]`` of this rank for the next optimizer step."""
        batches = self.batches_at(self.consumed_samples)
        self.advance()
        return batches

    def batches_at(self, consumed_samples: int) -> list[torch.Tensor]:
        """This rank's micro-batches of the step that starts at stream position ``consumed_samples``,
        without moving the iterator (a prefetch reads the next step while the state that a
        checkpoint saves still says where this one started)."""
        share = self.micro_batch_size * self.grad_accum_steps
        indices = self.sample_indices(consumed_samples + self.rank * share, share)
        micro = self.micro_batch_size
        return [
            torch.stack([self.dataset[i] for i in indices[m * micro:(m + 1) * micro]])
            for m in range(self.grad_accum_steps)
        ]

    def advance(self) -> None:
        """Count one optimizer step's global batch as consumed."""
        self.consumed_samples += self.global_batch_size

    def state_dict(self) -> dict:
        return {
            "consumed_samples": self.consumed_samples,
            "epoch": self.epoch,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        consumed = int(state["consumed_samples"])
        if consumed < 0:
            raise DataError(f"consumed_samples={consumed} in the checkpoint is negative: resume from a valid checkpoint")
        # Not errors: a deliberate change is allowed, but the resumed order is then not the original one.
        for key in ("seed", "num_samples"):
            if key in state and int(state[key]) != getattr(self, key):
                warnings.warn(
                    f"resumed data iterator has {key}={getattr(self, key)}, the checkpoint had {state[key]}: "
                    "the sample order will differ from the interrupted run",
                    stacklevel=2,
                )
        self.consumed_samples = consumed


def validation_batches(dataset, micro_batch_size: int, num_batches: int, rank: int, world_size: int) -> list[torch.Tensor]:
    """Up to ``num_batches`` fixed micro-batches for ``rank``; disjoint across ranks, no shuffle.

    Every rank gets the same number of equally sized batches so that a mean over ranks weights
    all samples alike; when the split is too small for one full micro-batch per rank, the
    batches shrink to ``len(dataset) // world_size`` samples.
    """
    micro = _positive("micro_batch_size", micro_batch_size)
    num_batches = _positive("num_batches", num_batches)
    world_size = _positive("world_size", world_size)
    rank = operator.index(rank)
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world size {world_size}: check the launcher's RANK/WORLD_SIZE")
    n = len(dataset)
    per_rank = min(num_batches, n // (micro * world_size))
    if per_rank == 0:
        micro, per_rank = n // world_size, 1
        if micro == 0:
            raise DataError(
                f"validation split has {n} sequences, fewer than the {world_size} ranks: "
                "raise prepare.val_fraction (or prepare more data), or lower data.seq_len"
            )
    # Batch b of rank r is global batch b * world + r: all ranks read from the front of the split.
    return [
        torch.stack([dataset[i] for i in range((b * world_size + rank) * micro, (b * world_size + rank + 1) * micro)])
        for b in range(per_rank)
    ]
