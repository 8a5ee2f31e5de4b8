"""One training rank: ``python -m ds_relora.worker --config run_dir/config.yaml``.

Started by the ``deepspeed`` launcher, ``mpirun`` (ranks found through mpi4py), ``srun`` or
torchrun; ``ds-relora train`` builds those commands. A leading ``--local_rank=N`` (added by the
deepspeed launcher) is accepted and ignored: LOCAL_RANK comes from the environment.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys


def _quiet_libraries() -> None:
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()


def init_distributed() -> None:
    import deepspeed
    import torch

    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # On CPU DeepSpeed JIT-loads a shared-memory op (used only by inference_all_reduce) at init,
        # behind a lock file in ~/.cache/torch_extensions: a rank killed while holding it makes every
        # later start wait forever. Training needs only gloo.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    timeout = datetime.timedelta(seconds=float(os.environ.get("DS_RELORA_DIST_TIMEOUT", "600")))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # Under mpirun, DeepSpeed's MPI discovery sets MASTER_PORT from this argument, not the env.
    port = int(os.environ.get("MASTER_PORT", "29500"))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=True, verbose=False, timeout=timeout,
                               distributed_port=port)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ds_relora.worker")
    parser.add_argument("--config", required=True, help="resolved run config (written by ds-relora train)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args(argv)
    from .config import load_config
    from .errors import UserError

    try:
        cfg = load_config(args.config)
        init_distributed()
        _quiet_libraries()
        from .train.trainer import Trainer

        # exit_code 75 (train.job_limits.REQUEUE_EXIT_CODE): stopped early to be requeued.
        return Trainer(cfg).run().get("exit_code", 0)
    except UserError as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
