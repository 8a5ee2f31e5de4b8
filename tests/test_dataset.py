"""The packed dataset (windows, shards, errors), the distributed batch order (global batch
independent of the rank/micro/accumulation split, exact resume, epochs) and validation batches."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ds_relora.data import DistributedBatchIterator, PackedDataset, validation_batches
from ds_relora.errors import DataError
from harness.checks import one_line_error


# ---------------------------------------------------------------- PackedDataset


def fake_data(folder: Path, shard_sizes: dict[str, list[int]], vocab: int = 1000) -> Path:
    """A prepared folder whose token at stream position p is p % vocab (no tokenizer needed)."""
    folder.mkdir()
    shards, counts, pos = {}, {}, 0
    for split, sizes in shard_sizes.items():
        shards[split], counts[split] = [], sum(sizes)
        for k, n in enumerate(sizes):
            name = f"{split}_{k:05d}.bin"
            (np.arange(pos, pos + n) % vocab).astype("<u2").tofile(folder / name)
            shards[split].append(name)
            pos += n
    meta = {"format_version": 1, "dtype": "uint16", "vocab_size": vocab, "eos_token_id": 0, "num_tokens": counts,
            "shards": shards, "num_documents": {s: 1 for s in counts}, "source": "fake", "tokenizer": "tokenizer"}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_packed_dataset_windows_do_not_cross_shards(tmp_path):
    d = fake_data(tmp_path / "d", {"train": [35, 20, 9], "validation": [16]})
    ds = PackedDataset(d, "train", 8)
    assert len(ds) == 4 + 2 + 1 and ds.vocab_size == 1000 and ds.eos_token_id == 0
    starts = [0, 8, 16, 24, 35, 43, 55]  # shard 0 tail [32, 35) and shard 1 tail [51, 55) dropped
    for i, s in enumerate(starts):
        assert ds[i].dtype == torch.long and ds[i].tolist() == list(range(s, s + 8))
    assert ds[-1].tolist() == list(range(55, 63))
    with pytest.raises(IndexError):
        ds[len(ds)]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._maps is None and torch.equal(clone[5], ds[5])
    assert len(PackedDataset(d, "validation", 8)) == 2


def test_packed_dataset_too_few_tokens(tmp_path):
    d = fake_data(tmp_path / "d", {"train": [40], "validation": [5]})
    with pytest.raises(DataError) as e:
        PackedDataset(d, "validation", 8)
    one_line_error(e, "has 5 tokens, fewer than seq_len=8", "prepare more data", "data.seq_len")
    with pytest.raises(DataError) as e:
        PackedDataset(tmp_path / "nope", "train", 8)
    one_line_error(e, "prepare-data")


# ---------------------------------------------------------------- batch iterator


def ids_dataset(n: int) -> list[torch.Tensor]:
    """Sample i is [i, i, i]: batches show exactly which samples they hold."""
    return [torch.full((3,), i, dtype=torch.long) for i in range(n)]


def step_samples(it) -> list[list[int]]:
    return [b[:, 0].tolist() for b in it.next_step()]


@pytest.mark.parametrize("world, micro, accum", [(1, 4, 6), (2, 3, 4), (3, 8, 1), (4, 2, 3), (6, 1, 4)])
def test_global_batch_is_independent_of_the_rank_micro_accum_split(world, micro, accum):
    ref = DistributedBatchIterator(ids_dataset(100), 24, 1, 0, 1, seed=5)
    its = [DistributedBatchIterator(ids_dataset(100), micro, accum, r, world, seed=5) for r in range(world)]
    for step in range(6):  # step 4 crosses the epoch boundary at sample 100
        want = ref.next_step()[0][:, 0].tolist()
        micro_batches = [mb for it in its for mb in step_samples(it)]
        if step < 4:  # within an epoch every sample is distinct, so ranks and micro-steps are disjoint
            assert len(set(sum(micro_batches, []))) == 24
        assert all(len(mb) == micro for mb in micro_batches) and len(micro_batches) == world * accum
        assert sorted(sum(micro_batches, [])) == sorted(want)
        assert sum(micro_batches, []) == want  # rank r, micro m: a fixed contiguous slice, in order
        # the mean of equal-sized micro-batch means is the mean over the global batch
        assert np.isclose(np.mean([np.mean(mb) for mb in micro_batches]), np.mean(want))


def test_resume_from_consumed_samples_matches_uninterrupted_run():
    full = DistributedBatchIterator(ids_dataset(50), 2, 2, 1, 2, seed=7)
    steps = [step_samples(full) for _ in range(8)]
    part = DistributedBatchIterator(ids_dataset(50), 2, 2, 1, 2, seed=7)
    for _ in range(3):
        part.next_step()
    state = part.state_dict()
    assert state["consumed_samples"] == 24
    resumed = DistributedBatchIterator(ids_dataset(50), 2, 2, 1, 2, seed=7, consumed_samples=state["consumed_samples"])
    assert [step_samples(resumed) for _ in range(5)] == steps[3:]
    loaded = DistributedBatchIterator(ids_dataset(50), 2, 2, 1, 2, seed=7)
    loaded.load_state_dict(json.loads(json.dumps(state)))
    assert [step_samples(loaded) for _ in range(5)] == steps[3:]
    # Same global batch on one rank with more accumulation: rank 1's share is the second half.
    single = DistributedBatchIterator(ids_dataset(50), 2, 4, 0, 1, seed=7, consumed_samples=24)
    assert sum(step_samples(single), [])[4:] == sum(steps[3], [])


def test_epochs_wrap_with_fresh_permutations():
    it = DistributedBatchIterator(ids_dataset(10), 4, 1, 0, 1, seed=1)
    seq = sum((sum(step_samples(it), []) for _ in range(5)), [])  # 20 samples, step 3 straddles epochs
    assert sorted(seq[:10]) == list(range(10)) and sorted(seq[10:]) == list(range(10))
    assert seq[:10] != seq[10:]
    assert it.state_dict()["epoch"] == 2
    other = DistributedBatchIterator(ids_dataset(10), 4, 1, 0, 1, seed=2)
    assert sum((sum(step_samples(other), []) for _ in range(3)), [])[:10] != seq[:10]


def test_iterator_rejects_dataset_smaller_than_one_global_batch():
    with pytest.raises(DataError) as e:
        DistributedBatchIterator(ids_dataset(23), 2, 3, 0, 4, seed=0)
    one_line_error(e, "fewer than one global batch of 24", "prepare more data")


# ---------------------------------------------------------------- validation batches


def test_validation_batches_fixed_disjoint_and_capped():
    per_rank = [validation_batches(ids_dataset(50), 4, 100, r, 3) for r in range(3)]
    assert [len(b) for b in per_rank] == [4, 4, 4]  # 50 // (4 * 3) full batches per rank
    flat = [b[:, 0].tolist() for bs in per_rank for b in bs]
    assert len(set(sum(flat, []))) == 48
    again = validation_batches(ids_dataset(50), 4, 100, 1, 3)
    assert all(torch.equal(a, b) for a, b in zip(again, per_rank[1]))
    assert len(validation_batches(ids_dataset(50), 4, 2, 0, 3)) == 2


def test_validation_batches_small_split():
    small = [validation_batches(ids_dataset(5), 8, 10, r, 2) for r in range(2)]
    assert [[b.shape[0] for b in bs] for bs in small] == [[2], [2]]
    assert not set(small[0][0][:, 0].tolist()) & set(small[1][0][:, 0].tolist())
    with pytest.raises(DataError) as e:
        validation_batches(ids_dataset(1), 8, 10, 0, 2)
    one_line_error(e, "fewer than the 2 ranks", "val_fraction")


def test_prefetched_steps_equal_the_iterator_and_its_state_counts_trained_steps():
    from ds_relora.train.prefetch import StepPrefetcher

    ref = DistributedBatchIterator(ids_dataset(50), 2, 3, 1, 2, seed=7)
    it = DistributedBatchIterator(ids_dataset(50), 2, 3, 1, 2, seed=7)
    prefetch = StepPrefetcher(it)
    try:
        for _ in range(6):  # past an epoch end (50 samples, 12 per step)
            got = prefetch.next_step(torch.device("cpu"))
            assert [torch.equal(a, b) for a, b in zip(got, ref.next_step())] == [True] * 3
            # The next step is being read, but a checkpoint taken now resumes at the next step.
            assert it.state_dict() == ref.state_dict()
        ref.load_state_dict({"consumed_samples": 12})  # a resume moves the iterator: the prefetch follows
        it.load_state_dict({"consumed_samples": 12})
        got = prefetch.next_step("cpu")
        assert all(torch.equal(a, b) for a, b in zip(got, ref.next_step()))
    finally:
        prefetch.close()
