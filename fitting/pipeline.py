"""Formula -> branches -> exact forms or piecewise fits -> code classes -> certified table (a dict)."""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable

import numpy as np
import sympy as sp

from ..common.params import holds
from .branches import Analysis, Branch, _code_breaks, _codes_clash, analyze
from .certify import (EVAL_KEYS, certify_table, check_fp32_samples, segment_end_values, worst_fp32_value,
                      worst_value)
from .domain import time_limit
from .errors import CertificationError, FitError, InputError, ScaleError, SpecError
from .exact import _agrees, exact_expression
from .fit import F32_SLACK, branch_layout, fit_branch, layout_cost, table_cost
from .float32 import F32_MAX, TINY32, f32, f32_below, half_values, ordinal_nodes
from .formulas import X, ActivationSpec
from .model import (Break, CodeClass, ConstantSegment, ExactSegment, ForwardCode, Segment, Table, TableBranch,
                    nan_gradients_json, number)
from .numeric import LIMIT_SECONDS
from .pieces import removable_note
from .power_tail import fit_power_tail
from .pytorch_probe import nan_gradients
from .reference import BranchReference
from .scan import NEAR_POINTS, SCAN, scan_grid, unresolved_at, unresolved_changes
from .segments import SCALE_MISS

__all__ = ["build_table", "TARGETS", "RATIONAL_MODES", "FORMAT_VERSION"]

TARGETS = ("derivative", "inverse")
RATIONAL_MODES = ("auto", "never", "prefer")
FORMAT_VERSION = 1
VERSION = "0.1.0"
MIN_TOLERANCE = 2e-8     # the tightest bound float32 coefficients can represent
MAX_TOLERANCE = 1e-2     # the loosest bound on g's error that is still a gradient (see build_table)


def build_table(spec: ActivationSpec, target: str = "derivative", tolerance: float = 5e-8,
                fp32_samples: int = 2**24, progress: Callable[[str], None] | None = None,
                rationals: str = "auto") -> dict:
    """A complete, certified table (without its sha256) for ``spec``.

    ``rationals``: "auto" (rational pieces where they make the table cheaper to evaluate,
    ``fit.table_cost``), "never" (polynomials only) or "prefer" (a rational layout on every fitted
    branch that has one meeting the tolerance, whatever it costs; for comparisons and tests)."""
    if target not in TARGETS:
        raise InputError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if rationals not in RATIONAL_MODES:
        raise InputError(f"rationals must be one of {', '.join(RATIONAL_MODES)}, got {rationals!r}")
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance > 0):
        raise InputError(f"tolerance must be a positive number, got {tolerance!r}")
    if tolerance < MIN_TOLERANCE:
        raise FitError(f"tolerance {tolerance:g} is below what float32 coefficients can represent",
                       None, "use --tolerance 2e-8 or more")   # MIN_TOLERANCE, as --help writes it
    if tolerance > MAX_TOLERANCE:
        raise FitError(f"tolerance {tolerance:g} is above {MAX_TOLERANCE:g}: g's error is absolute where "
                       "|g| < 1 and relative above, so a tolerance near 1 lets g be 0; 1e-2 is already "
                       "coarser than bf16's rounding", None, f"use --tolerance {MAX_TOLERANCE:g} or less")
    check_fp32_samples(fp32_samples)
    say = progress or (lambda msg: None)
    say(f"{spec.name}: analysing branches")
    options: dict[int, list[list[Segment]]] = {}
    exprs: dict[int, sp.Expr] = {}
    try:
        analysis = analyze(spec)
        for b in analysis.branches:
            say(f"{spec.name}: branch {b.index} ({b.direction}, x in [{b.x_range[0]:.4g}, {b.x_range[1]:.4g}])")
            options[b.index], exprs[b.index] = _branch_segments(b, spec, target, tolerance, rationals)
    except ScaleError as exc:
        raise ScaleError(f"{spec.name!r}: {exc}; {_scale_advice(spec)}") from None
    per_branch = _cheapest_table(options, analysis.n_codes) if rationals == "auto" else \
        {i: opts[-1] for i, opts in options.items()}
    generic = bool(spec.params) and all(not s.fitted for segs in per_branch.values() for s in segs) \
        and all(e is None or not _numeric_only(e, b) for b in analysis.branches for e in [exprs[b.index]])
    domain = _param_domain(spec, [e for e in exprs.values() if e is not None], analysis) if generic else None
    if domain is not None and not _generic_holds(analysis, per_branch, exprs, spec, domain, target):
        domain = None     # the table of some values in the domain differs: made for the fitted values only
    generic = domain is not None
    branches = [_branch_json(b, per_branch[b.index]) for b in analysis.branches]
    if not generic:    # closed forms with the parameters' values (the branches' tails keep their text)
        per_branch = {i: [s.substituted(spec.params) for s in segs] for i, segs in per_branch.items()}
    table = Table("invact-table", FORMAT_VERSION, VERSION, spec.name, sp.sstr(spec.expr), dict(spec.params),
                  generic, domain if generic else list(spec.domain), spec.torch_forward, target,
                  float(tolerance), analysis.n_branches,
                  analysis.n_codes, analysis.code_bits, _forward_code(analysis, spec, generic), branches,
                  _code_classes(analysis, per_branch, spec, generic),
                  nan_gradients=nan_gradients_json(nan_gradients(spec.torch_forward, spec.params)))
    say(f"{spec.name}: certifying")
    try:
        table.certificate = certify_table(table, fp32_samples=fp32_samples, analysis=analysis,
                                          progress=lambda frac, label: say(f"{spec.name}: {label}"))
    except ScaleError as exc:    # a proof shows an error that float64 samples do not see (segments._proved)
        raise ScaleError(f"{exc}; {_scale_advice(spec)}") from None
    bad = [b["index"] for b in table.certificate["branches"]
           if not all(math.isfinite(b[k]) for k in ("approx_error", *EVAL_KEYS))]
    if bad:   # the fitter checks every segment first: reaching this is a bug, never a table to write
        raise CertificationError(f"{spec.name}: branch {bad[0]} evaluates to inf or NaN where g is finite")
    missed = [(b["index"], max(b[k] for k in EVAL_KEYS)) for b in table.certificate["branches"]]
    missed = [(i, e) for i, e in missed if e > SCALE_MISS * tolerance + F32_SLACK and target == "derivative"]
    if missed:   # g missed far beyond the fit's bound (an inverse's float32 error is not gated: fit.py)
        raise _missed_error(table, analysis.branches[missed[0][0]], missed[0][1], tolerance, spec, fp32_samples)
    return table.to_json()


# ---------------------------------------------------------------------------------------------

