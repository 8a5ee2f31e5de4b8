"""prepare-data: sources, tokenizer, packing, validation split, atomic output, source errors
(the dataset and the batch order over its output: test_dataset.py)."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from ds_relora.config import PrepareConfig
from ds_relora.data import (
    DistributedBatchIterator,
    PackedDataset,
    load_tokenizer,
    prepare_data,
    read_data_meta,
    train_bpe,
)
from ds_relora.data import packing as packing_mod
from ds_relora.data import prepare as prepare_mod
from ds_relora.data.tokenizer import token_dtype
from ds_relora.errors import DataError
from harness.checks import one_line_error

DOCS = [f"def f{i}(x):\n    return x * {i} + {i * i}  # doc {i}\n" for i in range(40)]


def cfg(source, **kw) -> PrepareConfig:
    kw.setdefault("vocab_size", 300)
    kw.setdefault("val_fraction", 0.0)
    return PrepareConfig(source=str(source), **kw)


def quiet(_msg: str) -> None:
    pass


def write_jsonl(path: Path, texts, field="text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def split_tokens(out: Path, split: str) -> np.ndarray:
    meta = read_data_meta(out)
    parts = [np.fromfile(out / s, dtype=np.dtype(meta["dtype"]).newbyteorder("<")) for s in meta["shards"][split]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def decoded_docs(out: Path, split: str) -> list[str]:
    """The split's stream cut at EOS and decoded. Equal to the source documents only if each
    is followed by exactly one EOS (a doubled EOS would decode to an extra empty document)."""
    tok, eos = load_tokenizer(out), read_data_meta(out)["eos_token_id"]
    stream = split_tokens(out, split)
    assert len(stream) == 0 or stream[-1] == eos
    return [tok.decode(part[:-1].tolist()) for part in np.split(stream, np.flatnonzero(stream == eos) + 1)[:-1]]


def touch(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------- sources


def test_jsonl_source_round_trip_and_one_eos_between_documents(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS[:10] + ["   ", "\n"])  # blank rows are skipped
    out = prepare_data(cfg(src), tmp_path / "out", log=quiet)
    meta = read_data_meta(out)
    assert decoded_docs(out, "train") == DOCS[:10]
    assert meta["num_documents"] == {"train": 10, "validation": 0}
    assert meta["num_tokens"]["train"] == len(split_tokens(out, "train"))
    assert meta["eos_token_id"] == load_tokenizer(out).eos_token_id


def test_txt_folder_is_recursive_sorted_and_skips_other_files(tmp_path):
    src = tmp_path / "corpus"
    for name, text in [("b.txt", "second document\nline two\n"), ("a.txt", "first document"), ("sub/c.txt", "third document"),
                       ("README.md", "not data"), (".hidden/x.txt", "hidden, not data")]:
        touch(src / name, text)
    want = ["first document", "second document\nline two\n", "third document"]
    out = prepare_data(cfg(src), src / "prepared", log=quiet)
    assert decoded_docs(out, "train") == want
    # A rerun into the same folder inside the corpus must not read its own tokenizer JSON as data.
    assert decoded_docs(prepare_data(cfg(src), src / "prepared", log=quiet, overwrite=True), "train") == want


def test_parquet_source_with_custom_text_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": DOCS[:6], "n": list(range(6))}), tmp_path / "d.parquet")
    out = prepare_data(cfg(tmp_path / "d.parquet", text_field="content"), tmp_path / "out", log=quiet)
    assert decoded_docs(out, "train") == DOCS[:6]


def test_local_json_and_hub_source_share_the_datasets_streaming_path(tmp_path, monkeypatch):
    import datasets

    calls = []
    real = datasets.load_dataset
    local = write_jsonl(tmp_path / "rows.jsonl", DOCS[:5])
    (tmp_path / "arr.json").write_text(json.dumps([{"text": t} for t in DOCS[5:8]]))

    def spy(path, name=None, **kw):
        calls.append((path, name, kw))
        if path == "someorg/corpus":  # stand-in for the hub: same call shape, local rows
            return real("json", data_files=[str(local)], split="train", streaming=True)
        return real(path, name, **kw)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    out = prepare_data(cfg(tmp_path / "*.json*"), tmp_path / "out1", log=quiet)
    assert decoded_docs(out, "train") == DOCS[5:8] + DOCS[:5]  # sorted: arr.json < rows.jsonl
    # .jsonl is read line by line (bounded memory for long lines), .json through the builder.
    assert calls == [("json", None, {"data_files": [str(tmp_path / "arr.json")], "split": "train", "streaming": True})]

    calls.clear()
    out = prepare_data(cfg("hf:someorg/corpus:en", split="valid"), tmp_path / "out2", log=quiet)
    assert calls[0] == ("someorg/corpus", "en", {"split": "valid", "streaming": True})
    assert decoded_docs(out, "train") == DOCS[:5]
    assert read_data_meta(out)["source"] == "hf:someorg/corpus:en"


def test_hub_failure_is_one_line_data_error(tmp_path, monkeypatch):
    import datasets

    def offline(*a, **kw):
        raise ConnectionError("Couldn't reach the Hub\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as e:
        prepare_data(cfg("hf:allenai/c4:en"), tmp_path / "out", log=quiet)
    one_line_error(e, "allenai/c4", "local copy")
    assert not (tmp_path / "out").exists()


def test_stdlib_source_small(tmp_path):
    out = prepare_data(cfg("stdlib", max_documents=4, val_fraction=0.5, seed=3), tmp_path / "out", log=quiet)
    meta = read_data_meta(out)
    assert sum(meta["num_documents"].values()) == 4
    assert meta["num_documents"]["validation"] >= 1 and meta["num_documents"]["train"] >= 1
    root = Path(sysconfig.get_paths()["stdlib"])
    first = min(p for p in root.glob("*.py") if p.read_text(encoding="utf-8").strip())
    docs = decoded_docs(out, "train") + decoded_docs(out, "validation")
    assert first.read_text(encoding="utf-8") in docs


def test_max_documents_and_exact_max_tokens(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    meta = read_data_meta(prepare_data(cfg(src, max_documents=7), tmp_path / "o1", log=quiet))
    assert meta["num_documents"]["train"] == 7
    meta = read_data_meta(prepare_data(cfg(src, max_tokens=123, val_fraction=0.2), tmp_path / "o2", log=quiet))
    assert sum(meta["num_tokens"].values()) == 123


def test_bpe_sample_prefix_then_the_rest_of_the_same_stream(tmp_path, monkeypatch):
    # The BPE sees only a prefix; packing must replay it and continue with the unread documents.
    monkeypatch.setattr(prepare_mod, "BPE_SAMPLE_CHARS", 100)
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    out = prepare_data(cfg(src), tmp_path / "out", log=quiet)
    assert decoded_docs(out, "train") == DOCS
    assert not (out / "_bpe_sample.bin").exists()


# ---------------------------------------------------------------- tokenizer


def test_bpe_training_has_eos_and_survives_save_load(tmp_path):
    tok = train_bpe(DOCS, 300)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id is not None
    assert tok("<|endoftext|>", add_special_tokens=False)["input_ids"] == [tok.eos_token_id]
    assert 257 < len(tok) <= 300
    tok.save_pretrained(str(tmp_path / "t"))
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(tmp_path / "t"))
    assert again.eos_token_id == tok.eos_token_id
    assert again.decode(again(DOCS[3], add_special_tokens=False)["input_ids"]) == DOCS[3]


def _word_tokenizer(folder: Path, size: int, eos: bool) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(size - 1)}
    vocab["<unk>"] = size - 1
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    kw = {"eos_token": "<unk>"} if eos else {}
    PreTrainedTokenizerFast(tokenizer_object=backend, **kw).save_pretrained(str(folder))
    return folder


def test_dtype_uint16_vs_uint32_with_a_pretrained_tokenizer(tmp_path):
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32
    tok_dir = _word_tokenizer(tmp_path / "tok", 70_000, eos=True)
    src = write_jsonl(tmp_path / "a.jsonl", ["w1 w69998 w65536", "w2 w3"])
    out = prepare_data(cfg(src, tokenizer=str(tok_dir)), tmp_path / "out", log=quiet)
    meta = read_data_meta(out)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000
    assert split_tokens(out, "train").tolist() == [1, 69998, 65536, 69999, 2, 3, 69999]
    assert (out / meta["shards"]["train"][0]).stat().st_size == 7 * 4
    small = read_data_meta(prepare_data(cfg(src), tmp_path / "out16", log=quiet))
    assert small["dtype"] == "uint16"


def test_tokenizer_without_eos_is_rejected(tmp_path):
    tok_dir = _word_tokenizer(tmp_path / "tok", 50, eos=False)
    src = write_jsonl(tmp_path / "a.jsonl", ["w1 w2"])
    with pytest.raises(DataError) as e:
        prepare_data(cfg(src, tokenizer=str(tok_dir)), tmp_path / "out", log=quiet)
    one_line_error(e, "no EOS", "prepare.tokenizer")


# ---------------------------------------------------------------- split


def test_validation_split_is_disjoint_deterministic_and_seeded(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    a = prepare_data(cfg(src, val_fraction=0.3, seed=1), tmp_path / "a", log=quiet)
    b = prepare_data(cfg(src, val_fraction=0.3, seed=1), tmp_path / "b", log=quiet)
    c = prepare_data(cfg(src, val_fraction=0.3, seed=2), tmp_path / "c", log=quiet)
    train, val = decoded_docs(a, "train"), decoded_docs(a, "validation")
    assert not set(train) & set(val) and sorted(train + val) == sorted(DOCS)
    assert 0 < len(val) < len(DOCS)
    expected = [d for i, d in enumerate(DOCS) if packing_mod.is_validation(1, i, 0.3)]
    assert val == expected  # per-document hash, not a count-dependent cut
    for split in ("train", "validation"):
        assert split_tokens(a, split).tobytes() == split_tokens(b, split).tobytes()
    assert decoded_docs(c, "validation") != val


def test_tiny_corpus_still_gets_one_validation_document(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS[:2])
    meta = read_data_meta(prepare_data(cfg(src, val_fraction=0.001), tmp_path / "o", log=quiet))
    assert meta["num_documents"] == {"train": 1, "validation": 1}
    one = write_jsonl(tmp_path / "b.jsonl", DOCS[:1])
    meta = read_data_meta(prepare_data(cfg(one, val_fraction=0.9), tmp_path / "o1", log=quiet))
    assert meta["num_documents"] == {"train": 1, "validation": 0}


# ---------------------------------------------------------------- atomic output


def test_leftover_temp_folder_is_ignored_and_meta_written_last(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS[:8])
    out = tmp_path / "out"
    stale = tmp_path / ".out.tmp-999-deadbeef"
    stale.mkdir()
    (stale / "train_00000.bin").write_bytes(b"\x01\x00" * 10)
    (stale / "meta.json").write_text(json.dumps({"format_version": 1, "shards": {"train": ["train_00000.bin"]}}))
    with pytest.raises(DataError) as e:
        read_data_meta(out)
    one_line_error(e, "prepare-data")

    seen = {}
    real_swap = prepare_mod._swap_into_place

    def swap(tmp, dest):  # the state of the build folder the instant before it becomes visible
        seen["files"] = sorted(p.name for p in tmp.iterdir())
        seen["meta_newest"] = (tmp / "meta.json").stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in tmp.iterdir())
        real_swap(tmp, dest)

    monkeypatch.setattr(prepare_mod, "_swap_into_place", swap)
    logs = []
    prepare_data(cfg(src), out, log=logs.append)
    assert seen["files"] == ["meta.json", "tokenizer", "train_00000.bin"] and seen["meta_newest"]
    assert any(str(stale) in m for m in logs)
    assert decoded_docs(out, "train") == DOCS[:8]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".out.tmp-999-deadbeef", "a.jsonl", "out"])


def test_failed_run_leaves_nothing_and_rerun_replaces_previous_output(tmp_path, monkeypatch):
    # An error removes the partial folder (the same command would fail again); an interruption
    # keeps it for a resume: tests/test_prepare_parallel.py.
    src = write_jsonl(tmp_path / "a.jsonl", DOCS[:8])
    out = prepare_data(cfg(src), tmp_path / "out", log=quiet)

    def boom(*a, **kw):
        raise RuntimeError("tokenizer crashed")

    monkeypatch.setattr(packing_mod, "encode_batch", boom)
    with pytest.raises(RuntimeError):
        prepare_data(cfg(src), out, log=quiet, overwrite=True)
    assert decoded_docs(out, "train") == DOCS[:8]  # previous output untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "out"]
    monkeypatch.undo()

    src2 = write_jsonl(tmp_path / "b.jsonl", DOCS[10:13])
    prepare_data(cfg(src2), out, log=quiet, overwrite=True)
    assert decoded_docs(out, "train") == DOCS[10:13]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "out"]


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS[:3])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(DataError) as e:
        prepare_data(cfg(src), tmp_path / "mine", log=quiet)
    one_line_error(e, "not empty", "another folder")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    assert read_data_meta(prepare_data(cfg(src), tmp_path / "empty", log=quiet))["num_documents"]["train"] == 3


# ---------------------------------------------------------------- source errors


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda d: d / "missing.jsonl", ["does not exist", "prepare.source"]),
        (lambda d: touch(d / "t.csv", "a,b"), ["unknown extension", ".csv"]),
        (lambda d: write_jsonl(d / "blank.jsonl", ["", "  "]), ["no documents found"]),
        (lambda d: touch(d / "e" / "notes.md", "x").parent, ["no documents found"]),
        (lambda d: str(d / "nothing*.jsonl"), ["matches no files"]),
        (lambda d: write_jsonl(d / "f.jsonl", ["x"], field="body"), ["no field 'text'", "body", "prepare.text_field"]),
    ],
    ids=["missing", "extension", "blank", "empty-folder", "glob", "field"],
)
def test_source_errors(tmp_path, make, words):
    src = make(tmp_path)
    with pytest.raises(DataError) as e:
        prepare_data(cfg(src), tmp_path / "out", log=quiet)
    one_line_error(e, *words)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


# ---------------------------------------------------------------- the output read back


def test_packed_dataset_over_real_prepare_output(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    out = prepare_data(cfg(src, shard_tokens=100), tmp_path / "out", log=quiet)
    meta = read_data_meta(out)
    assert len(meta["shards"]["train"]) == -(-meta["num_tokens"]["train"] // 100)
    ds = PackedDataset(out, "train", 32)
    assert len(ds) == sum((out / name).stat().st_size // 2 // 32 for name in meta["shards"]["train"])
    stream = split_tokens(out, "train")
    assert ds[0].tolist() == stream[:32].tolist() and ds[3].tolist() == stream[100:132].tolist()
    batches = DistributedBatchIterator(ds, 2, 3, 0, 1, seed=0).next_step()
    assert len(batches) == 3 and all(b.shape == (2, 32) and b.dtype == torch.long for b in batches)
