"""Power tails: the end of a branch where y -> +-inf and g = f'(f^-1(y)) grows without bound like
|y|^((n-1)/n), because |f| ~ |x|^n (x**3 - x: n = 3, g ~ 3 |y|^(2/3)).

There g = w(y) h(t) with t = |y|^(-1/n) and w = |y|^((n-1)/n): h is smooth in t up to t = 0 (x**3 - x:
x = y^(1/3) v with v^3 - v t^2 = 1, so h = 3 v^2 - t^2 is analytic in t^2), so h is fitted as a
polynomial in t, piece by piece from t = 0 (y = float32 max) inward, and the segments are
:class:`.segments.PowerTailSegment`. Errors are relative (|g| >= 1 on the whole tail), and proved so
by :func:`.power_bound.tail_bound` in Arb ball arithmetic.

n = infinity (f grows faster than any power of x, g/|y| -> c != 0: x + exp(x), sinh) is root 0:
g = |y| h(t), t = log|y|, the weight exact (no root). There h is smooth (x + exp(x): h = 1 + (1 - x)/y,
h - 1 ~ -t e^-t) and constant to float32 rounding a little way out.
"""

from __future__ import annotations

import math

import numpy as np
import sympy as sp

from ..common.float32_scheme import ROOT_ORDERS
from .branches import Branch
from .domain import time_limit
from .errors import FitError
from .fit import DEGREES, F32_SLACK, SAFETY, fit_piece, layout_cost
from .float32 import F32_MAX, f32, ordinal_nodes
from .formulas import X
from .numeric import numeric
from .reference import BranchReference
from .segments import PowerTailSegment, Transform

__all__ = ["growth_order", "fit_power_tail"]

ASYMPTOTIC = 0.5      # the tail starts where x f'/f is within this fraction of n, |g| >= 1 and
Y_MIN = 2.0           # |y| >= Y_MIN (t = |y|^(-1/n) <= 2^(-1/n): away from the branch's other end)
MAX_TAIL_PIECES = 16


def growth_order(b: Branch, which: str) -> int:
    """n = lim x f'(x) / f(x) as x -> +-inf at the ``which`` end of ``b`` (|f| ~ |x|^n): by sympy
    where it answers within a few seconds, else numerically; 0 where n is infinite and g/|y| tends to a
    nonzero constant (:func:`_exponential`); FitError unless n is 0 or one of ROOT_ORDERS."""
    x_inf = b.x_at_y_end(which)
    n = None
    try:
        with time_limit(5.0):
            lim = sp.limit(X * sp.diff(b.expr, X) / b.expr, X, sp.oo if x_inf > 0 else -sp.oo)
        if lim.is_number and lim.is_finite:
            n = float(lim)
        elif lim.is_infinite:
            n = math.inf
    except (TimeoutError, NotImplementedError, ValueError, TypeError):
        pass
    if n is None:        # numerically: x f'/f far out, where it has settled
        f, fp = numeric(b.expr), numeric(sp.diff(b.expr, X))
        xs = math.copysign(1.0, x_inf) * np.array([1e6, 1e8])
        with np.errstate(all="ignore"):
            v = xs * fp(xs) / f(xs)
        n = float(v[-1]) if abs(v[-1] - v[0]) <= 1e-4 * abs(v[-1]) else math.inf
    if math.isinf(n):
        return _exponential(b, x_inf)
    k = round(n)
    if k not in ROOT_ORDERS or abs(n - k) > 1e-6:
        raise FitError(f"branch {b.index}: g = f' grows without bound as x -> {x_inf:+g} and f grows like "
                       f"|x|^{n:.6g}; power tails take |f| ~ |x|^n with n one of {', '.join(map(str, ROOT_ORDERS))} "
                       "(or f exponential, g ~ c|y|)", None, "")
    return k


