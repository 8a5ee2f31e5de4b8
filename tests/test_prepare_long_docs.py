"""prepare-data on very long documents: bounded memory, and the same tokens as one tokenizer call."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from ds_relora.data import tokenize_pool
from ds_relora.config import PrepareConfig
from ds_relora.data import load_tokenizer, prepare_data, read_data_meta

REPO = Path(__file__).resolve().parents[1]
WORDS = [f"w{i:x}" + "abcdefgh"[: i % 8] for i in range(400)]


def text_of(n_chars: int, seed: int) -> str:
    """Words, single and double spaces, newlines, punctuation: every kind of pre-token boundary."""
    rng = np.random.default_rng(seed)
    seps = np.array([" ", " ", " ", "  ", "\n", ", ", ". ", " 's "])
    n = n_chars // 4
    words = np.array(WORDS)[rng.integers(0, len(WORDS), n)]
    glue = seps[rng.integers(0, len(seps), n)]
    return "".join(np.char.add(words, glue).tolist())[:n_chars]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return path


def train_bytes(out: Path) -> bytes:
    return b"".join((out / s).read_bytes() for s in read_data_meta(out)["shards"]["train"])


def one_call_stream(out: Path, texts: list[str]) -> bytes:
    """The packed stream as prepare-data wrote it before long documents were split: each
    document in one tokenizer call, then EOS (val_fraction 0: all in train, in order)."""
    tok = load_tokenizer(out)
    ids: list[int] = []
    for t in texts:
        ids += tok.backend_tokenizer.encode(t, add_special_tokens=False).ids + [tok.eos_token_id]
    return np.asarray(ids, dtype=np.dtype(read_data_meta(out)["dtype"]).newbyteorder("<")).tobytes()


def test_pieces_cover_the_text_and_cut_only_before_a_lone_space():
    text = text_of(50_000, seed=1)
    parts = list(tokenize_pool.pieces(text, 512))
    assert "".join(parts) == text and max(map(len, parts)) <= 512 and len(parts) > 90
    for p in parts[1:]:
        assert p[0] == " " and not p[1].isspace()
    blob = "x" * 2000  # no space to cut at: cut hard, still complete
    assert "".join(tokenize_pool.pieces(blob, 512)) == blob


def test_split_documents_give_the_tokens_and_the_tokenizer_of_whole_ones(tmp_path, monkeypatch):
    texts = [text_of(3000 + 997 * i, seed=i) for i in range(6)]
    src = write_jsonl(tmp_path / "a.jsonl", texts)
    base = dict(source=str(src), vocab_size=400, val_fraction=0.0)
    whole = prepare_data(PrepareConfig(**base), tmp_path / "whole", log=lambda m: None)
    # Normal documents: the bytes of one tokenizer call per document, as before.
    assert train_bytes(whole) == one_call_stream(whole, texts)

    # Limits far below the real ones: every document is now long and cut into many pieces,
    # for the BPE's training sample and for packing; neither may notice.
    monkeypatch.setattr(tokenize_pool, "LONG_DOC_CHARS", 2000)
    monkeypatch.setattr(tokenize_pool, "PIECE_CHARS", 256)
    split = prepare_data(PrepareConfig(**base), tmp_path / "split", log=lambda m: None)
    tok_json = "tokenizer/tokenizer.json"
    assert (split / tok_json).read_bytes() == (whole / tok_json).read_bytes()
    assert train_bytes(split) == train_bytes(whole)

    # The worker processes' encode (prepare.num_workers > 1) goes through the same splitting.
    tok = load_tokenizer(whole)
    dtype = np.dtype(read_data_meta(whole)["dtype"])
    for name in ("_encode", "_eos", "_dtype"):  # restored after the test
        monkeypatch.setattr(tokenize_pool, name, getattr(tokenize_pool, name))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    sigint = signal.getsignal(signal.SIGINT)
    try:
        tokenize_pool._init_worker(tokenize_pool.tokenizer_payload(tok), tok.eos_token_id, dtype.str, os.getppid())
    finally:
        signal.signal(signal.SIGINT, sigint)
    flat, lengths = tokenize_pool._encode_chunk(texts)
    assert flat.astype(dtype.newbyteorder("<")).tobytes() == train_bytes(whole) and len(lengths) == len(texts)


_PREPARE = textwrap.dedent("""
    import sys
    from ds_relora.config import PrepareConfig
    from ds_relora.data import prepare_data
    prepare_data(PrepareConfig(source=sys.argv[1], tokenizer=sys.argv[2], val_fraction=0.0), sys.argv[3], log=lambda m: None)
    # VmHWM, not ru_maxrss: Linux carries the forking process's peak across exec into ru_maxrss.
    print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")))
""")


def _peak_rss(src: Path, tokenizer: Path, out: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", _PREPARE, str(src), str(tokenizer), str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split()[-1])


def test_a_20mb_single_line_document_needs_less_than_4x_its_bytes(tmp_path):
    # A small trained BPE (no training inside the measured runs: that is the same path, piecewise).
    normal = [text_of(4000, seed=i) for i in range(50)]
    tok_src = prepare_data(PrepareConfig(source=str(write_jsonl(tmp_path / "n.jsonl", normal)), vocab_size=400,
                                         val_fraction=0.0), tmp_path / "tok", log=lambda m: None)
    tokenizer = tok_src / "tokenizer"
    line = json.dumps({"text": text_of(200_000, seed=99) * 100}) + "\n"  # repeated: quick to make and encode
    big = tmp_path / "big.jsonl"
    with open(big, "w") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in normal[:25]))
        f.write(line)
        f.write("".join(json.dumps({"text": t}) + "\n" for t in normal[25:]))
    baseline = _peak_rss(tmp_path / "n.jsonl", tokenizer, tmp_path / "o1")
    peak = _peak_rss(big, tokenizer, tmp_path / "o2")
    extra = peak - baseline
    print(f"peak RSS {peak / 2**20:.0f} MiB, baseline {baseline / 2**20:.0f} MiB: {extra / len(line):.2f} bytes per input byte")
    assert extra < 4 * len(line), f"{extra / 2**20:.0f} MiB over the baseline for a {len(line) / 2**20:.0f} MiB line"
    assert read_data_meta(tmp_path / "o2")["num_documents"]["train"] == 51
