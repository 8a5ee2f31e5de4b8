"""``ds_relora.worker`` with one rank that dies mid-training (test-only, nothing in the package).

Rank ``$DS_RELORA_TEST_DIE_RANK`` (default 1) calls ``os._exit(3)`` right after step
``$DS_RELORA_TEST_DIE_AT_STEP`` is logged, like a rank killed by an OOM or a hardware fault: no
exception, no cleanup, its sockets just close. Before dying it writes the wall-clock time of the
death to ``$DS_RELORA_TEST_DIE_MARK`` so the test can time how long the others take to stop.
"""

import os
import sys
import time

import torch.distributed as dist

from ds_relora import worker
from ds_relora.train import trainer

DIE_AT = int(os.environ["DS_RELORA_TEST_DIE_AT_STEP"])
DIE_RANK = int(os.environ.get("DS_RELORA_TEST_DIE_RANK", "1"))
MARK = os.environ.get("DS_RELORA_TEST_DIE_MARK")


class DyingMetrics(trainer.MetricsLogger):
    """Every rank calls ``step`` once per optimizer step (it is a no-op off rank 0)."""

    def step(self, record: dict) -> None:
        super().step(record)
        if record["step"] == DIE_AT and dist.get_rank() == DIE_RANK:
            if MARK:
                with open(MARK, "w") as f:
                    f.write(repr(time.time()))
            print(f"launch_die_worker: rank {DIE_RANK} dies after step {DIE_AT}", file=sys.stderr, flush=True)
            os._exit(3)


trainer.MetricsLogger = DyingMetrics

if __name__ == "__main__":
    sys.exit(worker.main(sys.argv[1:]))