def _exponential(b: Branch, x_inf: float) -> int:
    """0 if g/|y| = |f'/f| tends to a nonzero constant as x -> x_inf (f grows exponentially): sympy's
    limit where it answers, else |f'/f| where |f| = 1e30 and 1e36 agreeing to 1 %; else FitError."""
    ratio = sp.Abs(sp.diff(b.expr, X) / b.expr)
    c = None
    try:
        with time_limit(5.0):
            lim = sp.limit(ratio, X, sp.oo if x_inf > 0 else -sp.oo)
        c = float(lim) if lim.is_number and lim.is_finite else (math.inf if lim.is_infinite else None)
    except (TimeoutError, NotImplementedError, ValueError, TypeError):
        pass
    if c is None:
        f, r = numeric(b.expr), numeric(ratio)
        vals = []
        for level in (30.0, 36.0):   # x where |f| = 10^level: bisection in x on log10|f|
            lo, hi = 0.0, x_inf if math.isfinite(x_inf) else math.copysign(1e6, x_inf)
            with np.errstate(all="ignore"):
                for _ in range(200):
                    mid = 0.5 * (lo + hi)
                    lo, hi = (mid, hi) if math.log10(abs(float(f(np.array([mid]))[0])) + 1e-300) < level else (lo, mid)
                vals.append(float(r(np.array([lo]))[0]))
        c = vals[1] if abs(vals[1] - vals[0]) <= 0.01 * abs(vals[1]) else math.nan
    if 0 < c < math.inf:
        return 0
    how = {0.0: "tends to 0 (g grows more slowly than |y|)", math.inf: "grows without bound (g faster than |y|)"}
    raise FitError(f"branch {b.index}: g = f' grows without bound as x -> {x_inf:+g} and f grows faster than any "
                   f"power of x, but g/|y| {how.get(c, 'does not settle')}; exponential tails take g ~ c|y|, "
                   "c != 0", None, "")


class _Weighted:
    """h(y) = g(y) / w(y), w = |y|^((n-1)/n) (|y| for n = 0), with the reference's inverse (what
    ``fit_piece`` reads)."""

    def __init__(self, ref: BranchReference, n: int, sign: int):
        self.ref, self.n, self.sign, self.target = ref, n, sign, ref.target

    def __call__(self, y):
        y = np.asarray(y, dtype=np.float64)
        return self.ref(y) / ((self.sign * y) ** ((self.n - 1) / self.n) if self.n else self.sign * y)


def _start(b: Branch, ref: BranchReference, which: str, n: int) -> float:
    """x where the tail starts: from there on, x f'/f is within ASYMPTOTIC of n (for n = 0: g/|y| within
    ASYMPTOTIC of its value far out), |g| >= 1 and |y| >= Y_MIN."""
    x_inf = b.x_at_y_end(which)
    lo, hi = b.x_range
    inner = hi if x_inf < 0 else lo
    inner = abs(inner) if math.isfinite(inner) else 0.0
    sign = 1.0 if which == "upper" else -1.0      # y's sign at this end (y -> +inf at the upper end)
    far = 1e12 if n else float(np.abs(ref.inverse(np.array([sign * F32_MAX]), bulk=False)[0]))
    xs = math.copysign(1.0, x_inf) * np.geomspace(max(inner, 1.0) * 1.01, far, 4000)
    with np.errstate(all="ignore"):
        y = ref.f(xs)
        if n:
            settled = np.abs(xs * ref.fp(xs) / y - n) <= ASYMPTOTIC * n
        else:
            h = np.abs(ref.fp(xs) / y)
            settled = np.abs(h - h[-1]) <= ASYMPTOTIC * h[-1]
        bad = ~(settled & (np.abs(ref.fp(xs)) >= 1.0) & (sign * y >= Y_MIN))
    k = int(np.nonzero(bad)[0][-1]) + 1 if bad.any() else 0
    if k >= xs.size:
        raise FitError(f"branch {b.index}: f does not settle to {f'|x|^{n}' if n else 'exponential'} growth by "
                       f"|x| = {far:g}", None, "")
    return float(xs[k])


