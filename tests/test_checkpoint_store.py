"""A checkpoint holds one copy of the state (no DeepSpeed files; within 5% of the tensors' own
bytes), every rank writes at the same time, and pruning old checkpoints holds no rank in a
collective (tests/workers/checkpoint_save_worker.py)."""

import re

import pytest
import torch

from harness.ranks import results, run_workers

WORKER = "tests/workers/checkpoint_save_worker.py"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saves") / "checkpoints"
    (record,) = results(run_workers([WORKER, str(root)], 2, timeout=300))
    return record


@pytest.mark.distributed
def test_a_checkpoint_is_one_copy_of_the_state(saved):
    files = saved["files"]
    assert not [f for f in files if re.search(r"zero_pp_rank|mp_rank|optim_states|model_states|latest", f)], files
    assert {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "optimizer-00001-of-00002.safetensors",
            "optimizer-00002-of-00002.safetensors", "rng_rank0.pt", "rng_rank1.pt", "meta.json"} <= set(files)
    # fp32 params + Adam moments of the trainable ones (4 N + 8 T), plus the RNG and meta files.
    minimum = saved["expected"] + sum(size for f, size in files.items() if f.startswith("rng_rank") or f == "meta.json")
    assert sum(files.values()) <= 1.05 * minimum, (sum(files.values()), minimum)


@pytest.mark.distributed
def test_pruning_keeps_the_newest_and_holds_no_rank_in_a_collective(saved):
    # Every delete of a pruned folder ran off the main thread and was still held while both ranks
    # left the save and met in the next barrier.
    assert saved["held"] and all(h == {"released": True, "main_thread": False} for h in saved["held"]), saved["held"]
    assert "step-1" not in saved["listing_while_held"], "pruned folders leave the step-N names at once"
    assert saved["listing"] == ["step-2", "step-3"], "keep_last=2: the newest two stay, the delete finished"


def test_gathers_interleave_the_owners_so_every_rank_writes_at_once():
    from ds_relora.checkpoint.state_io import _visit_order
    from ds_relora.tensor_files import owners_by_bytes

    sizes = [4, 4, 4, 4, 4, 4]
    owners = owners_by_bytes(sizes, 2)
    assert owners == [0, 0, 0, 1, 1, 1]
    assert _visit_order(sizes, owners, 2) == [0, 3, 1, 4, 2, 5]
    # A big first tensor: the other rank's small ones are gathered while its owner writes it.
    sizes = [12, 2, 2, 2, 2, 2, 2]
    owners = owners_by_bytes(sizes, 2)
    assert owners == [0, 1, 1, 1, 1, 1, 1]
    assert _visit_order(sizes, owners, 2) == [0, 1, 2, 3, 4, 5, 6]
    order = _visit_order([3, 1, 1, 1, 3, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1], 2)
    assert sorted(order) == list(range(8))
    assert [i for i in order if i < 4] == [0, 1, 2, 3] and [i for i in order if i >= 4] == [4, 5, 6, 7], "file order kept"


def test_background_writer_failure_removes_its_files_and_reports_the_error(tmp_path):
    from ds_relora.tensor_files import BackgroundWriter, StreamingWriter

    entries = [("a", torch.float32, (3,)), ("b", torch.float32, (2,))]
    writer = BackgroundWriter({"w": StreamingWriter(tmp_path / "x.safetensors", entries)}, depth=1)
    writer.put("w", "b", torch.zeros(2))  # out of the declared order
    writer.put("w", "a", torch.zeros(3))
    error = writer.finish()
    assert isinstance(error, RuntimeError) and "expected a" in str(error)
    assert list(tmp_path.iterdir()) == []

    digests = {}
    writer = BackgroundWriter({"w": StreamingWriter(tmp_path / "y.safetensors", entries, digests=digests)}, depth=1)
    writer.put("w", "a", torch.arange(3.0))
    writer.put("w", "b", torch.ones(2))
    assert writer.finish() is None
    assert [p.name for p in tmp_path.iterdir()] == ["y.safetensors"] and "y.safetensors" in digests


