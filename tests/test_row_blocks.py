"""The embedding and head in row blocks (``model.split_vocab``, ``ds_relora/row_blocks.py``): the
same values as the whole tensors, one block at a time through ZeRO-3's gathers, and checkpoints
that hold the whole tensors under HF's names, loadable with and without blocks."""

import dataclasses
import shutil

import pytest
import torch

from ds_relora.errors import ConfigError
from ds_relora.models import PRESETS, build_model, largest_linear, largest_param, llama_config, vocab_block
from ds_relora.row_blocks import BlockedEmbedding, BlockedLinear, BlockReader, block_rows, whole_names
from ds_relora.tensor_files import StreamingWriter, TensorSet
from harness.checks import read_metrics, within_rel
from harness.configs import tiny_run_config, write_config
from harness.ranks import results, run_workers

SHAPE = dataclasses.replace(PRESETS["tiny"], layers=2)
VOCAB = 512


def test_block_rows_cover_the_rows_and_keep_each_block_within_the_limit():
    for rows, cols, limit in [(32000, 4096, 11008 * 4096), (512, 64, 11008), (7, 3, 5), (10, 10, 1000), (5, 4, 1)]:
        sizes = block_rows(rows, cols, limit)
        assert sum(sizes) == rows and min(sizes) >= 1
        assert max(sizes) * cols <= max(limit, cols)  # one row is the least a block holds
        assert len(sizes) == 1 or max(sizes) - min(sizes) <= len(sizes)  # about equal
    assert block_rows(32000, 4096, vocab_block(4096)) == [4000] * 8  # 7B: 62.5 MiB blocks
    assert block_rows(32000, 4096, 11008 * 4096) == [10667, 10667, 10666]
    assert largest_param(PRESETS["7b"], 32000, split_vocab=True) == largest_linear(PRESETS["7b"])
    assert largest_param(PRESETS["7b"], 32000) == 32000 * 4096


def test_estimate_memory_bounds_the_transients_by_a_block():
    from ds_relora.estimate.memory import estimate_memory

    def est(split):
        return estimate_memory("7b", "full", None, 3, 16, 1, 1024, 32000, split_vocab=split)

    whole, split = est(False), est(True)
    assert whole.init_host == 2 * 4 * 32000 * 4096  # DeepSpeed's hook-registration gather + gloo's copy
    assert split.init_host == 2 * 4 * largest_linear(PRESETS["7b"])  # a decoder layer's largest linear now
    assert split.save_host == whole.save_host  # a decoder layer's params, either way
    assert split.total == whole.total  # the same model states


@pytest.mark.parametrize("pad", [None, 64])  # 64: the second block's first row
def test_blocked_model_has_the_whole_models_values_logits_and_head_gradient(pad):
    hf = llama_config(SHAPE, VOCAB, 32)
    hf.pad_token_id = pad
    whole = build_model(hf, seed=3)
    split = build_model(hf, seed=3, vocab_block=vocab_block(SHAPE.hidden))
    assert split.config.vocab_size == VOCAB and split.config.pad_token_id == pad
    assert isinstance(split.model.embed_tokens, BlockedEmbedding) and isinstance(split.lm_head, BlockedLinear)
    blocks = whole_names(split)
    assert sorted({w for w, *_ in blocks.values()}) == ["lm_head.weight", "model.embed_tokens.weight"]
    ours, reference = dict(split.named_parameters()), dict(whole.named_parameters())
    for name, p in ours.items():
        target, start, stop, _ = blocks.get(name, (name, None, None, None))
        expected = reference[target] if start is None else reference[target][start:stop]
        assert torch.equal(p, expected), name  # the init draws the whole tensor, the blocks take their rows
    assert all(p.numel() <= vocab_block(SHAPE.hidden) for n, p in ours.items() if n in blocks)
    ids = torch.randint(0, VOCAB, (3, 32), generator=torch.Generator().manual_seed(0))
    ids[0, :4] = torch.tensor([0, VOCAB - 1, 63, 64])  # the first and last rows and a block edge
    a, b = whole(input_ids=ids, labels=ids), split(input_ids=ids, labels=ids)
    assert torch.equal(a.logits, b.logits)  # each logit is the same dot product
    a.loss.backward()
    b.loss.backward()
    count = len(split.lm_head.blocks)
    assert count == 8  # 512 rows of 64 in blocks of at most 64 x 64
    head = torch.cat([ours[f"lm_head.blocks.{i}.weight"].grad for i in range(count)])
    assert torch.equal(head, reference["lm_head.weight"].grad)
    # The embedding's gradient comes through the head's input gradient, which sums the blocks'
    # products (another order than one matmul): the same up to fp32 rounding.
    embed = torch.cat([ours[f"model.embed_tokens.blocks.{i}.weight"].grad for i in range(count)])
    torch.testing.assert_close(embed, reference["model.embed_tokens.weight"].grad, rtol=1e-5, atol=1e-7)


