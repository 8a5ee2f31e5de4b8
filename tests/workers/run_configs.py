"""One rank that trains several run configs one after the other in the same process group
(pays the process start-up and DeepSpeed import once)."""

import sys

from ds_relora.config import load_config
from ds_relora.train.trainer import Trainer
from ds_relora.quiet import quiet_worker
from ds_relora.worker import init_distributed

if __name__ == "__main__":
    init_distributed()
    quiet_worker()
    for path in sys.argv[1:]:
        Trainer(load_config(path)).run()
    # Skip interpreter teardown: native gloo/DeepSpeed threads occasionally abort at exit.
    import os
    import torch.distributed as dist

    dist.barrier()
    sys.stdout.flush()
    os._exit(0)