def _missed_error(table: Table, b: Branch, missed: float, tolerance: float, spec: ActivationSpec,
                  fp32_samples: int) -> Exception:
    """The refusal of a certified table whose float32 checks found branch ``b``'s g missed by ``missed``,
    more than SCALE_MISS tolerances (the fitter's and its proof's bound is the tolerance), at its worst
    bf16, fp16 or segment-end value y, or where none shows it, the worst of the stratified fp32 sample
    (``fp32_samples``): a ScaleError where g itself changes by more than that from y to a neighbouring
    float32 value (x + tanh(1e12*(x - 1))/1e12: g(1) = 2, 1 next to it), which no piecewise polynomial
    in y follows, or where f' at x = f^-1(y) departs from f' at the scan's grid points either side
    (:func:`.scan.unresolved_at`: x + tanh(1e8*(x - 0.001))/1e4 rises within 1e-8 of 0.001, between
    the grid points 0 and 0.006, where g is 1e4 and the table's 1); else a CertificationError (a bug)."""
    ref = BranchReference(b, table.target)
    ys = np.concatenate([half_values("bf16"), half_values("fp16"), segment_end_values(table, b.index)])
    y, err = worst_value(table, b.index, ref, ys)
    if not err > SCALE_MISS * tolerance:
        y, err = worst_fp32_value(table, b.index, BranchReference(b, table.target, bulk=True), fp32_samples)
    if err > SCALE_MISS * tolerance:
        near = np.float32(y)
        steps = np.array([np.nextafter(near, np.float32(-np.inf)), near, np.nextafter(near, np.float32(np.inf))],
                         dtype=np.float64)
        g = ref(steps)
        x = float(ref.inverse(steps[1:2])[0])
        misses = f"{spec.name!r}: branch {b.index}: the table misses g by {err:.3g} at y = {y:.9g}"
        if np.max(np.abs(np.diff(g)) / np.maximum(1.0, np.abs(g[1]))) > SCALE_MISS * tolerance:
            return ScaleError(f"{misses}, where g goes from {g[0]:.6g} to {g[1]:.6g} to {g[2]:.6g} over three "
                              f"neighbouring float32 values of y: f changes near x = {x:.9g} on a scale of x finer "
                              f"than the scan resolves; {_scale_advice(spec)}")
        grid = unresolved_at(ref.fp, x, *b.x_range, b.removable)
        if grid is not None:
            (xa, xb), (ga, gb) = grid, ref.fp(np.array(grid))
            return ScaleError(f"{misses} (x = {x:.9g}), where g is {g[1]:.6g} while it is {ga:.6g} and {gb:.6g} at "
                              f"the scan's neighbouring grid points x = {xa:.9g} and {xb:.9g}: f changes between "
                              f"them on a scale of x finer than the scan resolves; {_scale_advice(spec)}")
    return CertificationError(f"{spec.name}: branch {b.index}: the float32 checks found g missed by {missed:.3g}, "
                              f"beyond {SCALE_MISS:g} times the tolerance {tolerance:g} (the fitter should have refined)")


def _scale_advice(spec: ActivationSpec) -> str:
    """What sets f's scale in x, for a :class:`ScaleError`: the parameters' values, else the formula."""
    if not spec.params:
        return ("rescale x in the formula so that f changes over a range of x the scan resolves, or shift it "
                f"nearer 0: the scan's grid is finest for |x| <= {SCAN:g} (spacing {2 * SCAN / (NEAR_POINTS - 1):g}) "
                "and coarser farther out")
    values = ", ".join(f"{name} = {value:g}" for name, value in spec.params.items())
    return f"the parameter values {values} set that scale: choose values that keep it within the scans' resolution"


def _values(spec):
    return {sp.Symbol(n, real=True): v for n, v in spec.params.items()}


def _numeric_only(expr: sp.Expr, b: Branch) -> bool:
    """True when an exact form lost the parameter names its piece has (solved with values substituted)."""
    params = b.sym_expr.free_symbols - {X}
    return bool(params) and not (expr.free_symbols & params)


def _branch_segments(b: Branch, spec: ActivationSpec, target: str, tol: float,
                     rationals: str = "auto") -> tuple[list[list[Segment]], sp.Expr | None]:
    """(the branch's segment lists to choose from, polynomial first; its exact expression or None)."""
    lo, hi = b.y_range
    if b.flat:
        value = "0" if target == "derivative" else repr(float(b.x_range[1]))
        return [[ConstantSegment([lo, hi], b.index, value)]], None
    expr = exact_expression(b, spec, target)
    if expr is not None:
        seg = ExactSegment([lo, hi], b.index, sp.sstr(expr))
        if _exact_float32_error(b, target, seg, spec.params) <= tol + F32_SLACK:
            return [[seg]], expr
        # a closed form that float32 cannot evaluate (Cardano's cancels for x**3 + x): fit instead
    if b.removable:
        raise SpecError(f"{spec.name!r}: branch {b.index} (x in [{b.x_range[0]:g}, {b.x_range[1]:g}]) has no closed "
                        f"form and needs a fitted g; {removable_note(b.removable[0])}")
    return _fitted_segments(b, target, tol, rationals), None


def _exact_float32_error(b: Branch, target: str, seg: ExactSegment | dict, params: dict) -> float:
    """The float32 scheme error of an exact segment (or its JSON) at float32 y spread evenly in
    float32 order over the branch, its ends included (x/sqrt(1 + x^2)'s closed form is NaN at y = +-1)."""
    seg = seg if isinstance(seg, Segment) else Segment.from_json(seg)
    ends = [f32(v) for v in b.y_range if math.isfinite(v) and abs(v) <= F32_MAX]
    y = np.concatenate([ordinal_nodes(*b.y_range), ends])
    return seg.scheme_error(BranchReference(b, target), y, params)


def _cheapest_table(options: dict[int, list[list[Segment]]], n_codes: int) -> dict[int, list[Segment]]:
    """One segment list per branch: the combination of the fitted branches' layouts (polynomial, or
    rational where one was cheaper for the branch alone) whose ``table_cost`` is lowest; ties keep
    polynomials (the first option). A rational piece makes every element of the table pay for its
    denominator and division, so it must win for the table, not only for its branch."""
    def layout(segs):
        fitted = [s for s in segs if s.fitted]
        return branch_layout(fitted) if fitted else None

    best, best_cost = None, math.inf
    for combo in itertools.product(*(range(len(options[i])) for i in sorted(options))):
        chosen = {i: options[i][k] for i, k in zip(sorted(options), combo)}
        cost = table_cost([lay for segs in chosen.values() if (lay := layout(segs))], n_codes)
        if cost < best_cost:
            best, best_cost = chosen, cost
    return best


