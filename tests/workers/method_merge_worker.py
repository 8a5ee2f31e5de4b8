"""One rank: ReMoRA's merge and GaLore's projector update keep the logits on every ZeRO stage
(W partitioned for real on ZeRO-3). Prints ``RESULT {json}`` per (method, stage, precision)."""

import json
import sys


from ds_relora.config import RunConfig
from ds_relora.methods import get_method
from ds_relora.models import build_model, llama_config
from ds_relora.methods.schedule import JaggedCosine
from ds_relora.methods.merging import merge_and_reinit
from ds_relora.train.engine import build_engine
from ds_relora.worker import init_distributed

sys.path.insert(0, "tests/workers")
from relora_engine_worker import SEQ, SHAPE, VOCAB, batch, ds_config, module_value, probe_logits, train_step  # noqa: E402


def run(method_name, stage, bf16, rank, world):
    cfg = RunConfig()
    cfg.train.method, cfg.relora.rank, cfg.galore.update_proj_gap = method_name, 3, 2
    method = get_method(method_name)
    model = build_model(llama_config(SHAPE, VOCAB, SEQ, attn_implementation="eager"), seed=0)
    layers = method.wrap(model, cfg, seed=1)
    engine = build_engine(model, ds_config(stage, bf16, 4 // world, 0), lr=1e-2, schedule=JaggedCosine(100, 0),
                          groups=method.param_groups(model, cfg))
    for t in range(4):
        method.before_step(engine, t, [batch(t, rank, world)])
        train_step(engine, t, rank, world)
    before = probe_logits(engine)
    w_before = module_value(layers[0][1].weight)
    if method_name == "remora":
        merge_and_reinit(engine, layers, seed=0, step=4, optimizer_reset="none", after_merge=method.after_merge)
        pattern = [int(v) for v in layers[0][1].mora_pattern.tolist()]
    else:  # a projector update: W0 += s P C, C = 0, new projector
        method.before_step(engine, 4, [batch(4, rank, world)])
        pattern = None
    after = probe_logits(engine)
    moved = (module_value(layers[0][1].weight) - w_before).abs().max().item()
    return {"method": method_name, "stage": stage, "bf16": bf16, "max_diff": (after - before).abs().max().item(),
            "scale": before.abs().max().item(), "w_moved": moved, "pattern": pattern}


if __name__ == "__main__":
    import torch.distributed as dist

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    for method_name in ("remora", "galore"):
        for stage in (0, 1, 2, 3):
            for bf16 in (False, True):
                print("RESULT " + json.dumps(run(method_name, stage, bf16, rank, world)), flush=True)
    import os

    dist.barrier()
    sys.stdout.flush()
    os._exit(0)
