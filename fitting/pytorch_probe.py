"""PyTorch's own gradient at the inputs whose forward y is NaN (x = NaN, -inf, +inf): the one place the
fitter runs PyTorch. ``invact fit`` stores the result in the table (``nan_gradients``,
docs/table-format.md); code generation reads it there as data and runs no PyTorch.

Where PyTorch's y is NaN its backward may still be finite (relu at NaN: 1; leaky_relu: its slope;
hardswish at -inf: 0). That is a property of PyTorch's kernels (the direction of each backward's
comparison, the scalar or vectorised path that runs it), not of the formula: evaluated with IEEE
rules (Piecewise taking the first true condition), the formulas give leaky_relu's f' = 1 at NaN,
hardswish a finite y = 0 at -inf, and elu, celu, selu and hardswish a finite f' at NaN where
PyTorch's vectorised path gives NaN. So it is measured, on the table's ``torch_forward`` (one of the
built-ins' own strings, checked), with float64 autograd on both paths.
"""

from __future__ import annotations

import math

from .expressions import check_torch_forward
from .interrupts import signals_deferred

__all__ = ["PROBES", "torch_derivatives", "nan_gradients"]

PROBES = (math.nan, -math.inf, math.inf)


def torch_derivatives(torch_forward: str, params: dict, x: float) -> tuple[tuple[float, float], ...]:
    """(y, f'(x)) by PyTorch's float64 forward and autograd at x, on its scalar path (1 element) and
    its vectorised path (element 0 of 64), which can differ at NaN."""
    with signals_deferred():                            # its import runs C++ that calls Python
        import torch
        import torch.nn.functional as F

    check_torch_forward(torch_forward)                  # a built-in's own string, never other text
    out = []
    for n in (1, 64):
        xt = torch.full((n,), x, dtype=torch.float64, requires_grad=True)
        y = eval(torch_forward, {"F": F, "torch": torch, "x": xt, **params})  # noqa: S307
        y.sum().backward()
        out.append((float(y.detach()[0]), float(xt.grad[0])))
    return tuple(out)


def nan_gradients(torch_forward: str | None, params: dict) -> tuple[tuple[float, frozenset[float]], ...]:
    """(x, PyTorch's derivatives there) for each probe x of :data:`PROBES` whose y is NaN on both
    paths and whose derivative is a number (not NaN) on both: the distinct values of the two paths.
    Where either path gives NaN, NaN is what the tables' scheme gives anyway (no constraint). Empty
    without a PyTorch forward (user formulas)."""
    if not torch_forward:
        return ()
    out = []
    for x in PROBES:
        paths = torch_derivatives(torch_forward, params, x)
        if all(math.isnan(y) and not math.isnan(d) for y, d in paths):
            out.append((x, frozenset(d for _, d in paths)))
    return tuple(out)
