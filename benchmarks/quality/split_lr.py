"""Full-rank training with one LR for the wrapped linears and another for everything else
(embeddings, head, norms): the diagnostic behind docs/results.md's "why low-rank from scratch
beats full-rank" (issue 24).

GaLore from scratch at LR x trains embeddings, head and norms exactly as full-rank at LR x does
and moves the linears by a rank-r update scaled by 0.25; LoRA from scratch moves them through
B A. If full-rank loses to them because its one LR cannot suit both kinds of parameter, full-rank
with a split LR closes the gap without any low-rank structure.

The loop is the plain-PyTorch loop that tests/test_full_rank_reference.py shows equal, step for
step, to a ``ds-relora train`` full-rank run (HF LLaMA with the package's init, torch AdamW,
linear warm-up then cosine to 0.1 of the peak, grad-norm clip 1.0, the trainer's data order and
validation batches), so ``--lr-linear`` equal to ``--lr`` reproduces the trainer's full-rank run.

    python benchmarks/quality/split_lr.py --lr 8e-3 --lr-linear 2e-3     # cpu85, 100 steps
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from ds_relora.data import read_data_meta  # noqa: E402
from ds_relora.data.dataset import DistributedBatchIterator, PackedDataset, validation_batches  # noqa: E402
from ds_relora.methods.schedule import JaggedCosine  # noqa: E402
from ds_relora.models import WRAPPED_TYPES, build_model, llama_config, preset_shape  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu85")
    ap.add_argument("--data", default="data/bench_stdlib512")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, required=True, help="peak LR of embeddings, head and norms")
    ap.add_argument("--lr-linear", type=float, required=True, help="peak LR of the wrapped linears")
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(1)
    meta = read_data_meta(args.data)
    model = build_model(llama_config(preset_shape(args.preset), int(meta["vocab_size"]), args.seq_len), args.seed)
    model.train()
    linear = [p for n, p in model.named_parameters() if n.split(".")[-2] in WRAPPED_TYPES]
    ids = {id(p) for p in linear}
    rest = [p for p in model.parameters() if id(p) not in ids]
    opt = torch.optim.AdamW([{"params": linear, "lr": args.lr_linear}, {"params": rest, "lr": args.lr}],
                            betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    warmup = max(1, round(0.05 * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, JaggedCosine(args.steps, warmup, 0.1))
    train = DistributedBatchIterator(PackedDataset(args.data, "train", args.seq_len), args.micro, 1, 0, 1, args.seed)
    val = validation_batches(PackedDataset(args.data, "validation", args.seq_len), args.micro, args.eval_batches, 0, 1)

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            loss = sum(model(input_ids=b, labels=b).loss.item() for b in val) / len(val)
        model.train()
        return loss

    started, evals = time.time(), []
    for step in range(1, args.steps + 1):
        (batch,) = train.next_step()
        opt.zero_grad(set_to_none=True)
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % (args.steps // 2) == 0:
            evals.append((step, round(evaluate(), 4)))
            print(f"step {step}: val loss {evals[-1][1]}", flush=True)
    print(json.dumps({"preset": args.preset, "steps": args.steps, "lr": args.lr, "lr_linear": args.lr_linear,
                      "evals": evals, "wall_s": round(time.time() - started)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
