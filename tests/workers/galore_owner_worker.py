"""One rank of the GaLore projector-update ownership check (started by tests/harness/ranks.py).

Per ZeRO stage (2 and 3), 2 layers (14 wrapped linears), 2 micro-batches per rank: the update at
step 0 reports how many SVDs this rank ran and the most full gradients it held at once, and its
projectors are compared with the old all-at-once path (every G all-reduced, SVD everywhere).
Prints one ``RESULT {json}`` line per stage on each rank."""

import json
import os
import sys

import torch
import torch.distributed as dist

from ds_relora.config import RunConfig
from ds_relora.methods import get_method
from ds_relora.methods.galore import full_gradients, projector
from ds_relora.methods.schedule import JaggedCosine
from ds_relora.models import build_model, llama_config
from ds_relora.train.engine import build_engine
from ds_relora.worker import init_distributed

sys.path.insert(0, "tests/workers")
from relora_engine_worker import SEQ, SHAPE, VOCAB, batch, ds_config  # noqa: E402


def run(stage, rank, world):
    cfg = RunConfig()
    cfg.train.method, cfg.relora.rank, cfg.galore.update_proj_gap = "galore", 3, 2
    method = get_method("galore")
    model = build_model(llama_config(SHAPE, VOCAB, SEQ, attn_implementation="eager"), seed=0)
    layers = method.wrap(model, cfg, seed=1)
    engine = build_engine(model, ds_config(stage, False, 1, 0), lr=1e-2, schedule=JaggedCosine(100, 0),
                          groups=method.param_groups(model, cfg))
    micro = [batch(0, rank, world, global_batch=8)[i:i + 2] for i in (0, 2)]

    def loss_fn(m, mb):
        return m(input_ids=mb, labels=mb).loss

    reference = {}
    for name, g in full_gradients(engine.module, layers, micro, loss_fn).items():
        dist.all_reduce(g)
        reference[name] = projector(g, method.rank)
    event = method.before_step(engine, 0, micro)
    differ = [name for name, layer in layers if not torch.equal(layer.galore_proj.float(), reference[name])]
    return {"stage": stage, "rank": rank, "layers": len(layers), "svd_layers": event["svd_layers"],
            "peak_full_gradients": event["peak_full_gradients"], "differ": differ}


if __name__ == "__main__":
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    for stage in (2, 3):
        print("RESULT " + json.dumps(run(stage, rank, world)), flush=True)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)