def _param_domain(spec: ActivationSpec, closed_forms=(), analysis: Analysis | None = None) -> list[str] | None:
    """``spec.domain`` and the relations that keep a parameter-generic table valid: every x-free
    parameter expression whose sign the table relies on keeps the sign it has at the fitted values.
    Those are, in the formula and in the table's closed forms ``closed_forms`` (sympy, in x or y): a
    denominator, the argument of a log or the base of a fractional power, a factor multiplying the
    variable (its sign decides a branch's direction: b*x**2 is decreasing then increasing only for
    b > 0); a closed form without y (f' itself, constant on its branch: b*x + Abs(x)'s b - 1 for x < 0
    needs b > 1); and what decides where each piece of the formula holds (:func:`_piece_conditions`:
    Max(x, b*x) takes b*x for x < 0 only while b < 1). Factors of known sign (exp, even powers,
    b**2 + 1) keep none. Examples: log(1 + exp(b*x))/b: 'b > 0' for b = 1; 2*sqrt(b)*sqrt(y): 'b > 0'.
    Relations are table text (invact.common.params.holds: numbers, parameter names, + - * /, one
    comparison), checked by the runtime (its ParamError names the parameter). None when a condition
    cannot be kept that way (an expression that is 0 at the fitted values, or not rational in the
    parameters): the table is then made for the fitted values only. With the fitted values' branch
    ``analysis``, also the relations of :func:`_signed_zero_relations` (two branches sharing a code at
    y = 0 stay told apart there: selu's 'scale >= 1'). :func:`_generic_holds` then compares the table
    with the analysis at values spread over the domain."""
    out = list(spec.domain)
    syms = set(spec.symbols.values())
    values = {sym: spec.params[name] for name, sym in spec.symbols.items()}
    variables = {X, sp.Symbol("y", real=True)}
    conditions: list[sp.Expr] = []

    def free(e):   # an x-free expression in the parameters
        return not (e.free_symbols & variables) and bool(e.free_symbols & syms)

    for expr in (spec.expr, *closed_forms):
        for node in sp.preorder_traversal(expr):
            if isinstance(node, sp.Mul) and node.free_symbols & variables:
                conditions.append(node.as_independent(*variables, as_Add=False)[0])
            if isinstance(node, sp.Pow) and free(node.base) and not (node.exp.is_integer and node.exp.is_positive):
                conditions.append(node.base)
            if isinstance(node, sp.log) and free(node.args[0]):
                conditions.append(node.args[0])
    conditions += [sp.factor(g) for g in closed_forms if free(g)]   # f' of its branch: the direction
    pieces = _piece_conditions(spec, values)
    if pieces is None:
        return None
    for cond in conditions + pieces:
        for factor in sp.Mul.make_args(cond):
            # a power keeps its base's sign (a fractional one needs a positive base anyway), an even one is
            # >= 0 whatever it (its base != 0 is kept where it divides); exp > 0
            even = isinstance(factor, sp.Pow) and factor.exp.is_integer and factor.exp.is_even and factor.exp > 0
            base = factor.base if isinstance(factor, sp.Pow) else factor
            if not free(base) or isinstance(base, sp.exp) or even or base.is_positive or base.is_negative:
                continue
            relation = _sign_relation(base, values)
            if relation is None:
                return None
            if relation not in out:
                out.append(relation)
    if analysis is not None:
        zero = _signed_zero_relations(analysis, spec, values)
        if zero is None:
            return None
        out += [rel for rel in zero if rel not in out]
    return _tightest(out, spec.domain)


def _signed_zero_relations(analysis: Analysis, spec: ActivationSpec, values: dict) -> list[str] | None:
    """The relations that keep the table's codes apart where two branches sharing a code meet at y = 0
    (:func:`.branches._signed_zero_clash`: branches whose g differ there take codes of their own once
    the branch that does not own y = 0 has |g| < 1 there, as its tiny x then round y to a signed zero
    that y cannot tell from the owner's). Where the fitted values gave such a pair one code, the
    non-owner's g at y = 0 (its f' at the x end where y = 0, a parameter expression G) keeps |G| >= 1:
    'G >= 1' or 'G <= -1' as G is at the fitted values (selu: 'scale >= 1', the slope of x > 0 next
    to the owner x <= 0; b*x + Abs(x) at b = 2: 'b >= 2', the slope b - 1 of x < 0 next to the owner
    x >= 0). None (the table is then made for the fitted values only) where that cannot be kept: the
    two g agree only at the fitted values with |G| < 1 there, or G or the x where y = 0 is not an
    expression the relations can write. Pairs on codes of their own keep nothing: their stored code
    (the x side) tells them apart whatever the parameters."""
    out = []
    for a, b in itertools.combinations(analysis.branches, 2):
        if a.code != b.code or a.flat or b.flat:
            continue
        lo, hi = (a, b) if a.y_range[0] < b.y_range[0] else (b, a)
        if lo.y_range[1] != hi.y_range[0]:
            continue
        if hi.y_range[0] != 0.0:   # they meet at y0 != 0: y0 keeps its sign, never moving onto y = 0
            meeting = _meeting_relation(lo, hi, spec, values)
            if meeting is None:
                return None
            if meeting and meeting not in out:
                out.append(meeting)
            continue
        # the owner of y = 0 as _signed_zero_clash (and _branch_break) decide it
        lo_owns = (lo.y_closed[1] and not hi.y_closed[0]) or not (lo.y_closed[1] or hi.y_closed[0])
        g_lo, g_hi = _slope_at_zero(lo, "upper", spec), _slope_at_zero(hi, "lower", spec)
        if g_lo is None or g_hi is None:
            return None
        other = g_hi if lo_owns else g_lo
        try:
            at = float(other.subs(values))
        except (TypeError, ValueError):
            return None
        if not math.isfinite(at):
            return None
        if abs(at) < 1.0:     # one code only because both g agree at the fitted values
            if sp.simplify(g_lo - g_hi) != 0:
                return None   # they agree there only: no relation of holds' syntax keeps that
            continue
        if not (other.free_symbols & set(values)):
            continue          # a number: |G| >= 1 whatever the parameters
        bound = other - 1 if at > 0 else other + 1
        relation = _linear_relation(bound, at > 0, or_equal=True)
        if relation is None:
            text = _arith_text(other)
            if text is None:
                return None
            relation = f"{text} >= 1" if at > 0 else f"{text} <= -1"
        if relation not in out:
            out.append(relation)
    return out


def _meeting_relation(lo: Branch, hi: Branch, spec: ActivationSpec, values: dict) -> str | None:
    """The relation keeping the y where branches ``lo`` and ``hi`` (one code) meet on the side of 0 it has
    at the fitted values ('c > 0' for Piecewise((a*x + c, x < 0), (b*x + c, True)) at c = 0.5: at c = 0
    the signed-zero rule would need codes of their own); "" where that y is a number; None where it
    cannot be written (the table is then made for the fitted values only)."""
    y0 = _meeting_y(hi, spec)
    if y0 is None:
        return None
    if not (y0.free_symbols & set(values)):
        return ""
    return _sign_relation(y0, values)


