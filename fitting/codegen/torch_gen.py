"""Generate ``generated/torch_NAME.py``: META, PyTorch forward, forward code and backward g(y, code)."""

from __future__ import annotations

import ast
import contextlib
import pprint

from ...common.catalog import CATALOG
from .analysis import Plan
from .evaluation import TorchDialect, emit_code, emit_g
from .printer import mangle, mangle_text, to_python, to_torch
from .writer import Writer, header

__all__ = ["generate_torch"]


def _signature(plan: Plan, *lead: str) -> str:
    params = [f"{mangle(n)}={v!r}" for n, v in plan.params]
    return ", ".join([*lead, *(["*", *params] if params else [])])


def _pass_params(plan: Plan) -> str:
    """``, param_a=param_a, ...``: the parameters passed on to a function of this module."""
    return "".join(f", {mangle(n)}={mangle(n)}" for n in plan.param_names)


def _fixed_by_torch_forward(plan: Plan) -> tuple[tuple[str, float], ...]:
    """The parameters (name, PyTorch's default) a table's torch_forward does not read: PyTorch's function
    holds them at the built-in's defaults (F.selu's scale and alpha), whatever values the table was fitted
    for, so the forward computes the formula for other values."""
    if not plan.torch_forward:
        return ()
    read = {node.id for node in ast.walk(ast.parse(plan.torch_forward, mode="eval")) if isinstance(node, ast.Name)}
    owner = next(e for e in CATALOG if e.torch_forward == plan.torch_forward)  # checked: a built-in's own
    return tuple((n, float(owner.params[n])) for n, _ in plan.params if n not in read)


def _tuple_text(items) -> str:
    """A Python tuple of the texts ``items``, as printed: ``(a,)``, ``(a, b)``."""
    items = list(items)
    return f"({', '.join(items)}{',' if len(items) == 1 else ''})"


def _breaks(breaks) -> str:
    items = "".join(f"({to_python(v)}, {side!r}), " for v, side in breaks)
    return f"({items.rstrip(' ')})" if breaks else "()"


def _meta(w: Writer, plan: Plan) -> None:
    text = pprint.pformat(plan.meta, width=100, sort_dicts=False)
    w(*f"META = {text}".splitlines())
    classes = tuple((c.code, c.offset, c.n_segments, c.break_offset) for c in plan.classes)
    w("# sha256 of the table's content this code was generated from: invact refuses the module when",
      "# generated/tables/NAME.json next to it holds another (run `invact generate`)",
      f"TABLE_SHA256 = {plan.meta['sha256']!r}",
      "NAME = META['name']", f"PARAMS = {plan.param_names!r}",
      "# their keyword names in this module's functions (invact.ops passes them; never a local's name)",
      f"PARAM_ARGS = {tuple(mangle(n) for n in plan.param_names)!r}", f"CODE_BITS = {plan.code_bits}",
      "# Code classes: (code, first segment, number of segments, first y threshold); the first is",
      "# taken where the code matches no other (invact.selection).",
      f"CLASSES = {classes!r}",
      "# Per y threshold: True where its break belongs to the left side (passed where `y > t`), else",
      "# False (`y >= t`); a threshold is the break itself, never a subnormal (invact.bitpack.threshold).",
      f"Y_STRICT = {tuple(side == 'left' for c in plan.classes for _, side in c.y_breaks)!r}", "")


def _poly_table(w: Writer, plan: Plan) -> None:
    coeffs = ", ".join([f"c{j}" for j in range(1, plan.degree + 1)] + [f"d{j}" for j in range(1, plan.den_degree + 1)])
    w("# One row per segment (all code classes, left to right in y); zeros for exact/constant ones:",
      f"# transform id, center, scale, c0_hi, c0_lo{', ' + coeffs if coeffs else ''}. Transforms:")
    for i, tf in enumerate(plan.transforms):
        w(f"#   {i}: {tf.kind}" + (f", sign {tf.sign:+.0f}, root {tf.root}" if tf.kind == "power" else
                                  f", sign {tf.sign:+.0f}, origin {' + '.join(map(repr, tf.origin))}"
                                  if tf.kind != "identity" else ""))
    with w.block("POLY = ("):
        for row in plan.poly:
            w("(" + ", ".join(repr(v) for v in row) + "),")
    w(")")
    transforms = tuple((tf.kind, int(tf.sign), tuple(float(o) for o in tf.origin)) for tf in plan.transforms)
    w("# (kind, sign, origin terms) of each transform id",
      f"TRANSFORMS = {transforms!r}",
      "# Every segment a polynomial row of POLY (no closed forms, rationals or NaN values): what the",
      "# fused CPU backward evaluates (invact.cpu_kernel)",
      f"FUSED_CPU = {_fused_cpu(plan)!r}", "", "")


