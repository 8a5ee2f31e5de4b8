"""One rank that trains several run configs one after the other (like run_configs.py) and
prints, per config, what DeepSpeed's comms logger recorded during that run:

    RESULT {"config": path, "rank": r, "comms_enabled": bool, "ops": {record_name: count}, "bytes": {...}}

The logger is process-global state: it is switched off and emptied before each config, so a
record can only come from that config's own ``comms_logger`` section.
"""

import json
import sys

import deepspeed.comm as ds_comm
import torch.distributed as dist

from ds_relora.config import load_config
from ds_relora.train.trainer import Trainer
from ds_relora.quiet import quiet_worker
from ds_relora.worker import init_distributed

if __name__ == "__main__":
    init_distributed()
    quiet_worker()
    for path in sys.argv[1:]:
        ds_comm.comms_logger.reset_data()
        ds_comm.configure(enabled=False)
        Trainer(load_config(path)).run()
        raw = ds_comm.comms_logger.get_raw_data()
        ops = {name: sum(v[0] for v in sizes.values()) for name, sizes in raw.items()}
        nbytes = {name: sum(size * v[0] for size, v in sizes.items()) for name, sizes in raw.items()}
        print("RESULT " + json.dumps({"config": path, "rank": dist.get_rank(), "comms_enabled": ds_comm.comms_logger.enabled,
                                      "ops": ops, "bytes": nbytes}), flush=True)
