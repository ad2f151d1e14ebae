"""Analysis of a table for code generation: everything the emitters need, no code text.

Segments of all code classes are numbered globally (class by class, left to right in y). Poly
segments get a row of ``POLY`` (the coefficient table gathered per element); so do numeric constant
segments of a table with poly segments (scale 0 and c0 = the value: one evaluation path for all);
exact segments and the constants of other tables are selected by their global index; a closed form
whose expression is not finite and real just past an outer end of its code class's range is
evaluated on y clamped to that end (``Plan.clamps``). A table has few distinct transforms (kind, sign,
origin): they are computed with constants and picked by the row's transform id, so only the
polynomial is gathered. Row layout: transform id, center, scale, c0_hi, c0_lo, c1 .. cD, and when
the table has rational segments d1 .. dN of their denominators (Q = 1 + d1 u + ...; polynomial rows
hold zeros there, so their Q is exactly 1 and dividing by it changes nothing).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sympy as sp

from ...common import float32_scheme as scheme
from ..float32 import half_values
from ..model import Table, Transform
from ..scheme import closed_form_fn
from .printer import parse

__all__ = ["Plan", "ClassPlan", "plan_table", "code_of", "range_clamp"]

Y = sp.Symbol("y", real=True)
End = float | sp.Expr | None      # a clamp's end: a number, a parameter expression, or none (no clamp)


@dataclass(frozen=True)
class ClassPlan:
    code: int
    offset: int                          # global index of its first segment
    n_segments: int
    y_breaks: tuple[tuple[sp.Expr, str], ...]
    break_offset: int                    # index of its first break in the concatenated thresholds


@dataclass(frozen=True)
class Plan:
    name: str
    source: str                          # root-relative table path, for the header
    meta: dict
    params: tuple[tuple[str, float], ...]
    formula: sp.Expr
    torch_forward: str | None
    code_bits: int
    x_breaks: tuple[tuple[sp.Expr, str], ...]
    codes: tuple[int, ...]
    classes: tuple[ClassPlan, ...]
    poly: tuple[tuple[float, ...], ...]  # one row per global segment (zeros for non-poly ones)
    degree: int
    den_degree: int                      # max denominator degree of rational segments (0: none)
    transforms: tuple[Transform, ...]   # distinct transforms of the rows (model.Transform)
    exact: tuple[tuple[int, sp.Expr], ...]
    constant: tuple[tuple[int, sp.Expr], ...]
    nan_values: tuple[tuple[int, sp.Expr], ...] = ()   # (code, g where y is NaN); other codes: NaN
    clamps: tuple[tuple[int, End, End], ...] = ()      # (exact segment, lo, hi): y clamped (range_clamp)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.params)

    @property
    def n_segments(self) -> int:
        return len(self.poly)

    @property
    def n_y_breaks(self) -> int:
        return sum(len(c.y_breaks) for c in self.classes)

    @property
    def has_poly(self) -> bool:
        return bool(self.transforms)

    ROW_TID, ROW_CENTER, ROW_SCALE, ROW_C0 = scheme.ROW_TID, scheme.ROW_CENTER, scheme.ROW_SCALE, scheme.ROW_C0

    @property
    def row_len(self) -> int:
        return self.ROW_C0 + 2 + self.degree + self.den_degree

    @property
    def row_den(self) -> int:
        """Column of d1 (d1 .. dN follow)."""
        return self.ROW_C0 + 2 + self.degree


def _meta(table: dict) -> dict:
    cert = table["certificate"]
    summary = {k: cert[k] for k in ("method", "approx_error", "float32_eval_error", "float32_fma_eval_error",
                                    "checks") if k in cert}
    keys = ("name", "params", "param_generic", "param_domain", "code_bits", "n_codes", "n_branches",
            "torch_forward", "formula", "tolerance")
    meta = {k: table[k] for k in keys}
    meta["certificate"] = summary
    meta["sha256"] = table["sha256"]
    return meta


class _Forms:
    """The form each segment emits (:class:`..model.Emitter`): a POLY row, a closed form or a constant."""

    def __init__(self):
        self.items: list[tuple[str, tuple]] = []

    def row(self, transform, center, scale, coeffs, c0_lo, den):
        if den[0] != 1.0:
            raise ValueError("a rational segment's den must start with 1 (docs/table-format.md)")
        self.items.append(("row", (transform, center, scale, coeffs, c0_lo, den)))

    def closed_form(self, expr):
        self.items.append(("closed_form", (expr,)))

    def constant(self, value):
        self.items.append(("constant", (value,)))


def plan_table(table: dict | Table, source: str | Path) -> Plan:
    """The code-generation plan of a derivative table (a JSON dict or a :class:`..model.Table`)."""
    raw = table.to_json() if isinstance(table, Table) else table
    table = Table.of(table)
    names = tuple(table.params)
    num = lambda text: parse(str(text), "y", names)  # noqa: E731 - numbers or parameter expressions
    forms = _Forms()
    for cc in table.code_classes:
        for seg in cc.segments:
            seg.emit(forms)
    rows_in = [args for form, args in forms.items if form == "row"]
    degree = max((len(coeffs) - 1 for _, _, _, coeffs, _, _ in rows_in), default=0)
    den_degree = max((len(den) - 1 for *_, den in rows_in), default=0)
    classes, rows, exact, constant, transforms = [], [], [], [], []
    break_offset = 0
    items = iter(forms.items)
    clamps = []
    for cc in table.code_classes:
        offset = len(rows)
        breaks = tuple((num(b.value), b.side) for b in cc.y_breaks)
        classes.append(ClassPlan(cc.code, offset, len(cc.segments), breaks, break_offset))
        break_offset += len(breaks)
        for k, seg in enumerate(cc.segments):
            form, args = next(items)
            index = len(rows)
            row = [0.0] * scheme.row_length(degree, den_degree)
            if form == "row":
                tf, center, scale, coeffs, c0_lo, den = args
                if tf not in transforms:
                    transforms.append(tf)
                row[:scheme.ROW_C1] = [float(transforms.index(tf)), center, scale, coeffs[0], c0_lo]
                row[scheme.ROW_C1:scheme.ROW_C1 + len(coeffs) - 1] = coeffs[1:]
                start = scheme.ROW_C1 + degree
                row[start:start + len(den) - 1] = den[1:]
            elif form == "closed_form":
                exact.append((index, signed(parse(args[0], "y", names), table.branches[seg.branch].direction)))
                lo, hi = range_clamp(args[0], seg.y_range, k == 0, k == len(cc.segments) - 1, raw)
                if lo is not None or hi is not None:
                    clamps.append((index, lo, hi))
            elif rows_in and num(args[0]).is_Number:
                row[Plan.ROW_C0] = float(num(args[0]))  # g = (0 * u + 0) + c0: no select on s
            else:
                constant.append((index, num(args[0])))
            rows.append(tuple(row))
    fc = table.forward_code
    nan_values = _nan_values(raw, classes, exact, constant, rows, table.measured_nan_gradients())
    return Plan(
        name=table.name, source=Path(source).as_posix(), meta=_meta(raw),
        params=tuple((n, float(v)) for n, v in table.params.items()),
        formula=parse(table.formula, "x", names), torch_forward=table.torch_forward,
        code_bits=table.code_bits,
        x_breaks=tuple((num(b.value), b.side) for b in fc.x_breaks),
        codes=tuple(fc.codes), classes=tuple(classes), poly=tuple(rows), degree=degree,
        den_degree=den_degree,
        transforms=tuple(transforms), exact=tuple(exact), constant=tuple(constant), nan_values=nan_values,
        clamps=tuple(clamps))


def signed(g: sp.Expr, direction: str) -> sp.Expr:
    """A closed form g of a branch clamped to the branch's sign: f' >= 0 where f increases, <= 0 where it
    decreases, which g(y) computed from a rounded y need not be (ELU's alpha + y is negative where bfloat16
    rounds y = -alpha(1 - e^x) below -alpha, e.g. alpha = 1.1). sympy drops the clamp where it can prove it
    idle (g = 1); a g without y (a parameter) is left to the parameter's domain."""
    if not g.free_symbols & {sp.Symbol("y", real=True)}:
        return g
    if direction == "increasing":
        return sp.Max(g, 0)
    if direction == "decreasing":
        return sp.Min(g, 0)
    return g


