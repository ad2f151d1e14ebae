"""A fitted branch's y range and what lies beyond it: the transforms' origins at singular ends, constant
tails towards x = +-inf or next to a flat point, power tails where g grows without bound."""

from __future__ import annotations

import math

import numpy as np
import sympy as sp

from .branches import Branch
from .domain import time_limit
from .errors import FitError, ScaleError
from .settings import MAX_TOLERANCE
from .float32 import F32_MAX, TINY32, f32, f32_below
from .formulas import X
from .model import ConstantSegment, ExactSegment
from .numeric import LIMIT_SECONDS
from .power_tail import fit_power_tail
from .reference import BranchReference
from .scan import scan_grid

__all__ = ["fit_range"]


def fit_range(b: Branch, ref: BranchReference, target: str, tol: float):
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
