"""Generate ``generated/torch_NAME.py``: META, PyTorch forward, forward code and backward g(y, code)."""

from __future__ import annotations

import pprint

from .analysis import Plan
from .evaluation import TorchDialect, emit_code, emit_g
from .printer import to_python, to_torch
from .writer import Writer, header

__all__ = ["generate_torch"]


def _signature(plan: Plan, *lead: str) -> str:
    params = [f"{n}={v!r}" for n, v in plan.params]
    return ", ".join([*lead, *(["*", *params] if params else [])])


def _breaks(breaks) -> str:
    items = "".join(f"({to_python(v)}, {side!r}), " for v, side in breaks)
    return f"({items.rstrip(' ')})" if breaks else "()"


def _meta(w: Writer, plan: Plan) -> None:
    text = pprint.pformat(plan.meta, width=100, sort_dicts=False)
    w(*f"META = {text}".splitlines())
    w("NAME = META['name']", f"PARAMS = {plan.param_names!r}", f"CODE_BITS = {plan.code_bits}",
      f"N_SEGMENTS = {plan.n_segments}", "")


def _poly_table(w: Writer, plan: Plan) -> None:
    origin = ", ".join(f"origin{j}" for j in range(plan.n_origin))
    coeffs = ", ".join(f"c{j}" for j in range(1, plan.degree + 1))
    w(f"# One row per segment (all code classes, left to right in y); zeros for exact/constant ones:",
      f"# kind (0 identity, 1 sqrt, 2 log), sign, {origin + ', ' if origin else ''}center, scale, c0_hi, c0_lo"
      f"{', ' + coeffs if coeffs else ''}.")
    with w.block("POLY = ("):
        for row in plan.poly:
            w("(" + ", ".join(repr(v) for v in row) + ("," if len(row) == 1 else "") + "),")
    w(")", "", "")


def generate_torch(plan: Plan) -> str:
    """Source text of the torch module of ``plan``."""
    d = TorchDialect()
    w = Writer()
    w(header(plan.source).rstrip("\n"))
    w(f'"""{plan.name}: PyTorch forward, forward code and backward g(y, code) (see docs/table-format.md).',
      "",
      "``code_kernel`` and ``g_kernel`` are pure tensor functions (what invact.ops runs eagerly or compiles);",
      "their thresholds and POLY tensor come from ``invact.ops.table_constants``.", '"""', "")
    w("import math  # noqa: F401 - parameter arithmetic in printed expressions", "",
      "import torch", "import torch.nn.functional as F  # noqa: F401 - used by torch_forward", "")
    _meta(w, plan)
    _poly_table(w, plan)
    with w.block(f"def forward({_signature(plan, 'x')}):"):
        w('"""y = f(x): PyTorch\'s own forward (META torch_forward), else the printed formula."""')
        w(f"return {plan.torch_forward or to_torch(plan.formula, 'x')}")
    w("", "")
    with w.block(f"def x_breaks({_signature(plan)}):"):
        w('"""Forward-code breaks (value, side), left to right (docs/table-format.md, Forward code)."""')
        w(f"return {_breaks(plan.x_breaks)}")
    w("", "")
    with w.block(f"def y_breaks({_signature(plan)}):"):
        w('"""Segment breaks (value, side) of every code class, concatenated class by class."""')
        w(f"return {_breaks([b for c in plan.classes for b in c.y_breaks])}")
    w("", "")
    with w.block("def code_kernel(x, thr):"):
        w('"""uint8 code of each element of x; thr[j]: `x >= thr[j]` <=> x is right of break j."""')
        if plan.code_bits:
            emit_code(w, plan, d)
            w("return c")
        else:
            w("return torch.zeros_like(x, dtype=torch.uint8)")
    w("", "")
    with w.block(f"def g_kernel({_signature(plan, 'y', 'code', 'thr', 'poly')}):"):
        w('"""g(y, code) = f\'(x): float64 for float64 y, else float32 (y upcast exactly).',
          "",
          "thr: the y_breaks as `y >= t` thresholds (concatenated per class); poly: POLY transposed.",
          '"""')
        w("y = y.to(torch.float64 if y.dtype == torch.float64 else torch.float32)")
        emit_g(w, plan, d)
        w("return g")
    w("", "")
    with w.block("def forward_code(x, **params):"):
        w('"""Convenience: code_kernel with this table\'s thresholds for x\'s dtype."""')
        w("from invact.ops import table_constants",
          "return code_kernel(x, table_constants(NAME, x.dtype, x.device, params).x_thresholds)")
    w("", "")
    with w.block("def backward_g(y, code, **params):"):
        w('"""Convenience: g_kernel with this table\'s constants for y\'s evaluation dtype."""')
        w("from invact.ops import table_constants",
          "k = table_constants(NAME, y.dtype, y.device, params)",
          "return g_kernel(y, code, k.y_thresholds, k.poly, **k.params)")
    return w.text()