def range_clamp(expr: str, y_range, first: bool, last: bool, table: dict) -> tuple[End, End]:
    """(lo, hi) to clamp y to before closed form ``expr`` of a segment over ``y_range`` is evaluated
    (None: no clamp at that end). Only an outer end of the code class (``first``: its lower end;
    ``last``: its upper one) can be passed by a y the segment index gives the segment; only a finite
    one is clamped, and only where the expression is not finite and real just past it: at the first
    value past the end in float64, float32, bfloat16 and float16 (float32 y: hrat x/(1 + |x|)^2 rounds
    y = -0.25000003 below its minimum -0.25, where sqrt(4y + 1) is NaN). sigmoid's y(1 - y), tanh's
    1 - y^2 or ELU's alpha + y are real past their ends and get no clamp. The clamp is the identity on
    every y of the range (it moves only y past the end, and NaN stays NaN), so the generated g of those
    y keeps its bits and the table's certificate stays valid. The ends of a table generic in its
    parameters are the parameter expression where the expression stops being real (a zero of a
    radicand, a log's argument or a denominator) that equals the stored end at the fitted values,
    rounded to float32 at run time (to nearest: it may lie half an ulp past the end); where none
    does, that end is not clamped."""
    params = tuple(sorted(table["params"].items()))
    fn = closed_form_fn(expr, params)
    ends = []
    for end, check, up in ((y_range[0], first, False), (y_range[1], last, True)):
        end = float(end)
        if not check or not math.isfinite(end) or all(
                np.isfinite(fn(np.array([v], dtype))).all() for v, dtype in _past(end, up)):
            ends.append(None)
        elif table["param_generic"] and params:
            ends.append(_symbolic_end(parse(expr, "y", tuple(k for k, _ in params)), end, params))
        else:
            ends.append(end)
    return ends[0], ends[1]