def _slope_at_zero(b: Branch, which: str, spec: ActivationSpec) -> sp.Expr | None:
    """f' of branch ``b`` (its piece's symbolic expression) at the x where its ``which`` y end is, as an
    expression in the parameters: its limit from inside the branch where f' is not finite there; None
    where that x is not a piece boundary of the formula (:func:`_symbolic_boundary`) or no limit is found."""
    x0 = b.x_at_y_end(which)
    xs = _symbolic_boundary(x0, spec)
    if xs is None or not math.isfinite(x0):
        return None
    fp = sp.diff(b.sym_expr, X)
    try:
        g = sp.simplify(fp.subs(X, xs))
        if g.has(sp.nan, sp.zoo, sp.oo, -sp.oo):
            g = sp.simplify(sp.limit(fp, X, xs, "+" if x0 == b.x_range[0] else "-"))
    except (NotImplementedError, TypeError, ValueError):
        return None
    if g.has(sp.nan, sp.zoo, sp.oo, -sp.oo) or g.free_symbols & {X, sp.Symbol("y", real=True)}:
        return None
    return g


def _piece_conditions(spec: ActivationSpec, values: dict) -> list[sp.Expr] | None:
    """The x-free parameter expressions whose signs decide where each piece of the formula holds (Max,
    Min, Abs, sign and Heaviside are the Piecewise they rewrite to): for each condition comparing u with
    v, u - v itself where it has no x (Piecewise((x, b > 0), ...)); where it is a*x + c, a (which side of
    its zero -c/a the piece takes: Max(x, b*x) is x for x > 0 while 1 - b > 0) and the differences of
    consecutive zeros (their order: Max(Min(x, b), -b) needs -b < b). None when two different zeros
    coincide at the fitted values (their order is unknown). Conditions of other shapes (x**2 < c) keep no
    sign here; :func:`_generic_holds` compares the tables they give."""
    syms = set(values)
    sym = sp.piecewise_fold(spec.expr.rewrite(sp.Piecewise))
    out, zeros = [], []
    for rel in sorted(sym.atoms(sp.Rel), key=sp.default_sort_key):
        d = sp.expand(rel.lhs - rel.rhs)
        if isinstance(rel, (sp.Eq, sp.Ne)) or not d.free_symbols & syms:
            continue
        if X not in d.free_symbols:
            out.append(sp.factor(d))
        elif d.is_polynomial(X) and sp.degree(d, X) == 1:
            a, c = sp.Poly(d, X).all_coeffs()
            out.append(sp.factor(a))
            zeros.append(sp.simplify(-c / a))
    try:
        placed = sorted((float(z.subs(values)), z) for z in dict.fromkeys(zeros))
    except (TypeError, ValueError):   # a zero that is not a real number at the fitted values
        return None
    for (v0, z0), (v1, z1) in zip(placed, placed[1:]):
        gap = sp.factor(sp.simplify(z1 - z0))
        if gap.free_symbols & syms:
            if v0 == v1:
                return None
            out.append(gap)
    return out


def _sign_relation(expr: sp.Expr, values: dict) -> str | None:
    """'E > 0' or 'E < 0' (E ``expr`` in + - * / text), the side of 0 ``expr`` has at ``values`` (linear
    ones as :func:`_linear_relation` writes them: 'b < 1' for 1 - b); None if it is 0 there or not
    rational in the parameters."""
    try:
        v = complex(expr.subs(values).evalf())
    except (TypeError, ValueError):
        return None
    if v.imag != 0 or not math.isfinite(v.real) or v.real == 0:
        return None
    linear = _linear_relation(expr, v.real > 0)
    if linear is not None:
        return linear
    text = _arith_text(expr)
    return None if text is None else f"{text} {'>' if v.real > 0 else '<'} 0"


def _linear_relation(expr: sp.Expr, above: bool, or_equal: bool = False) -> str | None:
    """``expr`` > 0 (``above``) or < 0 (>= 0 or <= 0 with ``or_equal``) for ``expr`` linear in the
    parameters with number coefficients, written the same whatever its sign: one parameter against its
    bound ('b < 1' for 1 - b > 0), more with the positive terms on the left, the first parameter's
    among them ('a < b' for b - a > 0); None for other expressions."""
    names = sorted(expr.free_symbols, key=lambda s: s.name)
    if not expr.is_polynomial(*names):
        return None
    poly = sp.Poly(expr, *names)
    if poly.total_degree() != 1 or not all(c.is_Number for c in poly.coeffs()):
        return None
    coef, const = [poly.coeff_monomial(n) for n in names], poly.coeff_monomial(1)
    if coef[0] < 0:
        coef, const, above = [-c for c in coef], -const, not above
    op = (">" if above else "<") + ("=" if or_equal else "")
    if len(names) == 1:
        return f"{names[0].name} {op} {_number_text(-const / coef[0])}"

    def term(c, n):
        return n.name if c == 1 else f"{_number_text(c)}*{n.name}"

    left = " + ".join(term(c, n) for c, n in zip(coef, names) if c > 0)
    right = " + ".join(term(-c, n) for c, n in zip(coef, names) if c < 0)
    if const != 0:
        right = f"{right} {'-' if const > 0 else '+'} {_number_text(abs(const))}" if right else _number_text(-const)
    return f"{left} {op} {right or '0'}"


def _tightest(relations: list[str], kept: tuple[str, ...]) -> list[str]:
    """``relations`` less the one-parameter bounds another implies ('b > 0' beside 'b > 1', 'b > 1'
    beside 'b >= 2'); those in ``kept`` (the activation's own domain) stay as written."""
    bounds = {}
    for rel in relations:
        name, op, bound = (rel.split(" ") + ["", ""])[:3]
        if rel not in kept and op in ("<", ">", "<=", ">=") and name.isidentifier():
            try:
                bounds[rel] = (name, op, float(sp.Rational(bound)))
            except (TypeError, ValueError):
                pass

    def implied(rel):
        name, op, b = bounds[rel]
        up = op[0] == ">"     # a lower bound on name

        def tighter(o, c):    # o c implies op b: beyond b, or at b where o is strict or op is not
            return (c > b if up else c < b) or (c == b and (len(o) == 1 or len(op) == 2))
        return any(r != rel and n == name and o[0] == op[0] and tighter(o, c) for r, (n, o, c) in bounds.items())

    return [rel for rel in relations if rel not in bounds or not implied(rel)]


def _number_text(n: sp.Number) -> str:
    """A sympy number as holds' text: an integer, p/q, or a float's repr."""
    if isinstance(n, sp.Rational) and not n.is_Integer:
        return f"{n.p}/{n.q}"
    return _number(float(n))


