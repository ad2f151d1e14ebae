"""A formula's pieces (the intervals of its Piecewise), checked to be real, finite and continuous.

A piece whose f or f' float64 cannot evaluate at a sample point, with a pole or another singular point
(:mod:`.domain`), or with a corner inside (f' jumping between finite values of opposite signs) is refused
with the point; removable points (0/0 with a finite limit) are kept on the piece for the scan to avoid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from .domain import classify_points
from .errors import SpecError
from .float32 import F32_MAX
from .formulas import X, ActivationSpec
from .numeric import float64_fault, numeric, precise

__all__ = ["Piece", "split_pieces", "check_real", "find_points", "check_singular", "corner", "corner_error",
           "removable_note"]


@dataclass
class Piece:
    """One interval of x on which the formula is one expression."""

    expr: sp.Expr           # substituted expression on this piece
    sym_expr: sp.Expr       # with parameter symbols
    lo: float
    hi: float
    lo_closed: bool
    hi_closed: bool
    removable: list[float] = field(default_factory=list)   # removable points (0/0) inside, .domain


def split_pieces(spec: ActivationSpec) -> list[Piece]:
    expr = sp.piecewise_fold(spec.substituted().rewrite(sp.Piecewise))
    sym = sp.piecewise_fold(spec.expr.rewrite(sp.Piecewise))
    if not isinstance(expr, sp.Piecewise):
        return [Piece(expr, sym, -math.inf, math.inf, False, False)]
    sym_args = sym.args if isinstance(sym, sp.Piecewise) and len(sym.args) == len(expr.args) else None
    covered = sp.EmptySet
    out = []
    for i, (e, cond) in enumerate(expr.args):
        try:
            region = cond.as_set() if cond is not sp.true else sp.Reals
        except (NotImplementedError, TypeError):
            raise SpecError(f"piece condition {cond} is not a condition on x alone") from None
        region = sp.Intersection(region, sp.Complement(sp.Reals, covered))
        covered = sp.Union(covered, region)
        for iv in _intervals(region):
            out.append(Piece(e, sym_args[i][0] if sym_args else e, float(iv.start), float(iv.end),
                             not iv.left_open, not iv.right_open))
    _check_covered(spec, sp.Complement(sp.Reals, covered))
    out.sort(key=lambda p: p.lo)
    return out


def _check_covered(spec: ActivationSpec, uncovered) -> None:
    """Refuse x where no condition of the Piecewise holds (``uncovered``): an interval, or a single point,
    where the generated code would give NaN for y and its gradient."""
    gaps = [iv for iv in _intervals(uncovered) if iv.measure > 0]
    if gaps:
        g = gaps[0]
        text = f"{'(' if g.left_open else '['}{float(g.start):g}, {float(g.end):g}{')' if g.right_open else ']'}"
        raise SpecError(f"{spec.name!r} is undefined (not real-valued) for x in {text}: no condition of its "
                        "Piecewise holds there; a table needs f on the whole real line (end with a (value, True) piece)")
    points = sorted(float(p) for p in _points(uncovered))
    if points:
        at = _number(points[0])
        raise SpecError(f"{spec.name!r} is undefined (not real-valued) at x = {at}: no condition of its Piecewise "
                        f"holds at that single point (y and its gradient would be NaN there); include x = {at} in one "
                        "piece's condition (make a strict inequality that excludes it non-strict), or end with a "
                        "(value, True) piece")


def _points(region) -> list:
    """The isolated points of a set of x (its FiniteSet parts)."""
    if isinstance(region, sp.FiniteSet):
        return list(region.args)
    if isinstance(region, sp.Union):
        return [p for arg in region.args for p in _points(arg)]
    return []


def _number(value: float) -> str:
    """``value`` as the shortest text that reads back as it (``0``, not ``0.0``)."""
    text = repr(value)
    return text.removesuffix(".0")


def _intervals(region) -> list[sp.Interval]:
    if region is sp.EmptySet:
        return []
    if isinstance(region, sp.Interval):
        return [region]
    if isinstance(region, sp.Union):
        return [iv for arg in region.args for iv in _intervals(arg)]
    if isinstance(region, sp.FiniteSet):
        return []  # isolated points: measure zero, owned by a neighbour
    if isinstance(region, sp.ConditionSet):   # sympy could not solve the condition for x
        raise SpecError(f"the condition {region.condition} has no closed-form solution for x (a Max/Min of two "
                        "functions crossing where no formula gives x); write a Piecewise with the break point as "
                        "a number, e.g. Piecewise((0.1*x, x < -2.3), (tanh(x), True))")
    raise SpecError(f"cannot split the real line into intervals for condition set {region}")


def check_real(spec: ActivationSpec, pieces: list[Piece]) -> None:
    """Refuse a piece where f or f' is not a number on a grid of x."""
    for p in pieces:
        lo, hi = max(p.lo, -30.0), min(p.hi, 30.0)
        if lo >= hi:
            continue
        xs = np.linspace(lo, hi, 2001)[1:-1]
        ys = numeric(p.expr)(xs)
        bad = ~np.isfinite(ys)
        if bad.any() and _beyond_float64(p.expr, xs, ys):
            xs, bad = xs[~bad], bad[~bad]     # f itself overflows float64 there: the branches' ends take that
        if bad.any():
            x_bad = float(xs[np.argmax(bad)])
            exact = precise(p.expr, x_bad)
            if exact is not None and _continuous_there(p.expr, x_bad, exact):
                raise float64_fault(f"{spec.name!r}: ", "f", x_bad, ys[np.argmax(bad)], exact)
            note = next((f"; {removable_note(c)}" for c in p.removable if _same_point(c, x_bad)), "")
            raise SpecError(f"{spec.name!r} is not real-valued (or not finite) on the real line: "
                            f"f({x_bad:.6g}) is {ys[np.argmax(bad)]}{note}")
        fp = sp.diff(p.expr, X)
        fpn = numeric(fp)
        dys = fpn(xs)
        bad = np.isnan(dys)
        if bad.any():
            x_bad = float(xs[np.argmax(bad)])
            exact = precise(fp, x_bad)
            if exact is not None and _continuous_there(fp, x_bad, exact):
                raise float64_fault(f"{spec.name!r}: ", "f'", x_bad, "nan", exact)
            if (sides := corner(fpn, x_bad)) is not None:
                raise corner_error(repr(spec.name), x_bad, sides, " (f' is nan at it)")
            raise SpecError(f"{spec.name!r} has no derivative at x = {x_bad:.6g} (f' is nan there): a table of "
                            "g(y) = f'(f^-1(y)) needs f' defined inside each piece of the formula")


