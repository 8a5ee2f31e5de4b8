"""One rank: ``ds-relora``'s galore (DeepSpeed engine, the real trainer) against galore-torch's
``GaLoreAdamW`` on the same model, data and per-step LR. Prints ``RESULT {ours, reference}``."""

import json
import sys

import torch

from ds_relora.config import load_config
from ds_relora.data import DistributedBatchIterator, PackedDataset
from ds_relora.models import build_model
from ds_relora.quiet import quiet_worker
from ds_relora.train.plan import plan_run
from ds_relora.train.trainer import Trainer
from ds_relora.worker import init_distributed

sys.path.insert(0, "tests")
from test_galore_math import load_galore_adamw  # noqa: E402


def reference_losses(cfg, lrs: list[float]) -> list[float]:
    plan = plan_run(cfg, 1)
    model = build_model(plan.hf_config, cfg.train.seed)
    import re

    patterns = [re.compile(t) for t in cfg.relora.target_modules]
    matrices = [m.weight for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and any(p.search(n) for p in patterns)]
    ids = {id(w) for w in matrices}
    plain = [p for p in model.parameters() if id(p) not in ids]
    g = cfg.galore
    opt = load_galore_adamw()(
        [{"params": plain}, {"params": matrices, "rank": g.rank or cfg.relora.rank, "update_proj_gap": g.update_proj_gap,
                             "scale": g.scale, "proj_type": "std"}],
        lr=lrs[0], betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=0.0, no_deprecation_warning=True)
    data = PackedDataset(cfg.data.path, "train", cfg.data.seq_len)
    it = DistributedBatchIterator(data, plan.micro_batch, plan.grad_accum, 0, 1, cfg.train.seed, 0)
    losses = []
    for lr in lrs:
        for group in opt.param_groups:
            group["lr"] = lr
        total = 0.0
        batches = it.next_step()
        for mb in batches:
            loss = model(input_ids=mb, labels=mb).loss / len(batches)
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses


if __name__ == "__main__":
    init_distributed()
    quiet_worker()
    cfg = load_config(sys.argv[1])
    Trainer(cfg).run()
    records = [json.loads(line) for line in open(f"{cfg.train.run_dir}/metrics.jsonl")]
    steps = [r for r in records if r["type"] == "step"]
    ours = [r["loss"] for r in steps]
    ref = reference_losses(cfg, [r["lr"] for r in steps])
    print("RESULT " + json.dumps({"ours": ours, "reference": ref}), flush=True)
    import os

    sys.stdout.flush()
    os._exit(0)