def _arith_text(e: sp.Expr) -> str | None:
    """``e`` as text of numbers, names, + - * / and parentheses (holds' syntax), or None."""
    if isinstance(e, sp.Symbol):
        return e.name
    if isinstance(e, (sp.Integer, sp.Float)):
        return _number(float(e)) if float(e) >= 0 else f"({_number(float(e))})"
    if isinstance(e, sp.Rational):
        return f"({e.p}/{e.q})"
    if isinstance(e, (sp.Add, sp.Mul)):
        parts = [_arith_text(a) for a in e.args]
        return None if None in parts else "(" + (" + " if isinstance(e, sp.Add) else "*").join(parts) + ")"
    if isinstance(e, sp.Pow) and e.exp.is_Integer and e.exp != 0:
        base = _arith_text(e.base)
        if base is None or abs(int(e.exp)) > 8:
            return None
        power = "(" + "*".join([base] * abs(int(e.exp))) + ")"
        return power if e.exp > 0 else f"(1/{power})"
    return None


def _number(v: float) -> str:
    return str(int(v)) if v.is_integer() else repr(v)


PROBE_SCALES = (0.125, 8.0)   # _probe_values: each parameter times these (near 0, far)
PROBE_STEPS = (1.0, 8.0)      # and steps along each direction, in units of the parameters' sizes
PROBE_DIRECTIONS = 2          # random directions (of two or more parameters) besides each parameter's own
PROBE_BOUNDARY = 63 / 64      # and on each direction the share of the way to where the domain ends


def _generic_holds(analysis: Analysis, per_branch: dict, exprs: dict, spec: ActivationSpec, domain: list[str],
                   target: str) -> bool:
    """Whether the parameter-generic table (its forward code, code classes and closed forms, with
    parameter names) is right at parameter values spread over ``domain`` (:func:`_probe_values`): the
    branch analysis there finds the same branches (pieces, directions), branches sharing a code still
    told apart by y (no overlap, no signed-zero clash at y = 0: :func:`.branches._signed_zero_clash`,
    which :func:`_signed_zero_relations` keeps within the domain), the breaks the table's expressions
    give, and f' equal to each closed form (:func:`.exact._agrees`). :func:`_param_domain`'s relations keep the signs the analysis relied on
    where they are rational in the parameters; this also catches what they do not express (a break
    stored as a number that moves with a parameter, a piece condition not linear in x). False when a
    probe differs or its analysis fails: the table is then made for the fitted values only."""
    forward = _forward_code(analysis, spec, True)
    classes = _code_classes(analysis, per_branch, spec, True)
    for values in _probe_values(spec, domain):
        probe = dataclasses.replace(spec, params=values)
        try:
            fresh = analyze(probe)
        except Exception:  # noqa: BLE001 - a value the domain admits that the fitter refuses: not generic
            return False
        if not _same_table(analysis, fresh, forward, classes, per_branch, exprs, target):
            return False
    return True


def _same_table(analysis: Analysis, fresh: Analysis, forward: ForwardCode, classes: list[CodeClass],
                per_branch: dict, exprs: dict, target: str) -> bool:
    """Whether the generic table of ``analysis`` (``forward``, ``classes``, closed forms ``exprs``) holds at
    the parameters of ``fresh``, the analysis there (see :func:`_generic_holds`)."""
    params = fresh.spec.params

    def near(text, value: float) -> bool:
        try:
            return abs(number(text, params) - value) <= 1e-9 * (1 + abs(value))
        except (TypeError, ValueError):     # not a real number there
            return False

    if [(b.piece, b.direction) for b in fresh.branches] != [(b.piece, b.direction) for b in analysis.branches]:
        return False
    for new, old in zip(fresh.branches, analysis.branches):
        new.code = old.code       # the table's codes: y must still tell apart the branches sharing one
    if _codes_clash(fresh.branches):
        return False
    x_breaks, codes = _code_breaks(fresh.branches)
    fresh = dataclasses.replace(fresh, n_codes=analysis.n_codes, x_breaks=x_breaks, codes=codes)
    if codes != list(forward.codes) or len(x_breaks) != len(forward.x_breaks) or not all(
            side == b.side and near(b.value, v) for (v, side), b in zip(x_breaks, forward.x_breaks)):
        return False
    for cc, there in zip(classes, _code_classes(fresh, per_branch, fresh.spec, False)):
        if [s.branch for s in cc.segments] != [s.branch for s in there.segments] or \
                len(cc.y_breaks) != len(there.y_breaks) or not all(
                a.side == b.side and near(a.value, float(b.value)) for a, b in zip(cc.y_breaks, there.y_breaks)):
            return False
    for b in fresh.branches:
        if b.flat:      # g = 0, or x at the plateau for an inverse table (_branch_segments)
            if not near(per_branch[b.index][0].value, 0.0 if target == "derivative" else b.x_range[1]):
                return False
        elif exprs[b.index] is None or not _agrees(exprs[b.index], b.expr, fresh.spec, target, b):
            return False
    return True


def _probe_values(spec: ActivationSpec, domain: list[str]) -> list[dict[str, float]]:
    """Parameter values inside ``domain`` where :func:`_generic_holds` compares tables (the same every
    run): each parameter times :data:`PROBE_SCALES`; :data:`PROBE_STEPS` along each parameter's axis both
    ways and along :data:`PROBE_DIRECTIONS` random directions (steps in units of max(|value|, 1) per
    parameter); and on each of those directions :data:`PROBE_BOUNDARY` of the way to where the domain
    ends, found by bisection, where it ends within the longest step."""
    names = list(spec.params)
    base = np.array([float(spec.params[n]) for n in names])
    size = np.maximum(np.abs(base), 1.0)

    def values(point) -> dict[str, float]:
        return dict(zip(names, (float(v) for v in point)))

    def inside(point) -> bool:
        return all(holds(rel, values(point)) for rel in domain)

    unit = np.eye(len(names))
    points = [base * np.where(unit[i] == 1, scale, 1.0) for i in range(len(names)) for scale in PROBE_SCALES]
    directions = [sign * unit[i] for i in range(len(names)) for sign in (1.0, -1.0)]
    if len(names) > 1:
        directions += list(np.random.default_rng(0).standard_normal((PROBE_DIRECTIONS, len(names))))
    for d in directions:
        step = d / np.linalg.norm(d) * size
        points += [base + t * step for t in PROBE_STEPS]
        lo, hi = 0.0, next((t for t in 2.0 ** np.arange(-6, 4) if not inside(base + t * step)), None)
        if hi is None:
            continue
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if inside(base + mid * step) else (lo, mid)
        points.append(base + PROBE_BOUNDARY * lo * step)
    out = []
    for point in points:
        v = values(point)
        if inside(point) and v != spec.params and v not in out:
            out.append(v)
    return out


