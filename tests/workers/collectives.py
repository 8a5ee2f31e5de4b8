"""Recording what collectives move, for the workers that check what a rank holds (imported by
the worker scripts beside it)."""

import torch
import torch.distributed as dist


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
