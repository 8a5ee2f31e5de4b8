"""One rank of the projection methods' memory check (tests/test_memory_estimate.py): for each
(method, ZeRO stage), the tiny preset built as the trainer builds it (ZeRO-3: already
partitioned), the method's param groups, the engine ``train.engine.build_engine`` makes (the
projected optimizer, attached to DeepSpeed's layout), two training steps, then this rank's
optimizer-state bytes from ``model_state_bytes_from_engine``. Rank 0 writes a JSON list of
{method, stage, rank, adam_per_rank} to argv[1]."""

from __future__ import annotations

import gc
import json
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from ds_relora.config import RunConfig  # noqa: E402
from ds_relora.estimate.engine_memory import model_state_bytes_from_engine  # noqa: E402
from ds_relora.methods import get_method  # noqa: E402
from ds_relora.methods.schedule import JaggedCosine  # noqa: E402
from ds_relora.models import build_model, llama_config, preset_shape  # noqa: E402
from ds_relora.train.engine import build_engine, release_engine  # noqa: E402

VOCAB, SEQ = 512, 32
CASES = [("apollo", 0), ("apollo", 2), ("apollo_mini", 1), ("apollo_mini", 3), ("fira", 3)]


def run_case(method_name: str, stage: int) -> dict:
    cfg = RunConfig()
    cfg.train.method = method_name
    if method_name != "apollo_mini":
        getattr(cfg, method_name).rank = 4
    method = get_method(method_name)
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
          "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
          "zero_allow_untested_optimizer": True}
    model = build_model(llama_config(preset_shape("tiny"), VOCAB, SEQ), seed=0, ds_config=ds)
    method.wrap(model, cfg, seed=1)
    engine = build_engine(model, ds, lr=1e-3, eps=1e-6, schedule=JaggedCosine(10, 0, 0.1),
                          groups=method.param_groups(model, cfg))
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    adam = model_state_bytes_from_engine(engine)["adam"]
    release_engine(engine)
    gc.collect()
    return {"method": method_name, "stage": stage, "rank": getattr(cfg, method_name).rank, "adam": adam}


def main() -> None:
    from ds_relora.worker import init_distributed

    init_distributed()
    import deepspeed  # noqa: PLC0415  (after the process group, as the trainer does)

    deepspeed.utils.logger.setLevel("ERROR")
    results = [run_case(*case) for case in CASES]
    per_rank = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(per_rank, results)
    if int(os.environ["RANK"]) == 0:
        merged = [dict(case, adam_per_rank=[r[i]["adam"] for r in per_rank]) for i, case in enumerate(results)]
        with open(sys.argv[1], "w") as f:
            json.dump(merged, f)
    torch.distributed.barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