CORNER_STEPS = (1e-9, 1e-7)   # a corner's one-sided f' is read at these distances (relative to max(1, |x|))


def corner(fpn, x: float) -> tuple[float, float] | None:
    """(f' to the left, f' to the right) of x where f' jumps there between finite one-sided limits
    of opposite signs (f continuous with a corner, as sqrt(x**4 + 2*x**2) = |x| sqrt(x**2 + 2) at 0),
    else None: on each side the values at :data:`CORNER_STEPS` agree to 1e-4 relative (next to a
    smooth zero of f' they differ 100-fold)."""
    d = np.array(CORNER_STEPS) * max(1.0, abs(x))
    left, right = fpn(x - d), fpn(x + d)
    settled = all(np.isfinite(v).all() and abs(v[0] - v[1]) <= 1e-4 * abs(v[1]) for v in (left, right))
    return (float(left[0]), float(right[0])) if settled and left[0] * right[0] < 0 else None


def corner_error(who: str, x: float, sides: tuple[float, float], note: str = "") -> SpecError:
    """The refusal of a corner of f where its formula has none (:func:`corner`)."""
    return SpecError(f"{who} has a corner at x = {x:.6g} inside one piece of its formula: f' jumps there "
                     f"from {sides[0]:.6g} to {sides[1]:.6g}{note}, and a certified g needs f' bounded up to each "
                     "branch end; write the corner as a boundary of the formula's pieces (with Abs, Max, Min or a "
                     "Piecewise, as Abs(x) is) so that f' on each side is finite up to it")


