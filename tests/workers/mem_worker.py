"""One rank of the engine-vs-analytic memory check (started twice by test_memory_estimate.py).

Needs RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in the environment. Builds a
ReLoRA-like toy module (a frozen base Linear plus trainable adapters and a norm vector) under
each (precision, ZeRO stage) in turn inside one process group, because a process start costs
seconds of imports. For each engine: one training step (so Adam state exists), then forward +
backward, then ``model_state_bytes_from_engine`` while the gradients are held, then the step.
Rank 0 writes a JSON list of {precision, stage, gas, wrapper, measured_per_rank, expected}
to argv[1]; argv[2], optional, picks cases as "bf16:2:1,fp32:0:1".
"""

from __future__ import annotations

import gc
import json
import os
import sys
import warnings

import torch
from torch import nn

warnings.filterwarnings("ignore")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402

from ds_relora.estimate.engine_memory import model_state_bytes_from_engine  # noqa: E402
from ds_relora.estimate.memory import model_state_bytes  # noqa: E402

WIDTH, OUT, RANK, BLOCKS = 160, 192, 8, 6  # several params, so ZeRO partitions cut through some

# (precision, ZeRO stage, gradient accumulation steps); "autocast" = keep_base_fp32
CASES = ([(prec, stage, 1) for prec in ("bf16", "fp32") for stage in (0, 1, 2, 3)]
         + [("autocast", stage, 1) for stage in (2, 3)] + [("bf16", 1, 2), ("bf16", 2, 2)])


class Toy(nn.Module):
    """ReLoRA-shaped: per block a frozen W plus trainable A, B and a norm vector."""

    def __init__(self):
        super().__init__()
        self.base = nn.ModuleList(nn.Linear(WIDTH, OUT, bias=False) for _ in range(BLOCKS))
        self.base.requires_grad_(False)
        self.lora_A = nn.ParameterList(torch.randn(RANK, WIDTH) / WIDTH**0.5 for _ in range(BLOCKS))
        self.lora_B = nn.ParameterList(torch.randn(OUT, RANK) / 10 for _ in range(BLOCKS))
        self.norm = nn.ParameterList(torch.ones(WIDTH) for _ in range(BLOCKS))

    def forward(self, x):
        out = 0
        for w, a, b, g in zip(self.base, self.lora_A, self.lora_B, self.norm):
            h = x * g
            out = out + w(h) + (h @ a.t()) @ b.t()
        return out


def ds_config(prec: str, stage: int, gas: int) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": gas,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 50_000,
                              "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
    }
    if prec == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif prec == "autocast":
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return cfg


def run_case(prec: str, stage: int, gas: int) -> dict:
    torch.manual_seed(0)
    model = Toy()
    trainable = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in trainable)
    largest = max(p.numel() for p in trainable)  # before ZeRO-3 empties p.data
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(prec, stage, gas))
    dtype = torch.bfloat16 if prec == "bf16" else torch.float32
    x = torch.randn(4, WIDTH, dtype=dtype)
    # Measure in the first micro-step of the second optimizer step: Adam state exists, and the
    # gradients are held (the partition at a boundary, the accumulated ones otherwise).
    for micro in range(2 * gas):
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        if micro == gas:
            measured = model_state_bytes_from_engine(engine)
        engine.step()
    wrapper = type(engine.optimizer).__name__
    expected = model_state_bytes(total, n_train, stage, int(os.environ["WORLD_SIZE"]),
                                 precision="fp32" if prec == "fp32" else "bf16",
                                 keep_base_fp32=prec == "autocast", grad_accum_steps=gas)
    expected["total"] = sum(expected[k] for k in ("weights", "grads", "master", "adam"))
    engine.destroy()
    del engine, opt, model
    gc.collect()
    return {"precision": prec, "stage": stage, "gas": gas, "wrapper": wrapper, "measured": measured,
            "expected": expected, "total_params": total, "trainable_params": n_train,
            "largest_trainable": largest}


def main() -> None:
    from ds_relora.worker import init_distributed

    init_distributed()
    deepspeed.utils.logger.setLevel("ERROR")
    results = []
    cases = CASES
    if len(sys.argv) > 2:
        cases = [c for c in CASES if f"{c[0]}:{c[1]}:{c[2]}" in sys.argv[2].split(",")]
    for case in cases:
        results.append(run_case(*case))
    per_rank = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(per_rank, results)
    if int(os.environ["RANK"]) == 0:
        merged = [dict(case, measured_per_rank=[r[i]["measured"] for r in per_rank])
                  for i, case in enumerate(results)]
        for case in merged:
            del case["measured"]
        with open(sys.argv[1], "w") as fh:
            json.dump(merged, fh, indent=1)
    torch.distributed.barrier()
    # Interpreter teardown occasionally aborts in native code ("terminate called without an
    # active exception", ~1 run in 12) after all results are written; skip it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