def fit_power_tail(b: Branch, ref: BranchReference, which: str, tol: float) -> tuple[float, list[PowerTailSegment]]:
    """(float32 y where the fitted part of the branch ends, the tail's segments in ascending y) for an
    end where y -> +-inf and g grows like |y|^((n-1)/n)."""
    n = growth_order(b, which)
    sign = 1 if which == "upper" else -1
    x0 = _start(b, ref, which, n)
    y0 = f32(float(ref.f(np.array([x0]))[0]))
    tf = Transform("power", (), sign, n)
    h = _Weighted(ref, n, sign)
    best = None
    for degree in DEGREES:
        pieces = _greedy(h, ref, tf, y0, degree, tol)
        if pieces is not None and (best is None or layout_cost(degree, len(pieces)) < layout_cost(*best[0])):
            best = (degree, len(pieces)), pieces
        if best is not None and layout_cost(degree + 2, 1) >= layout_cost(*best[0]):
            break
    if best is None:
        raise FitError(f"branch {b.index}: no power tail of up to {MAX_TAIL_PIECES} polynomial pieces in "
                       f"{tf.describe()} meets {tol:g} beyond y = {y0:g}", None, "")
    segs = sorted(best[1], key=lambda s: s.lo)
    outer = segs[-1] if sign > 0 else segs[0]
    outer.y_range[1 if sign > 0 else 0] = b.y_range[1 if sign > 0 else 0]     # up to +-inf
    for s in segs:
        s.branch = b.index
    return y0, segs


def _greedy(h: _Weighted, ref: BranchReference, tf: Transform, y0: float, degree: int, tol: float):
    """Pieces of ``degree`` from the outer end (|y| = float32 max) in to |y0|, each the largest
    (bisection in v = |y|^(-1/n), or -log|y| for n = 0) that meets the tolerance; None past MAX_TAIL_PIECES."""
    sign, n = tf.sign, tf.root
    t_in = _v(abs(y0), n)
    out, t_a = [], _v(F32_MAX, n)
    while t_a < t_in:
        if len(out) >= MAX_TAIL_PIECES:
            return None
        whole = _piece(h, ref, tf, t_a, t_in, degree, tol)
        if whole is not None:
            out.append(whole)
            break
        lo_w, hi_w, good = 0.0, 1.0, None
        for _ in range(12):
            w = 0.5 * (lo_w + hi_w)
            trial = _piece(h, ref, tf, t_a, t_a + w * (t_in - t_a), degree, tol)
            if trial is not None:
                lo_w, good = w, trial
            else:
                hi_w = w
        if good is None:
            return None
        out.append(good)
        t_a = _v(abs(good.lo if sign > 0 else good.hi), n)
    return out


def _v(a: float, n: int) -> float:
    """The greedy's variable, increasing inward: a^(-1/n), or -log a for n = 0."""
    return a ** (-1.0 / n) if n else -math.log(a)


def _a(v: float, n: int) -> float:
    """|y| at the greedy's variable v (float32 max at the outer end)."""
    if n:
        return v ** -float(n) if v > 0 else F32_MAX
    return math.exp(-v) if -v < math.log(F32_MAX) else F32_MAX


def _piece(h, ref, tf: Transform, t_a: float, t_b: float, degree: int, tol: float) -> PowerTailSegment | None:
    """The fitted piece for v in [t_a, t_b] (float32 y ends), if it meets SAFETY * tol relative in real
    arithmetic and tol + F32_SLACK in the float32 scheme (sampled)."""
    sign, n = tf.sign, tf.root
    ys = sorted(f32(sign * min(_a(t, n), F32_MAX)) for t in (t_a, t_b))
    ys = [max(min(v, F32_MAX), -F32_MAX) for v in ys]
    if not ys[0] < ys[1]:
        return None
    with np.errstate(over="ignore"):     # fit_piece's float32 sample may round past float32 max (dropped)
        p = fit_piece(h, ys[0], ys[1], tf, degree)
    hs = np.abs(h(np.array(ys)))
    rel = p.error / float(np.min(hs)) if math.isfinite(p.error) else math.inf
    if not rel <= SAFETY * tol:
        return None
    seg = PowerTailSegment(list(ys), None, tf, p.center, p.scale, list(p.coeffs), p.c0_lo, rel)
    y = np.concatenate([ordinal_nodes(ys[0], ys[1], 2048), np.geomspace(abs(ys[0]), abs(ys[1]), 2048) * sign, ys])
    if not seg.scheme_error(ref, y.astype(np.float32)) <= tol + F32_SLACK:
        return None
    return seg
