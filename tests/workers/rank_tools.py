"""For the worker scripts beside it (imported by them): recording what collectives move, and a
rank's end (its result line, then an exit that skips the interpreter's teardown)."""

import json
import os
import sys

import torch
import torch.distributed as dist


def report_and_exit(result: dict) -> None:
    """Print ``RESULT {json}``, wait for every rank, exit: native gloo/DeepSpeed threads
    occasionally abort in the interpreter's teardown."""
    print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


class Recorder:
    """The largest element count (``largest``) and byte count (``largest_bytes``: DeepSpeed's
    construction broadcasts a uint8 view) any collective that lands on every rank moved, while on."""

    NAMES = ("all_gather_into_tensor", "allgather_fn", "all_gather", "all_reduce", "broadcast")

    def __init__(self):
        import deepspeed.comm  # noqa: PLC0415  (DeepSpeed's ZeRO calls its own wrappers, which hold torch's functions)

        self.on, self.largest, self.largest_bytes = False, 0, 0
        for module in (dist, deepspeed.comm):
            for name in self.NAMES:
                if hasattr(module, name):
                    setattr(module, name, self.wrap(getattr(module, name)))

    def wrap(self, original):
        def wrapped(*args, **kwargs):
            if self.on:
                values = list(args) + list(kwargs.values())
                tensors = [a for a in values if isinstance(a, torch.Tensor)]
                tensors += [t for a in values if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
                self.largest = max([self.largest] + [t.numel() for t in tensors])
                self.largest_bytes = max([self.largest_bytes] + [t.numel() * t.element_size() for t in tensors])
            return original(*args, **kwargs)

        return wrapped