def _fitted_segments(b: Branch, target: str, tol: float, rationals: str = "auto") -> list[list[Segment]]:
    ref = BranchReference(b, target)
    y_lo, y_hi, origins, lows, highs = _fit_range(b, ref, target, tol)
    # the cheapest polynomial layout, and a cheaper rational one if the branch has it (the table
    # decides between them: _cheapest_table); rationals alone where no polynomial layout fits
    polys = rats = error = None
    try:
        polys = fit_branch(ref, y_lo, y_hi, origins, tol, rationals=())
    except FitError as exc:
        if rationals == "never":
            raise
        error = exc
    if rationals != "never":
        budget = math.inf
        if polys is not None and rationals == "auto":   # a table gains at most what its branch gains
            degree, den_degree, pieces, logs = branch_layout(polys)
            budget = layout_cost(degree, pieces, den_degree, logs)
        try:
            rats = fit_branch(ref, y_lo, y_hi, origins, tol, degrees=(), max_cost=budget)
        except FitError:
            if polys is None:
                raise error from None
    fitted = [[p.segment(b.index) for p in pieces] for pieces in (polys, rats) if pieces is not None]
    return [lows + segs + highs for segs in _resolved(b, ref, fitted, tol)]


PROBE_POINTS = 129   # x probed across such a change (its interval, 4 times as wide on either side)


def _resolved(b: Branch, ref: BranchReference, fits: list[list[Segment]], tol: float) -> list[list[Segment]]:
    """The fits (segment lists) whose g is within SCALE_MISS tolerances of the reference's next to every
    change of f that the scan's grid does not resolve (:func:`.scan.unresolved_changes`): where f
    changes on a scale of x finer than the fit's samples (x + tanh(1e20*x)/1e20: g is 2 at y = 0 and 1
    from |y| ~ 1e-19), a fit can miss it, and its proof then fails. ScaleError where no fit is left."""
    changes = unresolved_changes(ref.f, ref.fp, *b.x_range, b.removable)
    misses = [_scale_miss(b, ref, segs, changes, tol) for segs in fits]
    if fits and all(misses):
        raise misses[0]
    return [segs for segs, miss in zip(fits, misses) if miss is None]


def _scale_miss(b: Branch, ref: BranchReference, segs: list[Segment], changes: list[tuple[float, float]],
                tol: float) -> ScaleError | None:
    """The refusal of fitted segments ``segs`` whose g misses the reference's by more than SCALE_MISS
    tolerances (absolute below 1, relative above) at some y = f(x), x across an unresolved change
    [a, c]; None where it misses by less everywhere."""
    for a, c in changes:
        w = c - a
        with np.errstate(all="ignore"):
            x = np.linspace(a - 4 * w, c + 4 * w, PROBE_POINTS)
            y = ref.f(x[(x >= b.x_range[0]) & (x <= b.x_range[1])])
        for seg in segs:
            inside = y[np.isfinite(y) & (y >= seg.lo) & (y <= seg.hi)]
            if inside.size == 0:
                continue
            want = ref(inside)
            with np.errstate(all="ignore"):
                err = np.abs(seg.evaluate(inside) - want) / np.maximum(1.0, np.abs(want))
            err = np.where(np.isfinite(want), np.nan_to_num(err, nan=np.inf), 0.0)
            k = int(np.argmax(err))
            if err[k] > SCALE_MISS * tol:
                return ScaleError(
                    f"branch {b.index}: near x in [{a:.6g}, {c:.6g}] f changes on a scale of x of about {w:.2g}, "
                    "finer than the scan's grid resolves (f's step between two of its points disagrees with f' "
                    "at them) and than the fit's samples: the fitted g is "
                    f"{float(seg.evaluate(inside[k:k + 1])[0]):.6g} at y = {inside[k]:.6g}, where g is {want[k]:.6g}")
    return None


def _fit_range(b: Branch, ref: BranchReference, target: str, tol: float):
    """(y_lo, y_hi, origins, low tails, high tails) of a fitted branch: the float32 y range the
    pieces cover, the transforms' origins as (kind, y0, sign) for each singular end (both ends may
    be singular: x - 2*tanh(x)'s middle branch has two branch points; each piece takes the transform
    that fits it best), and the constant tails beyond the fitted range."""
    _check_normal_y(b)
    origins, lows, highs = [], [], []
    y_lo, y_hi = b.y_range
    for which in ("lower", "upper"):
        kind = b.lower_end if which == "lower" else b.upper_end
        y_end = y_lo if which == "lower" else y_hi
        sign = 1 if which == "lower" else -1
        if kind == "sqrt":
            exact_end = _precise_value(b, which)
            origins.append(("sqrt", exact_end, sign))
            y_end = f32_below(float(exact_end)) if sign > 0 else -f32_below(-float(exact_end))
        elif kind == "root":    # f' has a zero of order m >= 2 here: g ~ |y - y0|^(m/(m+1))
            exact_end = _precise_value(b, which)
            origins.append(("log", exact_end, sign))    # g is smooth in log|y - y0| away from y0
            y_end, tail = _flat_tail(b, ref, which, tol, float(exact_end))
            (lows if which == "lower" else highs).append(tail)
        elif kind in ("log", "tail", "power"):
            limit = b.y_range[0 if which == "lower" else 1]
            y_end, tails = _tail(b, ref, which, target, tol)
            if kind == "log":
                origins.append(("log", limit, sign))
            elif kind == "power" and _root_index(b.orders[which]) == 2:
                origins.append(("sqrt", limit, sign))   # |y - L| ~ x^-2: 1/x is analytic in sqrt
            (lows if which == "lower" else highs).extend(tails)
        else:
            y_end = f32(y_end)
        if which == "lower":
            y_lo = y_end
        else:
            y_hi = y_end
    return y_lo, y_hi, origins, lows, highs


def _check_normal_y(b: Branch) -> None:
    """Refuse a branch whose whole y range lies below float32's smallest normal number (1e-38*tanh(x)):
    float32 y there is subnormal (0 with denormals flushed), the runtime compares no y there with a
    table's breaks, and its few bits cannot tell g apart."""
    if max(abs(v) for v in b.y_range) < TINY32:
        raise FitError(f"branch {b.index}: y stays within [{b.y_range[0]:.6g}, {b.y_range[1]:.6g}], below "
                       f"float32's smallest normal number {TINY32:.6g} in magnitude: float32 y there is subnormal "
                       "(0 with denormals flushed) and cannot tell g apart", None,
                       "scale the formula so that its y reaches float32's normal range")


def _root_index(q: float) -> int:
    """n with 1/x analytic in |y - L|^(1/n) for a power end |y - L| ~ |x|^-q (q = a/b: n = a)."""
    from fractions import Fraction
    return Fraction(q).limit_denominator(8).numerator if math.isfinite(q) and q > 0 else 0


def _precise_value(b: Branch, which: str):
    """f at a branch point to 40 digits (the sqrt transform's origin must be exact to ~1e-20)."""
    x = b.x_at_y_end(which)
    value = sp.N(b.expr.subs(X, sp.Float(x, 30)), 40)
    if value.is_extended_real and value.is_finite:
        return value
    # undefined at the end itself (exp(-1/x**2) at 0: exp(-zoo)): its limit from inside the branch
    try:
        with time_limit(LIMIT_SECONDS):
            value = sp.N(sp.limit(b.expr, X, sp.Float(x, 30), "+" if x == b.x_range[0] else "-"), 40)
    except Exception:  # noqa: BLE001 - sympy fails in many ways; refused below
        value = sp.nan
    if value.is_extended_real and value.is_finite:
        return value
    raise FitError(f"branch {b.index}: f has no finite value or limit at its end x = {x:.17g} "
                   "(sympy evaluates neither)", None, "")