def removable_note(c: float) -> str:
    """Why a table cannot be fitted through the removable point c (:mod:`.domain`)."""
    return (f"x = {c:.6g} is a removable point of the formula (0/0 there, with a finite limit): float "
            "arithmetic gives NaN or a wrong value for f at it and loses the digits of f' next to it, so "
            "g(y) = f'(f^-1(y)) can be neither fitted nor certified there; write f without the 0/0 at that point")


def _same_point(c: float, x: float) -> bool:
    return abs(x - c) <= 1e-12 * max(1.0, abs(c))


def _beyond_float64(expr: sp.Expr, xs: np.ndarray, ys: np.ndarray) -> bool:
    """Whether f's float64 values ``ys`` on the grid ``xs`` are inf only at its ends (one run a side),
    where f's value (to 15 digits: :func:`precise`) is indeed beyond float64's range, with the finite
    values next to them already past float32's: exp(exp(x)) exceeds float64 from x = 6.57, beyond any
    table's y; what a table can hold there is its branch's to say, not float64's (exp(exp(x)): the
    closed form g = y*log(y); exp(exp(x)) + x: refused, g grows faster than |y|, :mod:`.power_tail`)."""
    finite = np.nonzero(np.isfinite(ys))[0]
    if np.isnan(ys).any() or finite.size == 0 or finite[-1] - finite[0] + 1 != finite.size:
        return False
    lo, hi = int(finite[0]), int(finite[-1])
    for edge, first in [(lo, lo - 1)] * (lo > 0) + [(hi, hi + 1)] * (hi < xs.size - 1):
        exact = precise(expr, float(xs[first]))
        if not (exact is not None and math.isinf(float(exact)) and abs(ys[edge]) > F32_MAX):
            return False
    return True


def _continuous_there(expr: sp.Expr, x: float, exact) -> bool:
    """Whether ``exact`` (:func:`precise` of ``expr`` at x) is f's value indeed, where float64 gives
    inf or nan: the precise values at x (1 +- 1e-12) (x +- 1e-12 at 0) agree with it to 1e-6 (1 + |f|).
    At a 0/0 point, as x/(exp(x) - 1) at 0, evalf's value at x (0) is none of f's (1 next to it):
    f is not defined there, float64 is not to blame."""
    h = 1e-12 * abs(x) if x != 0 else 1e-12
    for t in (x - h, x + h):
        v = precise(expr, t)
        if v is None or abs(float(v) - float(exact)) > 1e-6 * (1 + abs(float(exact))):
            return False
    return True


def find_points(pieces: list[Piece]) -> list[list[tuple[str, str]]]:
    """Each piece's singular points (:mod:`.domain`); its removable points go to ``piece.removable``."""
    out = []
    for p in pieces:
        points = classify_points(p.expr, p.lo, p.hi, p.lo_closed, p.hi_closed)
        p.removable = points.removable
        out.append(points.singular)
    return out


def check_singular(spec: ActivationSpec, pieces: list[Piece], singular: list[list[tuple[str, str]]]) -> None:
    """Refuse a point inside a piece where f is not defined or not continuous (a pole between the
    sample points of :func:`check_real`, which the scan of f' would not see): :mod:`.domain`."""
    for bad in singular:
        if bad:
            where = "; ".join(f"{x}: {why}" for x, why in bad)
            raise SpecError(f"{spec.name!r} is not real-valued (or not finite) on the real line: f is not defined "
                            f"(or not continuous) at {where}; a table needs f finite and continuous on the whole "
                            "real line")
