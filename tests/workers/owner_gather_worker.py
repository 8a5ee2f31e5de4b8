"""One rank of the owner-gather checks (tests/test_checkpoint_store.py), on 3 ranks.

1. ``zero/owner_gather.gather_to_owner`` on hand-made layouts: ZeRO-3's (equal partitions, the
   last one padded), uneven pieces with gaps and a rank with none, a dtype change; the whole value
   must be on the owner only.
2. A save under ZeRO-3 (AdamW on trainable and ReLoRA's frozen params, and APOLLO's
   partitioned plain moments): ``write_state`` with
   every collective that could move a whole tensor to all ranks recorded; rank 0 then reads every
   saved tensor and compares it with DeepSpeed's own full getters.

Prints one ``RESULT {json}`` line per rank."""

import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from rank_tools import Recorder, report_and_exit

from ds_relora.checkpoint.format import MOMENTS_SET, WEIGHTS
from ds_relora.checkpoint.state_io import write_state
from ds_relora.config import RunConfig
from ds_relora.methods import get_method
from ds_relora.methods.schedule import JaggedCosine
from ds_relora.models import build_model, llama_config, preset_shape
from ds_relora.tensor_files import TensorSet
from ds_relora.train.engine import build_engine, release_engine
from ds_relora.worker import init_distributed
from ds_relora.zero.owner_gather import gather_to_owner
from ds_relora.zero.state import MOMENTS, get_master, get_moment, is_zero3_param, projected
from ds_relora.zero.projected_state import is_projected

VOCAB, SEQ = 509, 16


def layouts(rank: int, world: int) -> list[dict]:
    out = []
    numel, part = 10, 4  # ZeRO-3: rank r holds [4r, 4r + 4) clipped to 10
    whole = torch.arange(numel, dtype=torch.float32) + 1
    start = rank * part
    for owner in range(world):
        got = gather_to_owner([(start, whole[start: start + part])], numel, torch.float32, owner, "cpu")
        out.append({"case": "zero3", "owner": owner, "ok": got is None if rank != owner else torch.equal(got, whole)})
    # Uneven: rank 0 nothing, rank 1 two pieces, rank 2 one; elements 0-1 and 9 are nobody's (zero).
    numel = 12
    whole = torch.arange(numel, dtype=torch.float64) * 3 - 5
    mine = {0: [], 1: [(2, whole[2:4]), (6, whole[6:9])], 2: [(4, whole[4:6].reshape(1, 2)), (10, whole[10:12])]}[rank]
    expected = whole.clone()
    expected[[0, 1, 9]] = 0
    for owner in range(world):
        got = gather_to_owner(mine, numel, torch.float64, owner, "cpu")
        out.append({"case": "uneven", "owner": owner, "ok": got is None if rank != owner else torch.equal(got, expected)})
    # A bf16 shard (a frozen module) arrives as fp32.
    whole = torch.linspace(-2, 2, 9, dtype=torch.bfloat16)
    got = gather_to_owner([(rank * 3, whole[rank * 3: rank * 3 + 3])], 9, torch.float32, 0, "cpu")
    out.append({"case": "bf16", "owner": 0, "ok": got is None if rank else (got.dtype == torch.float32 and torch.equal(got, whole.float()))})
    return out


def frozen_value(p) -> torch.Tensor:
    import deepspeed  # noqa: PLC0415  (after the process group, as the trainer does)

    with deepspeed.zero.GatheredParameters([p]):
        return p.data.detach().float().clone()


def save_case(method_name: str, recorder: Recorder, folder: Path) -> dict:
    cfg = RunConfig()
    cfg.train.method = method_name
    cfg.apollo.rank = cfg.relora.rank = 4
    method = get_method(method_name)
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "zero_allow_untested_optimizer": True}
    model = build_model(llama_config(preset_shape("tiny"), VOCAB, SEQ, attn_implementation="eager"), seed=0, ds_config=ds)
    method.wrap(model, cfg, seed=1)
    engine = build_engine(model, ds, lr=1e-3, eps=1e-6, schedule=JaggedCosine(10, 0, 0.1),
                          groups=method.param_groups(model, cfg))
    rank = dist.get_rank()
    for step in range(2):
        ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(10 * step + rank))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    params = list(engine.module.named_parameters())
    sizes = [p.ds_numel for _, p in params if is_zero3_param(p)]
    recorder.on, recorder.largest = True, 0
    write_state(engine, folder, with_moments=True)
    recorder.on = False
    dist.barrier()
    largest, differ, checked = recorder.largest, [], 0
    opt = projected(engine)
    weights = TensorSet(folder, WEIGHTS) if rank == 0 else None
    moments = TensorSet(folder, MOMENTS_SET) if rank == 0 else None
    for name, p in params:  # DeepSpeed's own full getters, collective: every rank runs them
        expected = {name: get_master(engine, p) if p.requires_grad else frozen_value(p)}
        if p.requires_grad and not (opt is not None and is_projected(opt, p)):
            expected.update({f"{name}.{k}": get_moment(engine, p, k) for k in MOMENTS})
        if rank == 0:
            for key, value in expected.items():
                stored = (weights if key == name else moments).get(key)
                checked += 1
                if not torch.equal(stored, value.reshape(stored.shape)):
                    differ.append(key)
    release_engine(engine)
    return {"method": method_name, "largest_collective": largest, "largest_param": max(sizes), "smallest_param": min(sizes), "differ": differ,
            "checked": checked, "frozen": sum(not p.requires_grad for _, p in params)}


def main() -> None:
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"rank": rank, "layouts": layouts(rank, world), "saves": []}
    recorder = Recorder()
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    for method_name in ("full", "relora", "apollo"):
        folder = root / method_name
        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        result["saves"].append(save_case(method_name, recorder, folder))
    report_and_exit(result)


if __name__ == "__main__":
    main()