TAIL_REACH = (1e4, 1e15)   # |x| scanned for a constant tail: the first reach that has one is used


def _tail(b: Branch, ref: BranchReference, which: str, target: str, tol: float):
    """(y where the fitted part ends, its tail segments) for an end at x = +-inf: a constant (or x = y)
    tail, none where g is fitted up to a finite limit, or a power tail where g grows without bound."""
    x_inf = b.x_at_y_end(which)
    direction = math.copysign(1.0, x_inf)
    y_limit = b.y_range[0 if which == "lower" else 1]
    x_in = _tail_start(b, ref, x_inf, y_limit)
    if target == "derivative" and math.isinf(y_limit) and not math.isfinite(b.limits[which]):
        return fit_power_tail(b, ref, which, tol)     # g ~ |y|^((n-1)/n): fitted relative to g
    for reach in TAIL_REACH:     # g settling slowly (asinh's 1/x) needs the longer scan
        steps = x_in + direction * np.expm1(np.linspace(0, math.log(reach), 200001))
        y = ref.f(steps)
        if target == "derivative":
            limit = b.limits[which]
            bad = np.abs(ref.fp(steps) - limit) > tol / 4
            tail = ConstantSegment, repr(float(limit))
        else:
            bad = np.abs(steps - y) > tol / 4 if b.limits[which] == 1.0 else np.ones_like(steps, bool)
            tail = ExactSegment, "y"            # x = y
        finite = np.isfinite(y) & (np.abs(y) < F32_MAX)
        last_bad = np.nonzero(bad & finite)[0]
        k = 1 if last_bad.size == 0 else last_bad[-1] + 1
        if k < steps.size and finite[k] and abs(y[k] - y_limit) > TINY32:
            break
    if k >= steps.size or not finite[k] or abs(y[k] - y_limit) <= TINY32:
        end_kind = b.lower_end if which == "lower" else b.upper_end
        if target == "derivative" and end_kind == "power":
            return f32(y_limit), []       # g is fitted up to the limit itself (transform: _root_index)
        if target == "inverse" and end_kind == "power":
            raise FitError(f"branch {b.index}: x = f^-1(y) grows like |y - {y_limit:.6g}|^(-1/{b.orders[which]:g}) "
                           f"next to y = {y_limit:.17g}, which polynomials in this branch's transforms cannot "
                           "follow; use the derivative target (the runtime's)", None, "")
        if target == "inverse" and np.isfinite(y_limit):
            # asymptote: an inverse cannot have a constant tail; stop at the smallest normal float32
            y_end = f32(y_limit + (TINY32 if which == "lower" else -TINY32))
            x_end = float(ref.inverse(np.array([y_end]))[0])
            return y_end, [ConstantSegment(_tail_range(b, which, y_end), b.index, repr(x_end), extra={"cutoff": True})]
        if target == "inverse":
            raise FitError(f"branch {b.index}: x = f^-1(y) does not approach y as y -> {y_limit:+g} (inverse "
                           "tables support tails x = y only); use the derivative target (the runtime's)", None, "")
        if k < steps.size and finite[k]:   # g settles only where y has reached its limit in float64
            at = np.nonzero(np.abs(y - y_limit) <= TINY32)[0][0]
            if at > 0 and abs(y[at - 1] - y_limit) > 0.5 * abs(y[0] - y_limit):
                raise _tail_scale_error(b, ref, steps[at - 1:at + 1], y_limit, b.limits[which])
            g_at = float(np.max(np.abs(ref.fp(steps[min(at, k - 1):k]) - b.limits[which]), initial=0.0))
            raise FitError(f"branch {b.index}: y reaches its limit {y_limit:.9g} (to float64 rounding) at x = "
                           f"{steps[at]:.4g}, where g is still {g_at:.3g} from its limit {b.limits[which]:g} (more "
                           "than tolerance / 4): y no longer tells g apart there", None,
                           f"--tolerance {_two_digits_up(4 * g_at):g} or more would end the fit there"
                           if 4 * g_at <= MAX_TOLERANCE else "g is not determined by y on this tail")
        raise _unsettled_tail_error(b, ref, which, x_inf, steps[-1])
    y_end = f32(float(y[k]))
    kind, text = tail
    return y_end, [kind(_tail_range(b, which, y_end), b.index, text)]


def _unsettled_tail_error(b: Branch, ref: BranchReference, which: str, x_inf: float, x_far: float) -> FitError:
    """The refusal of a tail where g is still more than tolerance / 4 from its limit at x_far (|x| = 1e15):
    a looser --tolerance is offered only where it ends the fit there (4 |g(x_far) - limit| within
    MAX_TOLERANCE); x/log|x|'s g ~ 1/log|y| is still 0.03 from 0 there."""
    limit = b.limits[which]
    gap = abs(float(ref.fp(np.array([x_far]))[0]) - limit)
    if 0 < 4 * gap <= MAX_TOLERANCE:
        advice = f"--tolerance {_two_digits_up(4 * gap):g} or more would end the fit there"
    elif math.isfinite(gap):
        advice = f"g is still {gap:.3g} from its limit there, too slow an approach for any tolerance up to " \
            f"{MAX_TOLERANCE:g}"
    else:
        advice = "float64 g is not finite there"
    return FitError(f"branch {b.index}: g does not settle to its limit {limit:g} within tolerance / 4 by |x| = "
                    f"{abs(x_far):.3g} (x -> {x_inf:+g})", None, advice)


def _two_digits_up(v: float) -> float:
    """v > 0 rounded up to two significant digits (a tolerance offered must not fall short of v); 0 as 0."""
    if not v > 0:
        return v
    step = 10.0 ** (math.floor(math.log10(v)) - 1)
    return float(f"{math.ceil(v / step) * step:.2g}")


def _tail_start(b: Branch, ref: BranchReference, x_inf: float, y_limit: float) -> float:
    """Where :func:`_tail`'s scan towards ``x_inf`` starts: the branch's other end (0 where that is
    infinite too); where f there has already reached its limit y_limit (to float64 rounding), the
    point of the scan's grid where |f'| is largest on the branch (tanh(x - 1000) is -1 at x = 0 and
    rises at 1000)."""
    x_in = b.x_range[1] if x_inf < 0 else b.x_range[0]
    x_in = x_in if math.isfinite(x_in) else 0.0
    if abs(float(ref.f(np.array([x_in]))[0]) - y_limit) > TINY32:
        return x_in
    xs = scan_grid(*b.x_range, b.removable)
    slopes = np.abs(ref.fp(xs))
    slopes = np.where(np.isfinite(slopes), slopes, 0.0)
    return float(xs[np.argmax(slopes)]) if slopes.size else x_in


