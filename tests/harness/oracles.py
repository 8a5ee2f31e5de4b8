"""The reference optimizers (``galore-torch``, ``apollo-torch``, ``fira``: test oracles only) and
the small problem every one-process oracle test trains.

* :func:`load_reference` imports one module of a reference package without the package's
  ``__init__`` (galore-torch's and apollo-torch's import bitsandbytes) and gives its projector
  module our SVD rule (:class:`TorchWithCanonicalSVD`): the references run LAPACK's SVD and keep
  its signs; we fix the signs (and run fp64 where the method does) so that a projector does not
  depend on the world size or the CPU. That is the one documented difference, given to the
  reference here, so that everything else must agree to rounding.
* :class:`Net` and :func:`teacher_batches`: a tall (20x12), a square (20x20) and a wide (8x20)
  matrix plus a head trained with plain Adam, on a fixed linear-teacher classification task."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch
from torch import nn

from ds_relora.zero.projection import canonical_signs


def canonical_svd(fp64: bool):
    """``torch.linalg.svd`` with canonical signs; in fp64 (returned in the input's dtype) or not."""

    def svd(a, full_matrices=True):
        u, s, vh = torch.linalg.svd(a.double() if fp64 else a, full_matrices=full_matrices)
        u, vh = canonical_signs(u, vh)
        return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)

    return svd


class TorchWithCanonicalSVD(types.ModuleType):
    """``torch`` as a reference projector module sees it: all of torch but ``linalg.svd``."""

    def __init__(self, fp64: bool):
        super().__init__("torch")
        self.linalg = types.SimpleNamespace(svd=canonical_svd(fp64))

    def __getattr__(self, name):
        return getattr(torch, name)


def load_reference(package: str, module: str, projector_module: str | None = None, *, fp64: bool = True):
    """``package.module`` of an installed reference, its ``projector_module`` seeing our SVD rule;
    the test skips (one line) when the package is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"{package} is not installed (pip install '.[test]')")
    folder = spec.submodule_search_locations[0]
    alias = f"_reference_{package}"
    pkg = types.ModuleType(alias)
    pkg.__path__ = [folder]
    sys.modules.setdefault(alias, pkg)
    module_spec = importlib.util.spec_from_file_location(f"{alias}.{module}", f"{folder}/{module}.py")
    loaded = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = loaded
    module_spec.loader.exec_module(loaded)
    if projector_module is not None:
        sys.modules[f"{alias}.{projector_module}"].torch = TorchWithCanonicalSVD(fp64)
    return loaded


class Net(nn.Module):
    """A tall (20x12), a square (20x20) and a wide (8x20) matrix, plus a head trained with plain Adam."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3, self.head = nn.Linear(12, 20), nn.Linear(20, 20), nn.Linear(20, 8), nn.Linear(8, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))))


def teacher_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches of 32 inputs labelled by a fixed random linear teacher."""
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(12, 5, generator=g)
    batches = []
    for _ in range(steps):
        x = torch.randn(32, 12, generator=g)
        batches.append((x, (x @ teacher).argmax(-1)))
    return batches