def test_a_flat_range_read_is_1d_also_when_it_is_the_whole_tensor(tmp_path):
    """One ZeRO-3 rank's shard of a parameter is the whole parameter: the restore writes it into
    a flat buffer, so the read must stay flat (it came back 2-D and the 1-rank ZeRO-3 resume of
    the GPU check's rehearsal failed)."""
    from ds_relora.tensor_files import StreamingWriter, TensorSet

    value = torch.arange(12.0).reshape(3, 4)
    writer = StreamingWriter(tmp_path / "w.safetensors", [("m", torch.float32, (3, 4))])
    writer.write("m", value)
    writer.close()
    tensors = TensorSet(tmp_path, "w")
    assert tensors.get_flat("m", 0, 12).shape == (12,) and torch.equal(tensors.get_flat("m", 0, 12), value.reshape(-1))
    assert torch.equal(tensors.get_flat("m", 4, 20), value.reshape(-1)[4:])  # a padded last shard
    assert tensors.get("m").shape == (3, 4)


def test_save_holds_at_most_one_layer_of_tensors():
    # Each gather reserves its bytes first: it waits while what is queued and being written would
    # not fit with it in the budget (one layer), and a tensor larger than the budget goes alone.
    import threading
    import types

    from ds_relora.checkpoint.state_io import save_budget
    from ds_relora.tensor_files import BackgroundWriter

    class HeldWriter:
        def __init__(self):
            self.go, self.names, self.file = threading.Event(), [], types.SimpleNamespace(closed=False)

        def write(self, name, tensor):
            assert self.go.wait(10)
            self.names.append(name)

        def close(self):
            self.file.closed = True

        def abort(self):
            self.file.closed = True

    held = HeldWriter()
    background = BackgroundWriter({"w": held}, depth=4, max_bytes=1000)
    for name in ("a", "b"):
        background.reserve(400)
        background.put("w", name, torch.zeros(100))  # 400 bytes each: 800 pending
    waiting = threading.Thread(target=background.reserve, args=(400,))
    waiting.start()
    waiting.join(0.5)
    assert waiting.is_alive(), "800 + 400 bytes exceed the 1000-byte budget: the gather must wait"
    held.go.set()
    waiting.join(10)
    assert not waiting.is_alive() and background.finish() is None and held.names == ["a", "b"]
    alone = BackgroundWriter({"w": HeldWriter()}, depth=1, max_bytes=10)
    alone.reserve(4000)  # nothing pending: a tensor over the budget is not held back
    assert alone.finish() is None

    f32 = torch.float32
    weights = [("model.embed_tokens.weight", f32, (100, 8)), ("model.layers.0.q.weight", f32, (30, 8)),
               ("model.layers.0.k.weight", f32, (30, 8)), ("model.layers.1.q.weight", f32, (30, 8))]
    assert save_budget(weights, [[] for _ in weights]) == 4 * 100 * 8  # the embedding
    bigger = [(n, d, (150, 8) if ".layers.0." in n else s) for n, d, s in weights]
    assert save_budget(bigger, [[] for _ in bigger]) == 4 * 2 * 150 * 8  # layer 0's params together


@pytest.mark.distributed
def test_zero3_saves_gather_each_tensor_on_its_owner_alone(tmp_path):
    # tests/workers/owner_gather_worker.py on 3 ranks: the point-to-point gather on hand-made
    # layouts, then ZeRO-3 saves whose every tensor equals DeepSpeed's own full getters while no
    # collective that lands on every rank moved a whole parameter (APOLLO: the largest one, the
    # embedding; its small R-shaped state is still summed on every rank).
    outs = results(run_workers(["tests/workers/owner_gather_worker.py", str(tmp_path)], 3, timeout=600))
    assert sorted(r["rank"] for r in outs) == [0, 1, 2]
    for r in outs:
        assert len(r["layouts"]) == 7 and all(c["ok"] for c in r["layouts"]), r["layouts"]
        assert [s["method"] for s in r["saves"]] == ["full", "relora", "apollo"]
        for s in r["saves"]:
            assert s["largest_collective"] < s["smallest_param" if s["method"] != "apollo" else "largest_param"], s
            if r["rank"] == 0:
                assert s["differ"] == [] and s["checked"] > 20, s
    assert next(s for s in outs[0]["saves"] if s["method"] == "relora")["frozen"] > 0
