"""Where ds_relora's own tensors live, and the one host read per optimizer step.

NCCL accepts only GPU tensors, so every tensor that enters a collective is made on the device
DeepSpeed computes on. Reading a GPU value on the host (``.item()``, ``float(t)``, ``.cpu()``)
waits for the whole queue of kernels: the training loop does it once per optimizer step, for
all its scalars together (``host_scalars``).
"""

from __future__ import annotations

import torch


def comm_device() -> torch.device:
    """The device of this rank's collectives: DeepSpeed's current accelerator device (what
    ``engine.device`` will be; known before the engine exists)."""
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415  (deepspeed takes seconds to import and patches torch; only code that builds an engine needs it)

    return torch.device(get_accelerator().current_device_name())


def host_scalars(*values) -> list[float | None]:
    """Python floats of scalar tensors (any devices), floats or None, with one device-to-host
    copy per device instead of one per value."""
    out: list[float | None] = [None] * len(values)
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(i)
        elif v is not None:
            out[i] = float(v)
    for device, idx in by_device.items():
        stacked = torch.stack([values[i].detach().reshape(()).to(torch.float32) for i in idx])
        for i, x in zip(idx, stacked.tolist()):
            out[i] = x
    return out
