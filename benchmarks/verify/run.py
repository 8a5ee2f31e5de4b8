"""Verify cost of format-4 checkpoints: seconds per GB to hash whole files (xxh3-128), measured on a
shard of the 1.3B preset's layer shapes (hidden 2048, MLP 5461: one layer's fp32 weights ~ 200 MB)
written through the save's own StreamingWriter. Also prints the write overhead of hashing.

    python benchmarks/verify/run.py [--gb 1.0] [--dir /path/on/the/checkpoint/disk]

The file is read once before timing (page cache warm, as right after a save or a first read);
a cold read is bounded by the disk instead.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ds_relora.checkpoint.format import whole_file_hash
from ds_relora.tensor_files import StreamingWriter

ap = argparse.ArgumentParser()
ap.add_argument("--gb", type=float, default=1.0)
ap.add_argument("--dir", default=None)
args = ap.parse_args()
hidden, mlp = 2048, 5461
layer = [("q", (hidden, hidden)), ("k", (hidden, hidden)), ("v", (hidden, hidden)), ("o", (hidden, hidden)),
         ("gate", (mlp, hidden)), ("up", (mlp, hidden)), ("down", (hidden, mlp))]
per_layer = sum(a * b for _, (a, b) in layer) * 4
layers = max(1, round(args.gb * 1e9 / per_layer))
entries = [(f"l{i}.{n}", torch.float32, s) for i in range(layers) for n, s in layer]
with tempfile.TemporaryDirectory(dir=args.dir) as d:
    path = Path(d) / "model-00001-of-00001.safetensors"
    tensors = {s: torch.randn(s) for _, s in layer}
    t = time.perf_counter()
    digests = {}
    w = StreamingWriter(path, entries, digests=digests)
    for name, _, shape in entries:
        w.write(name, tensors[shape])
    w.close()
    write_s = time.perf_counter() - t
    size = path.stat().st_size
    whole_file_hash(path)  # warm the page cache
    t = time.perf_counter()
    digest = whole_file_hash(path)
    verify_s = time.perf_counter() - t
    assert digest == digests[path.name]["xxh3_128"]
    gb = size / 1e9
    print(f"file {gb:.2f} GB ({layers} layers of the 1.3B shape): write+hash {write_s / gb:.2f} s/GB, "
          f"verify {verify_s / gb:.3f} s/GB ({gb / verify_s:.2f} GB/s)")
