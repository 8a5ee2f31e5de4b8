"""Where a preset's parameters sit at a given vocabulary: the wrapped linears (what LoRA, ReLoRA,
GaLore and the projection optimizers adapt or project) against embeddings, head and norms
(trained at full rank by every method). Issue 24: at 9m with a 2048-token vocabulary the linears
hold 60% of the params and embeddings + head dominate what the adapter methods train, so their
comparison with full-rank says little about the methods; the cpu85 preset at 512 tokens is the
shape where the linears hold >= 85%.

    python benchmarks/quality/shape.py --preset cpu85 --data data/bench_stdlib512
    python benchmarks/quality/shape.py --preset 9m --vocab 2048 --rank 16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.common import md_table  # noqa: E402
from ds_relora.models import param_counts, preset_shape  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu85")
    ap.add_argument("--data", help="prepared data folder: its meta.json gives the vocabulary")
    ap.add_argument("--vocab", type=int, help="vocabulary size (instead of --data)")
    ap.add_argument("--rank", type=int, default=16, help="adapter rank for the adapter-param column")
    args = ap.parse_args()
    if (args.data is None) == (args.vocab is None):
        ap.error("give exactly one of --data (a prepared folder) or --vocab (a vocabulary size)")
    vocab = args.vocab or int(json.loads((Path(args.data) / "meta.json").read_text())["vocab_size"])
    shape = preset_shape(args.preset)
    c = param_counts(shape, vocab, args.rank)
    share = c["linear"] / c["total"]
    print(md_table(["preset", "hidden x layers", "vocab", "wrapped linears", "embeddings, head, norms", "total",
                    "linears' share", f"rank-{args.rank} adapters"],
                   [[args.preset, f"{shape.hidden} x {shape.layers}", vocab, c["linear"], c["other"], c["total"],
                     f"{100 * share:.1f}%", c["adapters"]]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
