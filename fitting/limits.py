"""Limits of f and f' at x = +-inf, and how f approaches a finite limit there (exponentially or like a power).

A limit is where the values settle on a geometric grid, sympy's ``limit`` where it agrees, or an
extrapolation of the values at x = 2^k; +-inf where they keep growing.
"""

from __future__ import annotations

import math

import numpy as np
import sympy as sp

from .domain import time_limit
from .errors import SpecError
from .formulas import X
from .numeric import LIMIT_SECONDS, float64_fault, precise

__all__ = ["value_at", "check_far_float64", "approach", "power_order", "FAR"]

FAR = 1e4            # "infinity" for numeric limits


def value_at(f, x: float, expr: sp.Expr | None = None, what: str = "f") -> float:
    """f at x, or its limit at x = +-inf: the value where f settles on |x| in [10, 1e5] (inf/inf
    NaNs far out are skipped), or +-inf when it keeps growing. Slowly converging limits (atan's
    pi/2 - 1/x) come from sympy's ``limit`` of ``expr`` when it finds one that the values agree
    with, else from extrapolating the values at x = 2^k (:func:`_extrapolate`)."""
    if not math.isinf(x):
        return float(f(np.array([x]))[0])
    xs, raw = _far_values(f, x)
    v = raw[~np.isnan(raw)]
    growing = v.size >= 8 and np.isfinite(v[-8:]).all() and abs(v[-1]) >= 2 * abs(v[-8]) > 0   # (1e-20*x: the
    if v.size >= 2 and np.isfinite(v[-2:]).all() and abs(v[-1] - v[-2]) <= 1e-12 * (1 + abs(v[-2])) \
            and not growing:                                               # steps are tiny, not settled)
        return float(v[-1]) if abs(v[-1]) > 1e-200 else 0.0
    if v.size >= 8 and (np.isinf(v[-1]) or (abs(v[-1]) > 1 and abs(v[-1]) >= 2 * abs(v[-8]))):
        if np.isinf(v[-1]) and expr is not None:
            _check_float64(expr, xs, raw, what)
        elif (far := _settled_far(f, x, expr)) is not None:
            return far
        return math.copysign(math.inf, v[-1])
    numeric_limit = _extrapolate(f, x)
    symbolic = _sympy_limit(expr, x) if expr is not None else None
    if symbolic is not None and (numeric_limit is None or _agree(symbolic, numeric_limit)):
        return symbolic
    if symbolic is not None and math.isfinite(symbolic):
        return _limit_far_values_approach(f, x, symbolic, numeric_limit, what)
    if numeric_limit is not None:
        return numeric_limit
    raise SpecError(f"{what} has no limit as x -> {'+' if x > 0 else '-'}inf (it neither settles nor diverges "
                    "by |x| = 2^63)")


def check_far_float64(f, x: float, expr: sp.Expr, what: str = "f") -> None:
    """The float64 refusal :func:`value_at` makes at x = +-inf (:func:`_check_float64`), made on its own:
    a caller can refuse a formula float64 cannot evaluate far out before slower checks (the scan of f')
    spend minutes on the noise that the same overflow or cancellation puts into f'."""
    xs, raw = _far_values(f, x)
    v = raw[~np.isnan(raw)]
    if v.size >= 8 and np.isinf(v[-1]):
        _check_float64(expr, xs, raw, what)


def _far_values(f, x: float) -> tuple[np.ndarray, np.ndarray]:
    """The geometric grid |x| in [10, 10 FAR] toward x = +-inf that :func:`value_at` reads, and f on it."""
    xs = np.copysign(np.geomspace(10.0, FAR * 10, 60), x)
    return xs, f(xs)


def _settled_far(f, x: float, expr: sp.Expr | None) -> float | None:
    """The value f settles on at |x| in [1e5, 1e300] (NaNs skipped) where it still grew steadily up to
    |x| = 1e5 (x*sigmoid(1e-6*x) -> 0, 1e6*erf(1e-6*x) -> 1e6: linear there, turning at 1e6), unless
    sympy's ``limit`` of ``expr`` answers otherwise; None where it does not settle (it diverges)."""
    with np.errstate(all="ignore"):
        v = f(np.copysign(np.geomspace(FAR * 10, 1e300, 60), x))
    v = v[~np.isnan(v)]
    if not (v.size >= 2 and np.isfinite(v[-2:]).all() and abs(v[-1] - v[-2]) <= 1e-12 * (1 + abs(v[-2]))):
        return None
    value = float(v[-1]) if abs(v[-1]) > 1e-200 else 0.0
    symbolic = _sympy_limit(expr, x) if expr is not None else None
    return value if symbolic is None or _agree(symbolic, value) else None


def _limit_far_values_approach(f, x: float, symbolic: float, numeric_limit: float, what: str) -> float:
    """Of sympy's finite limit and the extrapolated one (which disagree), the one that f's values at
    |x| in [2^63, 1e300] move towards without passing it (x/log|x|'s f' ~ 1/log|x| falls past the
    0.0114 that its slow steps extrapolate to, towards sympy's 0); refused where neither or both are."""
    with np.errstate(all="ignore"):
        v = f(np.copysign(np.geomspace(2.0 ** 63, 1e300, 60), x))
    v = v[np.isfinite(v)]
    fits = [lim for lim in (symbolic, numeric_limit) if v.size >= 2 and _approached(v, lim)]
    if len(fits) == 1:
        return fits[0]
    side = f"x -> {'+' if x > 0 else '-'}inf"
    raise SpecError(f"{what}'s limit as {side} is uncertain: sympy's limit {symbolic:.9g} and the "
                    f"extrapolation of its values at |x| = 2^k, {numeric_limit:.9g}, disagree, and its values "
                    "out to |x| = 1e300 do not tell which one they approach")


