"""The parameter domain of a parameter-generic table: the relations (table text the runtime checks)
under which its closed forms and breaks, written in parameter names, stay right, and the check of the
table at parameter values spread over that domain."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import sympy as sp

from ..common.params import holds
from .branches import Analysis, Branch, analyze, code_breaks, codes_clash
from .codes import code_classes, forward_code, meeting_y, symbolic_boundary
from .exact import agrees
from .formulas import X, ActivationSpec
from .model import CodeClass, ForwardCode, number

__all__ = ["param_domain", "generic_holds", "numeric_only"]


def numeric_only(expr: sp.Expr, b: Branch) -> bool:
    """True when an exact form lost the parameter names its piece has (solved with values substituted)."""
    params = b.sym_expr.free_symbols - {X}
    return bool(params) and not (expr.free_symbols & params)


def param_domain(spec: ActivationSpec, closed_forms=(), analysis: Analysis | None = None) -> list[str] | None:
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
    y = 0 stay told apart there: selu's 'scale >= 1'). :func:`generic_holds` then compares the table
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
        # the owner of y = 0 as _signed_zero_clash (and .codes._branch_break) decide it
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
    y0 = meeting_y(hi, spec)
    if y0 is None:
        return None
    if not (y0.free_symbols & set(values)):
        return ""
    return _sign_relation(y0, values)


def _slope_at_zero(b: Branch, which: str, spec: ActivationSpec) -> sp.Expr | None:
    """f' of branch ``b`` (its piece's symbolic expression) at the x where its ``which`` y end is, as an
    expression in the parameters: its limit from inside the branch where f' is not finite there; None
    where that x is not a piece boundary of the formula (:func:`.codes.symbolic_boundary`) or no limit is found."""
    x0 = b.x_at_y_end(which)
    xs = symbolic_boundary(x0, spec)
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
    sign here; :func:`generic_holds` compares the tables they give."""
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


def generic_holds(analysis: Analysis, per_branch: dict, exprs: dict, spec: ActivationSpec, domain: list[str],
                   target: str) -> bool:
    """Whether the parameter-generic table (its forward code, code classes and closed forms, with
    parameter names) is right at parameter values spread over ``domain`` (:func:`_probe_values`): the
    branch analysis there finds the same branches (pieces, directions), branches sharing a code still
    told apart by y (no overlap, no signed-zero clash at y = 0: :func:`.branches._signed_zero_clash`,
    which :func:`_signed_zero_relations` keeps within the domain), the breaks the table's expressions
    give, and f' equal to each closed form (:func:`.exact.agrees`). :func:`param_domain`'s relations
    keep the signs the analysis relied on where they are rational in the parameters; this also catches
    what they do not express (a break stored as a number that moves with a parameter, a piece condition
    not linear in x). False when a probe differs or its analysis fails: the table is then made for the
    fitted values only."""
    forward = forward_code(analysis, spec, True)
    classes = code_classes(analysis, per_branch, spec, True)
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
    the parameters of ``fresh``, the analysis there (see :func:`generic_holds`)."""
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
    if codes_clash(fresh.branches):
        return False
    x_breaks, codes = code_breaks(fresh.branches)
    fresh = dataclasses.replace(fresh, n_codes=analysis.n_codes, x_breaks=x_breaks, codes=codes)
    if codes != list(forward.codes) or len(x_breaks) != len(forward.x_breaks) or not all(
            side == b.side and near(b.value, v) for (v, side), b in zip(x_breaks, forward.x_breaks)):
        return False
    for cc, there in zip(classes, code_classes(fresh, per_branch, fresh.spec, False)):
        if [s.branch for s in cc.segments] != [s.branch for s in there.segments] or \
                len(cc.y_breaks) != len(there.y_breaks) or not all(
                a.side == b.side and near(a.value, float(b.value)) for a, b in zip(cc.y_breaks, there.y_breaks)):
            return False
    for b in fresh.branches:
        if b.flat:      # g = 0, or x at the plateau for an inverse table (.pipeline._branch_segments)
            if not near(per_branch[b.index][0].value, 0.0 if target == "derivative" else b.x_range[1]):
                return False
        elif exprs[b.index] is None or not agrees(exprs[b.index], b.expr, fresh.spec, target, b):
            return False
    return True


def _probe_values(spec: ActivationSpec, domain: list[str]) -> list[dict[str, float]]:
    """Parameter values inside ``domain`` where :func:`generic_holds` compares tables (the same every
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
