"""Each rank: a warm-start run whose switch records weak references to the full-rank engine, its
optimizer and its module, and reports which of them are still alive when the adapter phase's
model is built (no collection of its own: the switch must have freed them by then), and how many
bytes of the switch's snapshot are copies rather than the old engine's own tensors."""

import json
import sys
import weakref

import ds_relora.train.trainer as trainer_module
from ds_relora.config import load_config
from ds_relora.quiet import quiet_worker
from ds_relora.train.trainer import Trainer
from ds_relora.worker import init_distributed


def _engine_storages(engine) -> set[int]:
    """The storages of the engine's fp32 module tensors, shards and optimizer masters."""
    tensors = []
    for p in engine.module.parameters():
        tensors += [p.data] + ([p.ds_tensor] if hasattr(p, "ds_tensor") else [])
    opt = engine.optimizer
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        tensors += list(getattr(opt, attr, None) or [])
    return {t.untyped_storage().data_ptr() for t in tensors if t is not None and t.numel()}


class Probe(Trainer):
    refs: dict = {}
    alive_at_build: dict | None = None
    copied_bytes = snapshot_bytes = 0

    def _switch_to_adapters(self):
        Probe.refs = {"engine": weakref.ref(self.engine), "optimizer": weakref.ref(self.engine.optimizer),
                      "module": weakref.ref(self.engine.module)}
        super()._switch_to_adapters()
        Probe.refs = {}


def _snapshot(engine):
    snap = local_snapshot(engine)
    own = _engine_storages(engine)
    for t in snap.values():
        Probe.snapshot_bytes += t.numel() * t.element_size()
        if t.untyped_storage().data_ptr() not in own:
            Probe.copied_bytes += t.numel() * t.element_size()
    return snap


def _build(*args, **kwargs):
    if Probe.refs:
        Probe.alive_at_build = {name: ref() is not None for name, ref in Probe.refs.items()}
    return build_model(*args, **kwargs)


local_snapshot, build_model = trainer_module.local_snapshot, trainer_module.build_model
trainer_module.local_snapshot, trainer_module.build_model = _snapshot, _build


if __name__ == "__main__":
    init_distributed()
    quiet_worker()
    out = {}
    for path in sys.argv[1:]:
        Probe.alive_at_build, Probe.copied_bytes, Probe.snapshot_bytes = None, 0, 0
        Probe(load_config(path)).run()
        out[path] = {"alive_at_build": Probe.alive_at_build, "copied_bytes": Probe.copied_bytes,
                     "snapshot_bytes": Probe.snapshot_bytes}
    print("RESULT " + json.dumps(out), flush=True)
    import os
    import torch.distributed as dist

    dist.barrier()
    sys.stdout.flush()
    os._exit(0)
