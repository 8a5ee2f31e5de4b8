"""One rank of the device checks (started by tests/test_device.py through tests/harness/ranks.py).

1. ``train``: a real short ReLoRA run (``ds_relora.worker.main``: warm start, switch, merge,
   eval, checkpoints) under ``DeviceAudit``: every tensor factory called from ds_relora's
   training code without ``device=`` is recorded (on a GPU such a tensor would be a CPU
   tensor in an NCCL collective or next to GPU moments), and so is every host read
   (``.item()``, ``float(t)``, ``.tolist()``, ``.cpu()`` ...) made there.
2. ``checks``: the merge/re-init/moment checks of relora_engine_worker.py on ZeRO-3 with
   persistence threshold 0 (W really sharded), without and with parameter + optimizer offload.

Prints one ``RESULT {json}`` line per part on each rank.
"""

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).parent))
REPO = Path(__file__).resolve().parents[2]
STEP_LOOP = [str(REPO / "ds_relora" / "train" / f) for f in ("trainer.py", "prefetch.py", "job_limits.py")] \
    + [str(REPO / "ds_relora" / "device.py")]
AUDITED = STEP_LOOP + [str(REPO / "ds_relora" / "relora") + os.sep]
FACTORIES = {torch.tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.rand, torch.randn,
             torch.randint, torch.randperm, torch.eye, torch.linspace}
HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__,
              torch.Tensor.__bool__, torch.Tensor.cpu, torch.Tensor.numpy}
# Deliberately on the CPU: the re-init draws A from a CPU generator (device-invariant values)
# and reinit_values moves it (tests/test_device.py checks that on meta tensors).
CPU_BY_DESIGN = {"kaiming_uniform_A"}


class DeviceAudit(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.deviceless = Counter()
        self.host_reads = Counter()
        self.blocking_copies = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES or func in HOST_READS:
            frame = sys._getframe(1)
            path = frame.f_code.co_filename
            if any(path == a or path.startswith(a) for a in AUDITED):
                where = f"{Path(path).name}:{frame.f_code.co_name}:{frame.f_lineno}"
                if func in FACTORIES and "device" not in kwargs and "generator" not in kwargs \
                        and frame.f_code.co_name not in CPU_BY_DESIGN:
                    self.deviceless[where] += 1
                if func in HOST_READS:
                    self.host_reads[where] += 1
                if path in STEP_LOOP and _blocking_host_copy(func, args, kwargs):
                    self.blocking_copies[where] += 1
        return func(*args, **kwargs)


def _blocking_host_copy(func, args, kwargs) -> bool:
    """A host tensor sent to a device without ``non_blocking`` (on a GPU: a copy from pageable
    memory that waits for every queued kernel), or ``torch.tensor(data, device=...)``, which is
    one. On the CPU the target is the CPU too, so any device target counts."""
    if func in (torch.tensor, torch.as_tensor):
        return kwargs.get("device") is not None
    if func not in (torch.Tensor.to, torch.Tensor.cuda) or not isinstance(args[0], torch.Tensor) \
            or args[0].device.type != "cpu":
        return False
    target = func is torch.Tensor.cuda or "device" in kwargs or \
        any(isinstance(a, (torch.device, str)) for a in args[1:2])
    return target and kwargs.get("non_blocking") is not True


def run_train(config: str) -> dict:
    from ds_relora import worker

    audit = DeviceAudit()
    with audit:
        rc = worker.main(["--config", config])
    return {"part": "train", "rank": int(os.environ["RANK"]), "rc": rc,
            "deviceless": dict(audit.deviceless), "host_reads": dict(audit.host_reads),
            "blocking_copies": dict(audit.blocking_copies)}


def run_checks(offload: bool) -> dict:
    import relora_engine_worker as rew

    base = rew.ds_config
    captured = {}

    def ds_config(stage, bf16, micro, persist):
        cfg = base(stage, bf16, micro, persist)
        if offload:
            cfg["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
            cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
            cfg["zero_force_ds_cpu_optimizer"] = False
        return cfg

    make_model = rew.make_model

    def capture_model(dropout):
        model, modules = make_model(dropout)
        captured["modules"] = modules
        return model, modules

    rew.ds_config, rew.make_model = ds_config, capture_model
    try:
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        out = rew.run_checks(3, 0, 0, rank, world)
    finally:
        rew.ds_config, rew.make_model = base, make_model
    weights = [m.weight for _, m in captured["modules"]]
    out.update(part="checks", offload=offload,
               # threshold 0: outside a gather every W holds no data, only its shard
               base_sharded=all(w.data.numel() == 0 and w.ds_tensor.numel() < w.ds_numel for w in weights),
               shard_devices=sorted({str(w.ds_tensor.device) for w in weights}))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="run config of the audited training")
    args = ap.parse_args()
    print("RESULT " + json.dumps(run_train(args.config)), flush=True)
    for offload in (False, True):
        print("RESULT " + json.dumps(run_checks(offload)), flush=True)
        torch.distributed.barrier()
    # Skip interpreter teardown: native gloo/DeepSpeed threads occasionally abort at exit.
    os._exit(0)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