def _tail_scale_error(b: Branch, ref: BranchReference, xs: np.ndarray, y_limit: float, g_limit: float) -> ScaleError:
    """The refusal of a tail whose scan, in one step from xs[0] to xs[1], takes y most of its way to its
    limit while g still has far to go: f changes on a scale of x finer than the scan resolves (about
    the gap to the limit over g, tanh(1e20*x)/1e20: 1e-20 at x = 0)."""
    y0, g0 = float(ref.f(xs[:1])[0]), float(ref.fp(xs[:1])[0])
    scale = abs(y0 - y_limit) / abs(g0) if g0 != 0 else math.nan
    return ScaleError(f"branch {b.index}: y goes from {y0:.6g} at x = {xs[0]:.6g} to its limit {y_limit:.9g} (to "
                      f"float64 rounding) at x = {xs[1]:.6g}, the next point of the scan for its tail, while g goes "
                      f"from {g0:.6g} to its limit {g_limit:g}: f changes on a scale of x of about {scale:.3g}, finer "
                      "than the fitter's scans resolve")


def _flat_tail(b: Branch, ref: BranchReference, which: str, tol: float, y0: float):
    """(y where the fitted part starts, constant segment) next to a flat point x0 of higher order:
    g = f'(x0) = 0 to within tol / 4 on [y0, y_end]."""
    x0 = b.x_at_y_end(which)
    lo, hi = b.x_range
    other = hi if x0 == lo else lo
    inward = 1.0 if x0 == lo else -1.0
    span = min(abs(other - x0), 30.0) if math.isfinite(other) else 30.0
    xs = x0 + inward * np.geomspace(1e-12 * max(1.0, abs(x0)), span, 20001)
    limit = 0.0      # f'(x0) = 0: the end is a zero of f' (its float64 value is rounding noise)
    bad = np.nonzero(np.abs(ref.fp(xs) - limit) > tol / 4)[0]
    k = int(bad[0]) if bad.size else xs.size
    if k == 0:
        raise FitError(f"branch {b.index}: g does not settle to {limit:g} next to its flat point x = {x0:.17g}",
                       None, "")
    y = float(ref.f(xs[k - 1:k])[0])
    y_end = f32_below(y) if which == "lower" else -f32_below(-y)   # rounded towards y0
    return y_end, ConstantSegment([y0, y_end] if which == "lower" else [y_end, y0], b.index, repr(float(limit)))


def _tail_range(b: Branch, which: str, y_end: float) -> list[float]:
    return [b.y_range[0], y_end] if which == "lower" else [y_end, b.y_range[1]]


def _branch_json(b: Branch, segs: list[Segment]) -> TableBranch:
    fitted = [s for s in segs if s.fitted]
    d = b.to_json()
    d["route"] = "constant" if b.flat else ("fit" if fitted else "exact")
    d["tails"] = [{"y_range": s.y_range, "value": s.text()} for s in segs if not s.fitted] \
        if d["route"] == "fit" else []
    d["pieces"] = len(fitted)
    d["degrees"] = sorted({s.degree for s in fitted})
    if any(s.den_degree for s in fitted):  # rational pieces (absent otherwise: older tables stay as they were)
        d["den_degrees"] = sorted({s.den_degree for s in fitted if s.den_degree})
    return TableBranch.from_json(d)


def _forward_code(analysis: Analysis, spec: ActivationSpec, generic: bool) -> ForwardCode:
    return ForwardCode([Break(_sym_number(v, spec, generic), side) for v, side in analysis.x_breaks],
                       list(analysis.codes))


def _sym_number(value: float, spec: ActivationSpec, generic: bool) -> str:
    """repr(value), or an expression in parameter names equal to it when the table is generic."""
    if generic:
        sym = _symbolic_boundary(value, spec)
        if sym is not None:
            return sp.sstr(sym)
    return repr(float(value))


def _symbolic_boundary(value: float, spec: ActivationSpec) -> sp.Expr | None:
    """A piece boundary of the symbolic formula (Max, Min and Abs as their Piecewise: Max(x, b)'s b) whose
    value at the defaults is ``value``."""
    vals = _values(spec)
    rewritten = sp.piecewise_fold(spec.expr.rewrite(sp.Piecewise)).atoms(sp.Rel) - spec.expr.atoms(sp.Rel)
    for cond in [*spec.expr.atoms(sp.Rel), *sorted(rewritten, key=sp.default_sort_key)]:
        try:
            sols = sp.solve(sp.Eq(cond.lhs, cond.rhs), X)
        except NotImplementedError:
            continue
        for s in sols:
            try:
                at = float(s.subs(vals))
            except (TypeError, ValueError):    # not a number at the defaults (x**2 < b's roots for b < 0)
                continue
            if abs(at - value) <= 1e-12 * (1 + abs(value)):
                return s
    if value == 0:
        return sp.Integer(0)
    return None


def _code_classes(analysis: Analysis, per_branch: dict, spec: ActivationSpec, generic: bool) -> list[CodeClass]:
    out = []
    for code in range(analysis.n_codes):
        members = sorted((b for b in analysis.branches if b.code == code), key=lambda b: (b.y_range[0], b.y_range[1]))
        segs, breaks = [], []
        for i, b in enumerate(members):
            bsegs = per_branch[b.index]
            if segs:
                breaks.append(_branch_break(members[i - 1], b, spec, generic))
            for j, s in enumerate(bsegs):
                if j > 0:
                    breaks.append(Break(repr(float(s.y_range[0])), "left"))
                segs.append(s)
        out.append(CodeClass(code, breaks, segs))
    return out


def _branch_break(left: Branch, right: Branch, spec: ActivationSpec, generic: bool) -> Break:
    """The y boundary between two branches of one code class, owned as PyTorch's kinks are."""
    value = right.y_range[0]
    left_has = left.y_closed[1] or left.flat
    right_has = right.y_closed[0] or right.flat
    if right.flat and right_has:
        side = "right"
    elif left_has and (left.flat or not right_has):
        side = "left"
    else:
        side = "right" if right_has else "left"
    text = repr(float(value))
    if generic and (y0 := _meeting_y(right, spec)) is not None:
        text = sp.sstr(y0)
    return Break(text, side)


def _meeting_y(hi: Branch, spec: ActivationSpec) -> sp.Expr | None:
    """The y where branch ``hi`` meets the branch before it in its code class (the y of its lower end),
    as an expression in the parameters; None where that x is not a piece boundary of the formula."""
    x_b = hi.x_range[0] if hi.direction != "decreasing" else hi.x_range[1]
    xs = _symbolic_boundary(x_b, spec)
    return None if xs is None else sp.simplify(hi.sym_expr.subs(X, xs))