def _approached(v: np.ndarray, limit: float) -> bool:
    """Whether the values v move monotonically towards ``limit`` without passing it (to :func:`_agree`)."""
    if math.isinf(limit):
        step = np.diff(v)
        return bool(np.all(step * limit >= 0) and np.any(step != 0))
    gap = v - limit
    within = np.array([_agree(limit, float(u)) for u in v])
    same_side = np.all((gap >= 0) | within) or np.all((gap <= 0) | within)
    return bool(same_side and np.all(np.diff(np.abs(gap)) <= 1e-12 * (1 + abs(limit))))


def _check_float64(expr: sp.Expr, xs: np.ndarray, values: np.ndarray, what: str) -> None:
    """Refuse where float64 gives inf or nan at the first such x of ``xs`` but ``expr`` to 15 digits
    (:func:`precise`) is a float64 number there that is not growing (it is smaller in magnitude than
    at the grid point before): an overflow or a cancellation (asin(2*sigmoid(x) - 1)'s
    f' as x/0), not a property of f."""
    i = int(np.argmax(~np.isfinite(values)))
    exact = precise(expr, float(xs[i]))
    before = precise(expr, float(xs[i - 1])) if i > 0 else None
    growing = before is not None and exact is not None and abs(exact) > abs(before)   # toward +-inf indeed
    if exact is not None and abs(float(exact)) < 1.7e308 and not growing:
        raise float64_fault("", what, float(xs[i]), values[i], exact)


def _agree(a: float, b: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= 1e-6 * (1 + abs(a))


def _sympy_limit(expr: sp.Expr, x: float) -> float | None:
    """sympy's limit of ``expr`` at x = +-inf as a float (+-inf included), or None."""
    try:
        with time_limit(LIMIT_SECONDS):
            lim = sp.limit(expr, X, sp.oo if x > 0 else -sp.oo)
    except Exception:  # noqa: BLE001 - sympy fails in many ways; the numeric route decides then
        return None
    if lim in (sp.oo, -sp.oo):
        return float(lim)
    if not (lim.is_number and lim.is_real):
        return None
    try:
        value = float(lim)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _extrapolate(f, x: float) -> float | None:
    """The limit of f(2^k) (k -> inf) from its increments, when they shrink geometrically (a
    power-law approach |f - L| ~ |x|^-q gives the ratio 2^-q, Aitken's extrapolation is then exact
    to leading order), +-inf when they keep f growing at a steady pace (log-like growth), else None."""
    xs = np.copysign(2.0 ** np.arange(4, 64), x)
    v = f(xs)
    ok = np.isfinite(v)
    if ok.sum() < 12:
        return None
    v = v[ok]
    dv = np.diff(v)
    if np.all(np.abs(dv[-3:]) <= 1e-15 * (1 + np.abs(v[-3:]))):
        return float(v[-1])                  # settled to float64 precision by |x| = 2^63
    v, dv = v[-12:], dv[-11:]
    if np.all(dv > 0) or np.all(dv < 0):
        ratios = dv[1:] / dv[:-1]
        r = float(ratios[-1])
        if 0 < r <= 0.97 and np.all(np.abs(ratios[-4:] - r) <= 0.02):
            return float(v[-1] + dv[-1] * r / (1 - r))
        if np.all(ratios[-6:] >= 0.99):
            return math.copysign(math.inf, float(dv[-1]))
    return None


def _far_gaps(f, x: float, y: float) -> np.ndarray:
    """|f(x_k) - y| at x_k = +-2^k, k = 0 .. 63 (NaN where f is not finite)."""
    xs = np.copysign(2.0 ** np.arange(0, 64), x)
    return np.abs(f(xs) - y)


def approach(f, x: float, y: float) -> str:
    """How f reaches its finite limit y as x -> +-inf: "log" when the gap |f - y| shrinks faster
    than any power of x (exponentially: g has a log-type singularity, t = log|y' - y| is the right
    variable), "power" when it shrinks like |x|^-q."""
    d = _far_gaps(f, x, y)
    k = _first_small(d)
    if k is None:   # from above 1e-5 straight to 0 within an octave: faster than any power
        return "log" if (d == 0).any() else "power"
    if k + 2 >= d.size or not (d[k + 1] > 0 and d[k + 2] > 0):
        return "log"
    s1, s2 = math.log2(d[k] / d[k + 1]), math.log2(d[k + 1] / d[k + 2])
    return "log" if s2 > 1.3 * s1 + 0.5 else "power"


def _first_small(d: np.ndarray) -> int | None:
    """The first k with 0 < d[k] < 1e-5 (where the gap is small but far above float64 rounding)."""
    small = np.nonzero((d > 0) & (d < 1e-5))[0]
    return int(small[0]) if small.size else None


def power_order(f, x: float, y: float) -> float:
    """q in |f - y| ~ |x|^-q (rounded to an integer or half-integer when within 0.02 of one)."""
    d = _far_gaps(f, x, y)
    k = _first_small(d)
    if k is None or k + 2 >= d.size or not d[k + 2] > 0:
        ok = np.nonzero(d > 0)[0]
        k = max(int(ok[-1]) - 2, 0) if ok.size else 0
    q = math.log2(d[k + 1] / d[k + 2]) if k + 2 < d.size and d[k + 1] > 0 and d[k + 2] > 0 else math.inf
    if not math.isfinite(q):
        return q
    half = round(2 * q) / 2
    return half if abs(q - half) <= 0.02 else q