def test_tied_models_are_left_whole_and_a_tied_run_is_refused_with_one_line():
    from ds_relora.config import RunConfig
    from ds_relora.train.plan import split_vocab_block

    tied = llama_config(SHAPE, VOCAB, 32)
    tied.tie_word_embeddings = True
    assert whole_names(build_model(tied, seed=0, vocab_block=vocab_block(SHAPE.hidden))) == {}
    cfg = RunConfig()
    cfg.model.split_vocab = True
    with pytest.raises(ConfigError, match="split_vocab needs an untied"):
        split_vocab_block(cfg, tied)
    assert split_vocab_block(cfg, llama_config(SHAPE, VOCAB, 32)) == vocab_block(SHAPE.hidden)


def test_a_tensor_is_written_in_row_pieces_and_read_back_through_the_blocks(tmp_path):
    value = torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3)
    writer = StreamingWriter(tmp_path / "m-00001-of-00001.safetensors", [("w", torch.float32, (7, 3)), ("b", torch.float32, (2,))])
    with pytest.raises(RuntimeError, match="declared"):
        writer.write("w", value[:8, :2])  # not a row piece of it
    for piece in (value[:3], value[3:5], value[5:]):
        writer.write("w", piece)
    with pytest.raises(RuntimeError, match="declared"):
        writer.write("b", torch.zeros(3))  # more rows than declared
    writer.write("b", torch.ones(2))
    writer.close()
    from ds_relora.tensor_files import write_index

    write_index(tmp_path, "m", {"w": "m-00001-of-00001.safetensors", "b": "m-00001-of-00001.safetensors"}, 92)
    stored = TensorSet(tmp_path, "m")
    assert torch.equal(stored["w"], value)
    blocks = {"blocks.0.weight": ("w", 0, 4, 7), "blocks.1.weight": ("w", 4, 7, 7)}
    for tensors in (stored, {"w": value, "w.exp_avg": value * 2, "b": torch.ones(2)}):
        view = BlockReader(tensors, blocks)
        assert view.shape("blocks.1.weight") == (3, 3) and "blocks.0.weight" in view and "b" in view
        assert torch.equal(view["blocks.1.weight"], value[4:])
        assert torch.equal(view["b"], torch.ones(2))
    assert torch.equal(BlockReader(stored, blocks).get_flat("blocks.1.weight", 2, 100), value[4:].reshape(-1)[2:])
    assert torch.equal(BlockReader({"w.exp_avg": value * 2}, blocks)["blocks.0.weight.exp_avg"], value[:4] * 2)


@pytest.mark.distributed
def test_zero3_gathers_one_block_at_a_time_and_saves_and_loads_whole_tensors(tmp_path):
    outs = results(run_workers(["tests/workers/row_blocks_worker.py", str(tmp_path / "ckpt")], 2, timeout=300))
    assert len(outs) == 2
    r = outs[0]
    assert r["split"]["blocks"] == 16
    # Unsplit, ZeRO-3 gathers the embedding and the head whole (build, initialisation, every
    # forward and backward); in blocks nothing larger than a decoder layer's largest linear
    # moves (+ ZeRO-3's padding to the world size).
    assert r["unsplit"]["largest_collective_bytes"] >= 4 * r["vocab_param"]
    assert r["split"]["largest_collective_bytes"] <= 4 * (r["largest_linear"] + 2)
    for a, b in zip(r["unsplit"]["losses"], r["split"]["losses"]):
        assert within_rel(b, a, 1e-5, "blocked head")
    assert r["saved"]["checked"] > 30 and r["saved"]["differ"] == []
    assert r["saved"]["block_names_saved"] == []  # HF's names: the sets hold the whole tensors
    assert r["load_differ"] == {"split": [], "unsplit": []}


def _cfg(data, run_dir, stage, **train):
    return tiny_run_config(data, run_dir, stage, model={"preset": "tiny", "split_vocab": True},
                           train={"total_steps": 12, "save_every": 6, "global_batch_size": 8, **train},
                           relora={"warm_start_steps": 4, "reset_every": 4})


@pytest.mark.distributed
def test_split_vocab_run_resumes_on_another_stage_and_world_size_and_exports_hf(prepared_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from ds_relora.checkpoint.export import export_model

    whole = write_config(tmp_path / "whole.yaml", _cfg(prepared_data, tmp_path / "whole", 3))
    run_workers(["tests/workers/run_configs.py", str(whole)], 2, timeout=600)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step-12")  # resumes from step 6 (the metrics are cut back to it)
    resumed = write_config(tmp_path / "resumed.yaml", _cfg(prepared_data, resumed_dir, 0, resume="auto"))
    run_workers(["tests/workers/run_configs.py", str(resumed)], 1, timeout=600)
    a, _ = read_metrics(tmp_path / "whole")
    b, _ = read_metrics(resumed_dir)
    assert sorted(b) == list(range(1, 13))
    for step in range(7, 13):  # as tests/test_checkpoint_elastic.py: another split of the batch, fp32
        assert within_rel(b[step], a[step], 2e-5, "split_vocab elastic resume"), step
    step12 = tmp_path / "whole" / "checkpoints" / "step-12"
    names = TensorSet(step12, "model").keys()
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    assert not [n for n in names if ".blocks." in n]
    out = export_model(step12, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.lm_head.weight.shape[0] == model.config.vocab_size
