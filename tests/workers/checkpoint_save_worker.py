"""One rank of the checkpoint save checks (started by tests/test_checkpoint_store.py): a small
ReLoRA-wrapped model under ZeRO-2 takes two steps, then three saves with keep_last=2. Rank 0's
delete of the pruned folder is held (shutil.rmtree patched) until both ranks have left the third
save and met in a collective after it: a prune inside the save's collectives would never get
there and the hold times out. Rank 0 prints ``RESULT {json}``."""

import json
import os
import shutil
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from ds_relora.checkpoint import store
from ds_relora.checkpoint.format import CheckpointMeta, expected_checkpoint_bytes
from ds_relora.methods.lora_layer import wrap_model
from ds_relora.methods.schedule import JaggedCosine
from ds_relora.models import Shape, build_model, llama_config
from ds_relora.train.engine import build_engine
from ds_relora.worker import init_distributed

sys.path.insert(0, "tests/workers")
from relora_engine_worker import ds_config  # noqa: E402

# Big enough that the tensors, not the small files, make up the checkpoint; odd sizes split params.
SHAPE, VOCAB, SEQ = Shape(hidden=96, intermediate=250, layers=2, heads=4), 1001, 16
HOLD_S = 60.0


def main(root: Path) -> None:
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(llama_config(SHAPE, VOCAB, SEQ, attn_implementation="eager"), seed=0)
    wrap_model(model, rank=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"], seed=1)
    engine = build_engine(model, ds_config(2, False, 2, None), lr=1e-3, schedule=JaggedCosine(100, 0))
    for step in range(2):
        x = (torch.arange(2 * SEQ).reshape(2, SEQ) * 7 + 3 * step + rank) % VOCAB
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()

    released, held = threading.Event(), []
    original = shutil.rmtree

    def slow_rmtree(path, *args, **kwargs):
        if Path(path).name.startswith(store.PRUNED):
            held.append({"released": released.wait(HOLD_S), "main_thread": threading.current_thread() is threading.main_thread()})
        return original(path, *args, **kwargs)

    shutil.rmtree = slow_rmtree
    for step in (1, 2, 3):
        meta = CheckpointMeta(step=step, phase="adapters", world_size=world, zero_stage=2, optimizer_step=2)
        store.save_checkpoint(engine, root, step, meta=meta, config_yaml="train: {}\n", hf_config=model.config,
                              tokenizer_dir=None, keep_last=2)
    dist.barrier()  # rank 1 meets rank 0 here while rank 0's delete is still held
    listing_before = sorted(p.name for p in root.iterdir())
    released.set()
    store.wait_for_pruning()
    if rank == 0:
        final = root / "step-3"
        files = {p.relative_to(final).as_posix(): p.stat().st_size for p in final.rglob("*") if p.is_file()}
        print("RESULT " + json.dumps({
            "held": held, "listing_while_held": listing_before, "listing": sorted(p.name for p in root.iterdir()),
            "files": files, "expected": expected_checkpoint_bytes(engine.module)}), flush=True)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
