"""Recognise activation modules that no class rule names, by what they compute.

:func:`invact.patch` knows torch.nn's, Hugging Face's and timm's activation classes by name. Any other
leaf module without parameters or buffers (transformers' ``BloomGelu``, a model's own ``GELU`` class)
is probed: a deep copy in eval mode is called, without grad, on float64 values spread over [-8, 8]
(a 2-d tensor), and its output is compared with each reference in :func:`references`. It matches when
every output is within 2^-26 of the reference relative to it — a quarter of float32's unit roundoff
2^-24, so the reference's table serves the module as well as it serves the reference — plus 16 float64
ulps of 1 + |x|, the two formulas' own float64 rounding where they cancel (0.5x(1 + tanh(z)) for x < -4
keeps only an absolute error ~|x| * 2^-53). BloomGelu's and FastGELU's truncated sqrt(2/pi) change
outputs by ~1e-9 relative; GELU's erf and tanh forms differ by up to 0.64 relative (x = -4.7), so they
never match each other.

A module whose probe runs and is elementwise (flipping the input flips the output) but matches no
reference is "activation-like, not recognised"; one whose probe fails or is not elementwise is not an
activation and is not reported.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import nn

from . import registry
from .common.catalog import CATALOG

__all__ = ["references", "probe", "is_candidate"]



def references() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Each catalog activation's (with a table) forward at its default parameters (the generated module's ``forward``:
    PyTorch's own expression, :data:`invact.common.catalog.Entry.torch_forward`), which runs in float64."""
    present = set(registry.names())
    return {row.name: registry.module(row.name).forward for row in CATALOG if row.name in present}


#: references whose usual torch forms already save their output (a custom class may not: measure it)
SAVES_OUTPUT = {row.name for row in CATALOG if row.saves_output == "always"}
_REL, _ULPS64 = 2.0 ** -26, 16 * torch.finfo(torch.float64).eps


def is_candidate(module: nn.Module) -> bool:
    """A leaf module with no parameters or buffers, from outside torch (torch.nn's classes are named)."""
    return (not type(module).__module__.startswith("torch.")
            and next(module.parameters(recurse=False), None) is None
            and next(module.buffers(recurse=False), None) is None and not module._modules)


def _probe_input() -> torch.Tensor:
    x = torch.linspace(-8.0, 8.0, 4002, dtype=torch.float64)
    return (x + math.pi * 1e-4).reshape(2, 2001)      # off the grid's round numbers (kinks at 0)


def probe(module: nn.Module) -> tuple[str | None, bool]:
    """``(table, activation_like)``: the reference ``module`` computes (or None), and whether it looked
    like an elementwise activation at all."""
    try:
        twin = copy.deepcopy(module).eval()
        x = _probe_input()
        with torch.no_grad():
            y, y_flipped = twin(x), twin(x.flip(-1))
    except Exception:  # noqa: BLE001 - a module that cannot take one float64 tensor is not an activation
        return None, False
    if not (isinstance(y, torch.Tensor) and isinstance(y_flipped, torch.Tensor) and y.shape == x.shape
            and y.dtype == x.dtype and torch.equal(y_flipped.flip(-1), y)):
        return None, False
    for name, ref in references().items():
        want = ref(x)
        if bool(((y - want).abs() <= _REL * want.abs() + _ULPS64 * (1 + x.abs())).all()):
            return name, True
    return None, True
