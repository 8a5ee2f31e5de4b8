"""prepare-data throughput with 1 and more tokenizing processes, and whether the outputs match.

The same corpus is prepared once per ``--workers`` entry (``prepare.num_workers``), each into
its own folder. Per run it reports the wall time, the tokenizer time (BPE training or loading:
always one process) and the tokenizing+packing rate in tokens/s; then whether every file of
every output equals the first output byte for byte (the contract of ``num_workers``).

    python benchmarks/prepare/run.py --set prepare.max_documents=2000          # stdlib, 1 and 2 processes
    python benchmarks/prepare/run.py --workers 1,4,8,16 --set prepare.source=/data/c4/en \\
        --set prepare.max_tokens=2000000000 --set prepare.tokenizer=/data/tok   # a node's scaling row

On a shared machine the figures move with the load: read them with the printed load average.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.common import load_average, machine_info, md_table  # noqa: E402


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def first_difference(a: Path, b: Path) -> str | None:
    """None when the folders hold the same files with the same bytes, else the first file that differs."""
    fa, fb = folder_bytes(a), folder_bytes(b)
    if sorted(fa) != sorted(fb):
        return f"file lists differ: {sorted(set(fa) ^ set(fb))[:3]}"
    return next((name for name in fa if fa[name] != fb[name]), None)


def run_once(prepare_cfg, workers: int, out: Path) -> dict:
    from ds_relora.data import prepare_data

    prepare_cfg.num_workers = workers
    stats: dict = {}
    started = time.perf_counter()
    prepare_data(prepare_cfg, out, log=lambda m: print(f"  {m}", flush=True), overwrite=True, stats=stats)
    wall = time.perf_counter() - started
    return {"workers": workers, "wall_s": wall, "tokenizer_s": stats["tokenizer_seconds"], "pack_s": stats["pack_seconds"],
            "tokens": sum(stats["num_tokens"].values()), "tokens_per_s": stats["packed_tokens"] / stats["pack_seconds"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="run config YAML whose prepare: section is used (default: the defaults)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. prepare.max_documents=2000")
    ap.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2],
                    help="prepare.num_workers values to run, comma-separated; the first is the reference output")
    ap.add_argument("--out", help="folder for the outputs (default: a temporary folder, removed at the end)")
    args = ap.parse_args()

    from ds_relora.config import load_config

    cfg = load_config(args.config, args.set).prepare
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ds_relora_bench_prepare_"))
    print(f"machine: {machine_info()}; load {load_average()}", flush=True)
    # Unset, the one-process run's Rust tokenizer may use several threads; each worker uses one.
    print(f"source {cfg.source!r}, max_documents {cfg.max_documents}, max_tokens {cfg.max_tokens}; "
          f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', '(unset)')}", flush=True)
    rows, outs = [], []
    try:
        for workers in args.workers:
            print(f"[num_workers={workers}] load {load_average()}", flush=True)
            out = root / f"workers_{workers}"
            rows.append(run_once(cfg, workers, out))
            outs.append(out)
        base = rows[0]["tokens_per_s"]
        table = [[r["workers"], r["tokens"], round(r["wall_s"], 2), round(r["tokenizer_s"], 2), round(r["pack_s"], 2),
                  round(r["tokens_per_s"]), f"{r['tokens_per_s'] / base:.2f}x",
                  "reference" if i == 0 else ("yes" if (d := first_difference(outs[0], out)) is None else f"NO ({d})")]
                 for i, (r, out) in enumerate(zip(rows, outs))]
        print()
        print(md_table(["num_workers", "tokens", "wall s", "tokenizer s", "tokenize+pack s", "tokens/s", "speed-up",
                        "identical to first"], table))
        print(f"\nload at end {load_average()}; machine: {machine_info()}")
        identical = all(row[-1] in ("reference", "yes") for row in table)
        print(f"outputs identical: {'yes' if identical else 'NO'}")
        return 0 if identical else 1
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