def _past(end: float, up: bool) -> list[tuple[float, type]]:
    """The first value past ``end`` (above it where ``up``, else below) in each dtype y is stored in,
    with the dtype g is computed in there: float64 in float64; float32, bfloat16 and float16 in float32."""
    out = []
    for dtype in (np.float64, np.float32):
        v = dtype(end)
        while (v <= end) if up else (v >= end):
            v = np.nextafter(v, dtype(math.inf if up else -math.inf))
        out.append((float(v), dtype))
    for half in ("bf16", "fp16"):
        values = _half_values(half)
        k = int(np.searchsorted(values, end, side="right")) if up else int(np.searchsorted(values, end)) - 1
        if 0 <= k < len(values):
            out.append((float(values[k]), np.float32))
    return out


@functools.lru_cache(maxsize=2)
def _half_values(dtype: str) -> np.ndarray:
    return half_values(dtype)


def _symbolic_end(g: sp.Expr, value: float, params: tuple) -> sp.Expr | float | None:
    """The zero of a radicand, log argument or denominator of ``g`` in y that is ``value`` at the
    fitted parameters (a number where it has no parameter), or None."""
    found = set()
    for a in g.atoms(sp.Pow, sp.log):
        base = a.args[0]
        if base.has(Y) and (isinstance(a, sp.log) or not a.exp.is_integer or a.exp.is_negative):
            with contextlib.suppress(NotImplementedError, ValueError, TypeError):
                found.update(sp.solve(base, Y))
    at = {sp.Symbol(n, real=True): v for n, v in params}
    for end in sorted(found, key=sp.default_sort_key):
        with contextlib.suppress(TypeError, ValueError):
            if math.isclose(float(end.subs(at)), value, rel_tol=1e-12, abs_tol=1e-300):
                return end if end.free_symbols else float(value)
    return None


def code_of(codes: tuple[int, ...], x: float) -> int:
    """The forward code the generated kernels give x when x is NaN or +-inf (every comparison with
    NaN is false): what :func:`.evaluation.TorchDialect.interval_code` and the Triton dialect emit."""
    k = len(codes) - 1
    if k == 0 or x == -math.inf:
        return codes[0]
    if x == math.inf:
        return codes[k]
    if list(codes) == list(range(k + 1)):                  # sum of (x >= thr[j]): 0
        return codes[0]
    if k == 1 and list(codes) == [1, 0]:                   # (x < thr[0]): 0
        return codes[1]
    return codes[0]                                        # where-chain from codes[0]


def _nan_values(table, classes, exact, constant, rows, measured) -> tuple[tuple[int, sp.Expr], ...]:
    """Per code, g where the stored y is NaN: PyTorch's derivative at the inputs x in {NaN, -inf, +inf}
    whose y is NaN and whose forward code is that code, where it is one finite value on both of
    PyTorch's paths (relu at NaN: 1; leaky_relu: negative_slope; hardswish at -inf: 0), as the
    table's ``nan_gradients`` give them (measured by the fitter: :mod:`..pytorch_probe`). Written as
    the code class's constant-valued segment with that value (so parameters stay symbolic), or as the
    number for tables without generic parameters. Elsewhere NaN, as the float32 scheme gives. Tables
    without a PyTorch forward (user formulas) keep NaN."""
    found: dict[int, set] = {}
    for x, values in measured:
        found.setdefault(code_of(tuple(table["forward_code"]["codes"]), x), set()).update(values)
    defaults = {sp.Symbol(n, real=True): v for n, v in table["params"].items()}
    y = sp.Symbol("y", real=True)
    symbolic = dict(exact + constant)                      # segment index -> expression (no POLY row)
    out = []
    for cls in classes:
        values = found.get(cls.code, set())
        if len(values) != 1 or not math.isfinite(value := next(iter(values))):
            continue
        in_class = range(cls.offset, cls.offset + cls.n_segments)
        candidates = [symbolic[i] for i in in_class if i in symbolic and not symbolic[i].has(y)]
        candidates += [sp.Float(rows[i][Plan.ROW_C0]) for i in in_class       # numeric constant rows
                       if i not in symbolic and rows[i][Plan.ROW_SCALE] == 0.0 and not any(rows[i][Plan.ROW_C0 + 1:])]
        match = [e for e in candidates if float(e.subs(defaults)) == value]
        if match:
            out.append((cls.code, match[0]))
        elif not table["param_generic"]:
            out.append((cls.code, sp.Float(value)))
    return tuple(out)
