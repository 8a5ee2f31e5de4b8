"""Each rank: a warm-start run whose switch records weak references to the full-rank engine, its
optimizer and its module, and reports which of them are still alive right after the switch."""

import gc
import json
import sys
import weakref

from ds_relora.config import load_config
from ds_relora.quiet import quiet_worker
from ds_relora.train.trainer import Trainer
from ds_relora.worker import init_distributed


class Probe(Trainer):
    alive: dict = {}

    def _switch_to_adapters(self):
        refs = {"engine": weakref.ref(self.engine), "optimizer": weakref.ref(self.engine.optimizer),
                "module": weakref.ref(self.engine.module)}
        super()._switch_to_adapters()
        gc.collect()
        Probe.alive = {name: ref() is not None for name, ref in refs.items()}


if __name__ == "__main__":
    init_distributed()
    quiet_worker()
    out = {}
    for path in sys.argv[1:]:
        Probe(load_config(path)).run()
        out[path] = Probe.alive
    print("RESULT " + json.dumps(out), flush=True)
    import os
    import torch.distributed as dist

    dist.barrier()
    sys.stdout.flush()
    os._exit(0)
