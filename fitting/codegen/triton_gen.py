"""Generate ``generated/triton_NAME.py``: the per-table parts of the fused Triton kernels.

The module defines ``f_x`` (the forward formula), ``code_x`` (the forward code, tables with one),
``g_y`` (g(y, code): segment index, transforms, closed-form segments, NaN values) and, where a binary
search over slots is cheaper than counting thresholds (``SEARCH_LEVELS`` > 0), ``g_search`` (g_y with
the segment index by ``act_triton.search``) as ``@triton.jit`` functions; the kernels' invariant structure (loads, stores, code packing, the POLY row evaluation)
and the launchers are the runtime's ``invact.act_triton``, which takes those functions as
``tl.constexpr`` arguments.
"""

from __future__ import annotations

from .analysis import Plan
from .evaluation import TritonDialect, TritonSearchDialect, emit_code, emit_g, search_levels
from .printer import mangle, to_triton
from .writer import Writer, header

__all__ = ["generate_triton"]


def _params(w: Writer, plan: Plan) -> None:
    """The parameters from the ``params`` tuple (float32 kernel scalars, in PARAMS order)."""
    for i, name in enumerate(plan.param_names):
        w(f"{mangle(name)} = params[{i}]")


def _search_constants(plan: Plan) -> list[str]:
    """SEARCH_LEVELS (0: g_y alone, counting thresholds) and, with a search, NSLOT."""
    levels = search_levels(plan)
    lines = [f"SEARCH_LEVELS = {levels}  # levels of g_search's segment search (invact.common.slots; 0: none)"]
    if levels:
        lines.append(f"NSLOT = tl.constexpr({len(plan.classes) << levels})  # slots: the columns of g_search's P")
    return lines


def generate_triton(plan: Plan) -> str:
    """Source text of the Triton module of ``plan`` (imported only where triton is importable)."""
    w = Writer()
    w(header(plan.source).rstrip("\n"))
    w(f'"""{plan.name}: y = f(x), its code and g(y, code) for the Triton kernels of invact.act_triton."""',
      "", "import triton", "import triton.language as tl", "", "from invact import act_triton", "",
      f"NSEG = tl.constexpr({plan.n_segments})  # segments: the columns of P (POLY transposed)",
      *_search_constants(plan),
      "# sha256 of the table's content this code was generated from (checked by invact.ops at import)",
      f"TABLE_SHA256 = {plan.meta['sha256']!r}", "", "")
    w("@triton.jit")
    with w.block("def f_x(x, params):"):
        w('"""y = f(x) in float32."""')
        _params(w, plan)
        w(f"return {to_triton(plan.formula, 'x', reciprocals=True, forward=True)}")  # y within ulps of PyTorch's
    w("", "")
    if plan.code_bits:
        w("@triton.jit")
        with w.block("def code_x(x, XT):"):
            w('"""int32 forward code: x > XT[j] (x >= XT[j] for a right-side break) <=> x is right of break j."""')
            emit_code(w, plan, TritonDialect())
            w("return c")
        w("", "")
    w("@triton.jit")
    with w.block("def g_y(y, code, YT, P, params, CLAMP: tl.constexpr):"):
        w('"""g(y, code) in float32; YT: the y thresholds, P: POLY transposed, CLAMP: act_triton.row\'s."""')
        _params(w, plan)
        emit_g(w, plan, TritonDialect())
        w("return g")
    w("", "")
    levels = search_levels(plan)
    if levels:
        w("@triton.jit")
        with w.block("def g_search(y, code, YT, P, params, CLAMP: tl.constexpr):"):
            w('"""g_y with the segment index by act_triton.search; YT: its level thresholds, P: POLY by slot."""')
            _params(w, plan)
            emit_g(w, plan, TritonSearchDialect(levels))
            w("return g")
        w("", "")
    code_x = "code_x" if plan.code_bits else "None"
    search = ", g_search" if levels else ""
    w(f"forward, backward = act_triton.launchers(f_x, {code_x}, g_y, {plan.code_bits}{search})")
    return w.text()