def _fused_cpu(plan: Plan) -> bool:
    return bool(plan.has_poly and plan.degree >= 1 and not (plan.exact or plan.constant or plan.den_degree
                                                            or plan.nan_values)
                and all(tf.kind != "power" for tf in plan.transforms))   # no power tails (invact.cpu_kernel)


def _flat_kernels(w: Writer, plan: Plan) -> None:
    """What invact.ops runs (and compiles: one code object per activation, so torch.compile's
    cache of one activation never evicts another's): packed code, and the gradient of flat y."""
    with w.block("def code_packed(x, thr):"):
        w('"""The packed forward code of flat x (invact.bitpack layout): what the forward op saves."""')
        w("return bitpack.pack(code_kernel(x, thr), CODE_BITS)" if plan.code_bits
          else "return torch.empty(0, dtype=torch.uint8, device=x.device)")
    w("", "")
    with w.block(f"def grad_kernel({_signature(plan, 'out', 'go', 'y', 'packed', 'shift', 'thr', 'poly')}):"):
        w('"""out[:] = g(y, code) * go for flat y whose elements lie in one bit plane: their codes are',
          "``(packed >> shift) & mask`` (``shift`` a 0-d int32 tensor, so one compilation serves every",
          'plane). Contiguous loads only: a per-element byte index would not vectorise."""')
        if plan.code_bits:
            w(f"code = (packed.to(torch.int32) >> shift) & {(1 << plan.code_bits) - 1}")
        else:
            w("code = None")
        w(f"torch.mul(g_kernel(y, code, thr, poly{_pass_params(plan)}), go, out=out)")


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
      "import torch", "import torch.nn.functional as F  # noqa: F401 - used by torch_forward", "",
      "from invact import bitpack, fastmath, selection  # noqa: F401 - fastmath: log, sqrt, where", "")
    _meta(w, plan)
    _poly_table(w, plan)
    with w.block(f"def forward({_signature(plan, 'x')}):"):
        w('"""y = f(x): PyTorch\'s own forward (META torch_forward), else the printed formula."""')
        fixed = _fixed_by_torch_forward(plan)
        names, values = _tuple_text(mangle(n) for n, _ in fixed), _tuple_text(repr(v) for _, v in fixed)
        # torch_forward holds these at their defaults (F.selu): other values take the printed formula
        with w.block(f"if {names} != {values}:") if fixed else contextlib.nullcontext():
            if fixed or not plan.torch_forward:  # a formula: float32 inside, one rounding, as torch's own ops
                with w.block("if x.dtype in (torch.float16, torch.bfloat16):"):
                    w(f"return forward(x.float(){_pass_params(plan)}).to(x.dtype)")
                w(f"return {to_torch(plan.formula, 'x')}")
        if plan.torch_forward:
            w(f"return {mangle_text(plan.torch_forward, plan.param_names)}")
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
        w('"""int32 code of each element of x; thr[j]: `x > thr[j]` (a left-side break) or `x >= thr[j]`',
          '(a right-side one) <=> x is right of break j."""')
        if plan.code_bits:
            emit_code(w, plan, d)
            w("return c")
        else:
            w("return torch.zeros_like(x, dtype=torch.int32)")
    w("", "")
    with w.block(f"def g_kernel({_signature(plan, 'y', 'code', 'thr', 'poly')}):"):
        w('"""g(y, code) = f\'(x): float64 for float64 y, else float32 (y upcast exactly).',
          "",
          "thr: the y_breaks as thresholds t, passed where `y > t` (Y_STRICT) or `y >= t` (concatenated",
          "per class; a tensor, or a tuple of floats when compiled); poly: POLY transposed (row length,",
          "segments).",
          '"""')
        w("y = y.to(torch.float64 if y.dtype == torch.float64 else torch.float32)")
        emit_g(w, plan, d)
        w("return g")
    w("", "")
    _flat_kernels(w, plan)
    return w.text()
