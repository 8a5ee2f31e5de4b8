"""Each rank: build the same models with and without ZeRO-3 partitioned construction and report
what the rank holds and whether the gathered values equal the unpartitioned build."""

import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist

from ds_relora import models
from ds_relora.models import PRESETS, build_model, llama_config
from ds_relora.methods.lora_layer import wrap_model
from ds_relora.worker import init_distributed

ZERO3 = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
         "zero_optimization": {"stage": 3, "param_persistence_threshold": 0}}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def report(hf, wrap: bool) -> dict:
    whole = build_model(hf, seed=3)
    parted = build_model(hf, seed=3, ds_config=dict(ZERO3, train_batch_size=dist.get_world_size()))
    if wrap:
        for model in (whole, parted):
            wrap_model(model, rank=4, alpha=8, dropout=0.0, target_modules=TARGETS, seed=5)
    held = total = 0
    empty, mismatched = [], []
    reference = dict(whole.named_parameters())
    for name, p in parted.named_parameters():
        if hasattr(p, "ds_id"):
            held += p.ds_tensor.numel()
            total += p.ds_numel
            if p.data.numel() != 0:
                empty.append(name)
            with deepspeed.zero.GatheredParameters([p]):
                value = p.data.detach().clone()
        else:  # the adapters: created after construction, plain until deepspeed.initialize
            held += p.numel()
            total += p.numel()
            value = p.detach()
        if not torch.equal(value, reference[name].detach()):
            mismatched.append(name)
    return {"held": held, "total": total, "not_partitioned": empty, "mismatched": mismatched,
            "adapters": sum(p.numel() for n, p in parted.named_parameters() if "lora_" in n)}


if __name__ == "__main__":
    init_distributed()
    # ZeRO-3 weights above this many elements are drawn in pieces (the 7B embedding's 131 M in
    # 16 M pieces): small here so the tiny model's draws are split, across shard edges too.
    models.DRAW_CHUNK = 1008
    out = {"preset": report(llama_config(PRESETS["tiny"], 512, 32), wrap=False),
           "wrapped": report(llama_config(PRESETS["tiny"], 512, 32), wrap=True)}
    tied = llama_config(PRESETS["tiny"], 512, 32)
    tied.tie_word_embeddings = True
    out["tied"] = report(tied, wrap=False)
    print("RESULT " + json.dumps(out), flush=True)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)
