"""One rank of the shared-input fusion and replicated-frozen-base checks (tests/test_methods_fused.py).

For each requested configuration it runs a short ReLoRA run (dropout 0.1, a merge at step 3)
and prints one ``RESULT {json}`` line per rank with the per-step losses, so the test can compare
configurations that must train identically:

  z0-fused          ZeRO-0, concatenated-A GEMM (the reference)
  z3-fused          ZeRO-3 with persistence 0 (every param sharded): dropout shared, own A GEMM
  z3-unfused-p0     ZeRO-3, unfused layer, dropout 0 (compared with z3-fused-p0)
  z3-fused-p0       ZeRO-3, fused, dropout 0
  z3-replicate      ZeRO-3 with the frozen W kept gathered on every rank
"""

import argparse
import json
import os

import torch
import torch.distributed as dist

from ds_relora.models import Shape, build_model, llama_config
from ds_relora.methods.schedule import JaggedCosine
from ds_relora.methods.merging import merge_and_reinit
from ds_relora.methods.lora_layer import wrap_model
from ds_relora.zero.frozen_base import apply_zero3_frozen_base, frozen_zero3_params
from ds_relora.train.engine import build_engine
from ds_relora.worker import init_distributed

SHAPE = Shape(hidden=40, intermediate=75, layers=2, heads=4)
VOCAB, SEQ, RANK, STEPS, MERGE_AT = 67, 12, 3, 6, 3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ds_config(stage, micro):
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "zero_optimization": zero,
            "bf16": {"enabled": False}, "steps_per_print": 10**9, "zero_allow_untested_optimizer": True}


def batch(step, rank, world, global_batch=4):
    g = torch.Generator().manual_seed(1000 + step)
    data = (torch.randint(0, VOCAB, (global_batch, 1), generator=g) + 7 * torch.arange(SEQ)) % VOCAB
    per = global_batch // world
    return data[rank * per:(rank + 1) * per]


def shards_match_data(params) -> bool:
    """Every persistent W's shard equals its rows of the gathered tensor (no stale copy)."""
    ok = True
    for p in params:
        part = p.ds_tensor.numel()
        start = dist.get_rank() * part
        flat = p.data.reshape(-1)
        end = min(start + part, flat.numel())
        ok &= p.data.numel() == p.ds_numel and torch.equal(p.ds_tensor.data[: end - start], flat[start:end])
    return bool(ok)


def run(name, rank, world):
    stage = 0 if name.startswith("z0") else 3
    dropout = 0.0 if name.endswith("p0") else 0.1
    model = build_model(llama_config(SHAPE, VOCAB, SEQ, attn_implementation="eager"), seed=0)
    modules = wrap_model(model, rank=RANK, alpha=6.0, dropout=dropout, target_modules=TARGETS, seed=1,
                         fuse_shared_inputs="unfused" not in name)
    engine = build_engine(model, ds_config(stage, 4 // world), lr=1e-2, schedule=JaggedCosine(100, 0))
    replicated = apply_zero3_frozen_base(engine, "replicate") if name == "z3-replicate" else 0
    losses, gathered_ok = [], True
    for t in range(STEPS):
        torch.manual_seed(10 * t + rank)  # the same dropout masks in every configuration
        x = batch(t, rank, world)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        if t + 1 == MERGE_AT:
            merge_and_reinit(engine, modules, seed=0, step=t + 1, optimizer_reset="magnitude", prune_ratio=0.9)
        if replicated:
            gathered_ok &= shards_match_data(frozen_zero3_params(engine.module))
        out = loss.detach().clone()
        dist.all_reduce(out)
        losses.append(out.item() / world)
    return {"name": name, "rank": rank, "losses": losses, "replicated": replicated, "gathered_ok": bool(gathered_ok)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", required=True)
    args, _ = ap.parse_known_args()
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    for name in args.configs.split(","):
        print("RESULT " + json.dumps(run(name, rank, world)), flush=True)
        dist.barrier()
    os._exit(0)  # skip interpreter teardown: gloo/DeepSpeed threads occasionally abort at exit


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
