"""GaLore's probe: the full weight gradient G of each wrapped layer at the current weights, made
one layer at a time from the activations a probe forward/backward leaves (:mod:`.galore` computes
each projector from it)."""

from __future__ import annotations

import time
import weakref

import torch
from torch import nn

RELEASE_WAIT_S = 1.0


class AliveCount:
    """How many tensors handed to :meth:`track` are alive now, and the most at once: the probe's
    full-gradient buffers are counted when made and uncounted when Python frees them (a weakref
    finalizer, not bookkeeping), so a G that is still referenced somewhere shows in ``peak``."""

    def __init__(self):
        self.alive = self.peak = 0

    def make(self, build) -> torch.Tensor:
        """``build()``'s tensor, tracked, made once the tensors tracked before it are gone (at
        most ``RELEASE_WAIT_S`` later). A collective returns before its worker thread lets go of
        the tensor it sent (gloo's keeps its work item, and with it the tensor, until it takes
        the next one), so the previous G can outlive the call by a moment, longer on a loaded
        machine; the next G is not made beside it. A G still referenced after the wait shows in
        ``peak``."""
        deadline = time.monotonic() + RELEASE_WAIT_S
        while self.alive and time.monotonic() < deadline:
            time.sleep(0.001)
        return self.track(build())

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        self.alive += 1
        self.peak = max(self.peak, self.alive)
        weakref.finalize(tensor, self._release)
        return tensor

    def _release(self) -> None:
        self.alive -= 1


def probe_activations(model: nn.Module, layers: list[tuple[str, nn.Module]], micro_batches,
                      loss_fn) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each layer's ``(X, dY)`` per micro-batch at the current weights: what its full weight
    gradient ``G = sum_mb dY^T X`` is made of (:func:`layer_gradient`), without making any G.

    A probe forward/backward per micro-batch; ``torch.autograd.grad`` w.r.t. the layers' outputs
    only, so no parameter's ``.grad`` (and none of DeepSpeed's gradient hooks) is touched. Only
    the direction of G matters (its SVD), so the micro-batch losses are simply summed.

    Why activations and not G: summing G over micro-batches needs every layer's G alive until
    the last micro-batch (at 7B, 26 GB per rank in fp64); X and dY are tokens x (in + out) per
    layer, and X is shared by the layers that read the same input (q/k/v, gate/up). The caller
    then makes one layer's G at a time and frees it before the next."""
    acts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name, _ in layers}
    inputs, outputs = {}, {}

    def hook(name):
        def fn(_module, args, out):
            inputs[name], outputs[name] = args[0].detach(), out
        return fn

    handles = [mod.register_forward_hook(hook(name)) for name, mod in layers]
    try:
        for mb in micro_batches:
            inputs.clear()
            outputs.clear()
            loss = loss_fn(model, mb)
            names = [n for n, _ in layers if n in outputs]
            dys = torch.autograd.grad(loss, [outputs[n] for n in names], allow_unused=True)
            for name, dy in zip(names, dys):
                if dy is not None:
                    acts[name].append((inputs[name], dy))
            del loss, dys
    finally:
        for h in handles:
            h.remove()
        inputs.clear()
        outputs.clear()
    missing = [n for n, pairs in acts.items() if not pairs]
    if missing:
        raise RuntimeError(f"no gradient reached GaLore layers {missing[:3]} in the probe backward")
    return acts


def layer_gradient(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``G = sum_mb dY^T X`` (float64) of one layer from :func:`probe_activations`' pairs.

    Each micro-batch's ``dY^T X`` is an fp32 GEMM; the sum over micro-batches (and the reduction
    over ranks after it) is in fp64, where a sum of a few fp32 values is exact unless their
    exponents lie ~29 binades apart. So the same micro-batches give the same G bits in any order
    and grouping: 1 rank x 2 micro-batches, 2 ranks x 1, any ZeRO stage."""
    g = None
    for x, dy in pairs:
        part = (dy.reshape(-1, dy.shape[-1]).t().float() @ x.reshape(-1, x.shape[-1]).float()).double()
        g = part if g is None else g.add_(part)
    return g


def full_gradients(model: nn.Module, layers: list[tuple[str, nn.Module]], micro_batches, loss_fn) -> dict[str, torch.Tensor]:
    """Every layer's G at once (:func:`layer_gradient` of :func:`probe_activations`): for one
    process and small models (the oracle tests); the engine's update makes one G at a time."""
    acts = probe_activations(model, layers, micro_batches, loss_fn)
    return {name: layer_gradient(acts.pop(name)) for name, _ in layers}
