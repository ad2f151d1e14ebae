"""The scan of f' for critical points (sign changes) and flat points (zeros keeping the sign): monotone parts.

f' is sampled on a fixed grid (:func:`scan_grid`: fine on [-SCAN, SCAN], geometric out to FAR_SCAN); each
sign change is bracketed by brentq, checked at 15 digits (:func:`.numeric.precise`) so that float64 overflow
invents none (more changes than the fitter handles that float64 alone shows to be real are refused
without it), and polished with mpmath. A piece is cut at its critical and flat points into monotone parts.
:func:`unresolved_changes` finds where f changes on a scale finer than the grid (f's steps against f').
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import sympy as sp
from scipy.optimize import brentq

from .errors import ScaleError, SpecError
from .formulas import X
from .numeric import numeric, precise
from .pieces import Piece, corner, corner_error

__all__ = ["monotone_parts", "scan_grid", "unresolved_at", "unresolved_changes", "SCAN", "FAR_SCAN", "MAX_CRITICAL"]

SCAN = 60.0          # critical points: a fine scan on [-SCAN, SCAN], coarser out to FAR_SCAN (scan_grid)
NEAR_POINTS = 20001  # scan_grid's points on [-SCAN, SCAN]
FAR_SCAN = 1e15      # branch points lie within |x| <= FAR_SCAN; a sign change of f' beyond it is refused
MAX_CRITICAL = 16
FAST_REFUSAL = MAX_CRITICAL + 4   # sign changes of f' that float64 shows to be real (_stable_changes): more are
                                 # refused without the 15-digit check of each
STABLE_ULPS = 4                  # real: f' at both sides moves by at most STABLE_RELATIVE of itself when x moves
STABLE_RELATIVE = 1e-6           # by this many ulps (noise from cancellation or overflow moves by ~all of it) ...
F_ROUNDING = 2.0 ** -40          # ... and f's steps beside the change exceed this of |f| (its rounding, with room)
UNBOUNDED_CHANGES = 1e6          # too many changes, reaching this far (decades into the scan's geometric part):
                                 # the evidence of infinitely many branches (sin(x))
PRECISE_BITS = 50   # evalf(15) gives 53 bits where it meets its 15 digits; fewer: no digit is right


def monotone_parts(piece: Piece):
    fp = sp.diff(piece.expr, X)
    if fp == 0 or (fp.is_number and float(fp) == 0.0):
        yield piece.lo, piece.hi, piece.lo_closed, piece.hi_closed, "constant"
        return
    crit = _critical_points(piece, fp)
    fpn = numeric(fp)
    cuts = [piece.lo] + sorted(crit + _flat_points(piece, fp, fpn, crit)) + [piece.hi]
    for j in range(len(cuts) - 1):
        a, b = cuts[j], cuts[j + 1]
        slope = _typical_slope(fpn, a, b, piece.removable)
        if slope == 0:
            raise _unresolved_error(piece, a, b)
        lo_c = piece.lo_closed if j == 0 else True
        hi_c = piece.hi_closed if j == len(cuts) - 2 else True
        yield a, b, lo_c, hi_c, ("increasing" if slope > 0 else "decreasing")


def _typical_slope(fpn, a: float, b: float, removable: list[float] = ()) -> float:
    """f' where it is largest on a grid inside (a, b), away from removable points (as
    :func:`scan_grid`): its sign is the branch's direction (a single interior point could be an
    inflection with f' = 0, as for x**3 at 0). Where f' is 0 on that whole grid, the scan's own
    points inside (a, b) decide (tanh(x - 1000) rises where the grid, within 30 of 0, sees none of
    it); 0 where f' is 0 (or not finite) at every one of those too."""
    lo = a if math.isfinite(a) else (min(b, 0.0) - 30.0 if math.isfinite(b) else -30.0)
    hi = b if math.isfinite(b) else (max(a, 0.0) + 30.0 if math.isfinite(a) else 30.0)
    v = _finite_or_zero(fpn(_away_from(np.linspace(lo, hi, 403)[1:-1], removable)))
    if not v.any():
        xs = scan_grid(a, b, removable)
        v = _finite_or_zero(fpn(xs[(xs > a) & (xs < b)]))
    return float(v[np.argmax(np.abs(v))]) if v.size else 0.0


def _finite_or_zero(v: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(v), v, 0.0)


def _unresolved_error(piece: Piece, a: float, b: float) -> ScaleError:
    """The refusal of a stretch of a non-constant piece where f' is 0 in float64 at every point the
    scan samples (tanh(1e20*(x - 0.001))/1e20): f changes only between those points, or by less than
    float64 holds; names f's largest step on the scan's grid."""
    xs = scan_grid(a, b, piece.removable)
    ys = numeric(piece.expr)(xs)
    with np.errstate(all="ignore"):
        steps = _finite_or_zero(np.abs(np.diff(ys)))
    text = (f"f' is 0 (in float64) at every point the scan samples on x in [{a:g}, {b:g}], yet the formula is not "
            "constant there: f changes on a scale of x finer than the scan's grid resolves (spacing "
            f"{2 * SCAN / (NEAR_POINTS - 1):g} for |x| <= {SCAN:g}, coarser outside)")
    if steps.size and steps.max() > 0:
        i = int(np.argmax(steps))
        return ScaleError(f"{text}; f's largest step on that grid is from y = {ys[i]:.6g} at x = {xs[i]:.6g} to "
                          f"y = {ys[i + 1]:.6g} at x = {xs[i + 1]:.6g}")
    return ScaleError(f"{text}, or by less than float64 holds: f has one value on that whole grid")


MEAN_VALUE_MISMATCH = 0.1   # f's step over [a, b] against (b - a)(f'(a) + f'(b))/2, relative to the larger: f'
                            # changes within [a, b] on a scale the points a and b do not resolve
MAX_FOLLOWED = 64           # grid intervals of the largest mismatch that unresolved_changes follows down
FULL_DIGITS = 1e-290        # ... where f's step or the trapezoid exceeds this (2^-963: 50 bits above subnormals)
MAX_HALVINGS = 200          # ... halving each at most this often (0.006 to 1e-62)


def unresolved_changes(fn: Callable[[np.ndarray], np.ndarray], fpn: Callable[[np.ndarray], np.ndarray], lo: float,
                       hi: float, removable: list[float] = ()) -> list[tuple[float, float]]:
    """Short intervals [a, b] of (lo, hi) where f changes in a way its scan (:func:`scan_grid`) does not
    resolve: from each grid interval where f's step disagrees with the trapezoid rule on f' at its ends
    by more than MEAN_VALUE_MISMATCH (the MAX_FOLLOWED worst), the half that disagrees more is taken
    until both agree or a and b are neighbouring doubles: [a, b] is then about f's scale of change
    there (x + tanh(1e20*x)/1e20: f' is 2 at the grid point 0 and 1 at the next, f rises by 1 times
    the spacing; halving ends at b ~ 1e-20). ``fn``, ``fpn``: float64 f and f'."""
    xs = scan_grid(lo, hi, removable)
    if xs.size < 2:
        return []
    ys, ps = fn(xs), fpn(xs)
    worst = _mismatch(xs[:-1], xs[1:], ys[:-1], ys[1:], ps[:-1], ps[1:])
    flagged = np.nonzero(worst > MEAN_VALUE_MISMATCH)[0]
    flagged = flagged[np.argsort(-worst[flagged], kind="stable")][:MAX_FOLLOWED]
    return [_follow_down(fn, fpn, float(xs[i]), float(xs[i + 1])) for i in sorted(flagged)]


def unresolved_at(fpn: Callable[[np.ndarray], np.ndarray], x: float, lo: float, hi: float,
                  removable: list[float] = ()) -> tuple[float, float] | None:
    """The points a < x < b of the scan's grid (:func:`scan_grid`) next to x where f' at x departs from
    its straight line between f'(a) and f'(b) by more than MEAN_VALUE_MISMATCH of the largest of the
    three: f' changes within [a, b] on a scale the grid does not resolve; None where it does not, or
    where one of them is not finite. ``fpn``: float64 f'."""
    xs = scan_grid(lo, hi, removable)
    i = int(np.searchsorted(xs, x, side="right")) - 1
    if i < 0 or i + 1 >= xs.size or not xs[i] < x < xs[i + 1]:
        return None
    a, b = float(xs[i]), float(xs[i + 1])
    with np.errstate(all="ignore"):
        pa, px, pb = (float(v) for v in fpn(np.array([a, x, b])))
    if not all(map(math.isfinite, (pa, px, pb))):
        return None
    line = pa + (pb - pa) * (x - a) / (b - a)
    return (a, b) if abs(px - line) > MEAN_VALUE_MISMATCH * max(abs(pa), abs(px), abs(pb)) else None


def _mismatch(a, b, ya, yb, pa, pb) -> np.ndarray:
    """|f(b) - f(a) - (b - a)(f'(a) + f'(b))/2| over the larger of the step and the trapezoid, 0 where
    that gap is within f's rounding (F_ROUNDING of |f|), both are below FULL_DIGITS (float64's
    numbers near its subnormals lose digits: gelu's f' at x = -38) or a value is not finite."""
    with np.errstate(all="ignore"):
        step, trapezoid = yb - ya, 0.5 * (b - a) * (pa + pb)
        gap = np.abs(step - trapezoid)
        out = gap / np.maximum(np.abs(step), np.abs(trapezoid))
        real = np.isfinite(out) & (gap > F_ROUNDING * np.maximum(np.abs(ya), np.abs(yb))) \
            & (np.maximum(np.abs(step), np.abs(trapezoid)) > FULL_DIGITS)
    return np.where(real, out, 0.0)


def _follow_down(fn, fpn, a: float, b: float) -> tuple[float, float]:
    """[a, b] halved into its half of the larger mismatch (:func:`_mismatch`) while that exceeds
    MEAN_VALUE_MISMATCH, at most MAX_HALVINGS times and down to neighbouring doubles."""
    def at(t: float) -> tuple[float, float]:
        x = np.array([t])
        return float(fn(x)[0]), float(fpn(x)[0])
    (ya, pa), (yb, pb) = at(a), at(b)
    for _ in range(MAX_HALVINGS):
        m = 0.5 * (a + b)
        if not a < m < b:
            break
        ym, pm = at(m)
        left, right = _mismatch(np.array([a, m]), np.array([m, b]), np.array([ya, ym]), np.array([ym, yb]),
                                np.array([pa, pm]), np.array([pm, pb]))
        if max(left, right) <= MEAN_VALUE_MISMATCH:
            break
        if left >= right:
            b, yb, pb = m, ym, pm
        else:
            a, ya, pa = m, ym, pm
    return a, b


REMOVABLE_GAP = 1e-4   # scan points within this (relative to max(1, |c|)) of a removable point c are left out


def _away_from(xs: np.ndarray, removable: list[float]) -> np.ndarray:
    """``xs`` without the points within :data:`REMOVABLE_GAP` of a removable point."""
    for c in removable:
        xs = xs[np.abs(xs - c) > REMOVABLE_GAP * max(1.0, abs(c))]
    return xs


def scan_grid(lo: float, hi: float, removable: list[float] = ()) -> np.ndarray:
    """x at which f' is sampled for sign changes on (lo, hi): 20001 points on [-SCAN, SCAN] (spacing
    0.006), spacing 0.024 out to |x| = 8 SCAN, then geometric (about 200 points a decade) out to
    |x| = FAR_SCAN; clipped to the piece (its finite ends included). Points next to a removable point
    (:data:`REMOVABLE_GAP`) are left out: float64 f and f' there are 0/0 or lose their digits (f' of
    t/(exp(t) - 1) with exp(-0.3) folded into a Float: ~1e-16/t^2), which would read as a sign change
    or a step against the branch's direction."""
    xs = _full_grid()
    xs = _away_from(xs[(xs > lo) & (xs < hi)], removable)
    return np.concatenate([[lo] if math.isfinite(lo) else [], xs, [hi] if math.isfinite(hi) else []])


@functools.lru_cache(maxsize=1)
def _full_grid() -> np.ndarray:
    """:func:`scan_grid`'s points on the whole line, built once (read-only: every caller clips a copy)."""
    near = np.linspace(-SCAN, SCAN, NEAR_POINTS)
    mid = np.linspace(SCAN, 8 * SCAN, 17501)
    far = np.geomspace(8 * SCAN, FAR_SCAN, 2401)
    xs = np.unique(np.concatenate([near, mid, far, -mid, -far]))
    xs.flags.writeable = False
    return xs


def _critical_points(piece: Piece, fp: sp.Expr) -> list[float]:
    """Sign changes of f' inside the piece, to float64 accuracy. Every sign change found on the scan
    (:func:`scan_grid`, out to |x| = FAR_SCAN) is a branch point; more than MAX_CRITICAL of them, or
    one beyond FAR_SCAN (:func:`_check_far_sign`), is refused: none is dropped. More than
    FAST_REFUSAL changes that float64 alone shows to be real (:func:`_stable_changes`) are refused
    before the 15-digit check of each (evalf of a long f' takes a second a point)."""
    fpn = numeric(fp)
    grid = scan_grid(piece.lo, piece.hi, piece.removable)
    stable = _stable_changes(numeric(piece.expr), fpn, grid)
    if stable.size > FAST_REFUSAL:
        first, last = (_bracketed_root(fpn, float(grid[i]), float(grid[i + 1])) for i in (stable[0], stable[-1]))
        raise _too_many_branches(piece, int(stable.size), first, last)
    roots = _sign_changes_on(fpn, grid, fp)
    if len(roots) > MAX_CRITICAL:
        raise _too_many_branches(piece, len(roots), roots[0], roots[-1])
    for side in (-1.0, 1.0):
        if (piece.hi if side > 0 else -piece.lo) > FAR_SCAN:
            _check_far_sign(fp, fpn, side)
    roots = [_polish_root(fp, r) for r in roots]
    for r in roots:
        if (sides := corner(fpn, r)) is not None:
            raise corner_error("f", r, sides)
    return roots


def _too_many_branches(piece: Piece, count: int, first: float, last: float) -> SpecError:
    """The refusal of ``count`` > MAX_CRITICAL sign changes of f' on the piece's scan: infinitely many
    branches where they go on to the scan's far end (sin(x)), else a finite number beyond the limit."""
    found = (f"f' changes sign {count} times on [{max(piece.lo, -FAR_SCAN):g}, {min(piece.hi, FAR_SCAN):g}] "
             f"(first at x = {first:.6g}, last at x = {last:.6g})")
    if max(abs(first), abs(last)) >= UNBOUNDED_CHANGES:
        return SpecError(f"{found}: the function appears to have infinitely many monotone branches, which a finite "
                         f"code cannot index (at most {MAX_CRITICAL + 1} branches per piece are supported)")
    return SpecError(f"{found}: f has more than {MAX_CRITICAL + 1} monotone branches there (at least {count + 1}; "
                     f"the fitter handles up to {MAX_CRITICAL + 1} per piece)")


def _stable_changes(fn, fpn, xs: np.ndarray) -> np.ndarray:
    """The grid intervals (index of their left point) where float64 f' changes sign in a way float64
    noise (a cancellation's rounding, an overflow's 0 or inf) does not fake: f' on both sides is
    finite, nonzero and moves by at most STABLE_RELATIVE of itself when x moves by STABLE_ULPS ulps
    either way, and f's own steps over the neighbouring grid intervals go the ways f' says, each by
    more than f's rounding (noise in f' lies where f has settled to float64's last digits)."""
    if xs.size < 4:
        return np.empty(0, dtype=np.int64)
    v, y = fpn(xs), fn(xs)
    s = np.sign(v)
    changes = np.nonzero(s[:-1] * s[1:] < 0)[0]
    changes = changes[(changes >= 1) & (changes + 2 < xs.size)]
    with np.errstate(all="ignore"):
        step = np.diff(y)
        seen = np.abs(step) > F_ROUNDING * np.maximum(np.abs(y[:-1]), np.abs(y[1:]))
        before, after = changes - 1, changes + 1
        real = (seen[before] & (np.sign(step[before]) == s[changes])
                & seen[after] & (np.sign(step[after]) == s[changes + 1]))
        for ends in (changes, changes + 1):
            x, at = xs[ends], v[ends]
            real &= np.isfinite(at) & (at != 0)
            for ulps in (-STABLE_ULPS, STABLE_ULPS):
                real &= np.abs(fpn(x + ulps * np.spacing(x)) - at) <= STABLE_RELATIVE * np.abs(at)
    return changes[real]


def _check_far_sign(fp: sp.Expr, fpn, side: float) -> None:
    """Refuse a sign change of f' beyond |x| = FAR_SCAN on one side, found by a geometric scan out
    to float64's largest values (a branch point there would lie beyond what the fit can resolve)."""
    far = _sign_changes_on(fpn, side * np.geomspace(FAR_SCAN, 1.7e308, 2937), fp)
    if far:
        raise SpecError(f"f' changes sign near x = {far[0]:.3g}, beyond |x| = {FAR_SCAN:g} where the fitter "
                        f"places branch points: f is not monotone as x -> {'+' if side > 0 else '-'}inf, "
                        "and such a far branch is not supported")


def _flat_points(piece: Piece, fp: sp.Expr, fpn, crit: list[float]) -> list[float]:
    """Zeros of f' where it keeps its sign (tanhshrink's x - tanh(x) at 0, f' ~ x^2; x**5): the
    branch is split there, since g ~ |y - y0|^(m/(m+1)) is singular at such a point on both sides.
    Candidates are strict local minima of |f'| on a grid; a zero of even order of f' is a sign change
    of f'', found by brentq, and kept where f' there is below 1e-12 of its values a grid step away.
    Refuses infinitely many (x + sin(x))."""
    xs = scan_grid(piece.lo, piece.hi, piece.removable)   # the critical points' grid: a flat point far out splits too
    if xs.size < 3:
        return []
    a = np.abs(fpn(xs))
    a = np.where(np.isfinite(a), a, np.inf)
    local = np.nonzero((a[1:-1] < a[:-2]) & (a[1:-1] < a[2:]) & (np.minimum(a[:-2], a[2:]) > 1e-250))[0] + 1
    fpp = numeric(sp.diff(fp, X))
    out: list[float] = []
    for i in local:
        if any(abs(xs[i] - c) <= 2 * (xs[i + 1] - xs[i - 1]) for c in crit):
            continue
        x0 = _second_root(fpp, float(xs[i - 1]), float(xs[i]), float(xs[i + 1]))
        if x0 is not None and abs(float(fpn(np.array([x0]))[0])) <= 1e-12 * min(a[i - 1], a[i + 1]) \
                and piece.lo < x0 < piece.hi and _precise_flat(fp, x0, float(xs[i - 1]), float(xs[i + 1])):
            out.append(x0)
    if len(out) > MAX_CRITICAL:
        raise SpecError(f"f' touches zero without changing sign {len(out)} times on [{xs[0]:g}, {xs[-1]:g}] (first at "
                        f"x = {out[0]:.6g}): infinitely many flat points, each a singularity of g")
    return out


def _precise_flat(fp: sp.Expr, x0: float, a: float, b: float) -> bool:
    """Whether |f'(x0)| <= 1e-12 |f'| at a and b to 15 correct digits (:func:`precise`): far out,
    float64 cancellation makes f' noise that can touch 0 (x/sqrt(1 + x**2) at |x| ~ 1e14); True
    where evalf cannot tell."""
    v0, va, vb = (precise(fp, t) for t in (x0, a, b))
    if v0 is None or va is None or vb is None:
        return True
    return bool(abs(v0) <= sp.Float(1e-12) * min(abs(va), abs(vb)))


def _second_root(fpp, a: float, m: float, b: float) -> float | None:
    """A zero of f'' in [a, b] (m, the grid point, if f''(m) is exactly 0), or None."""
    va, vm, vb = (float(v) for v in fpp(np.array([a, m, b])))
    if vm == 0:
        return m
    if va * vb >= 0 or not (math.isfinite(va) and math.isfinite(vb)):
        return None
    return _bracketed_root(fpp, a, b)


def _sign_changes_on(fpn, xs: np.ndarray, fp: sp.Expr | None = None) -> list[float]:
    """Sign changes of f' between neighbouring grid points xs (brentq), and grid points where f' is
    exactly 0 between opposite signs. With ``fp``, a change that f' to 15 correct digits shows to be
    a float64 artefact is dropped: overflow can flip the sign of a tiny f' (silu's
    x*exp(-x)/(1 + exp(-x))**2 becomes -0 at x = -355 while 1/(1 + exp(-x)) stays positive)."""
    if xs.size < 2:
        return []
    v = fpn(xs)
    s = np.sign(v)
    real = _precise_change(fp, xs)
    out = []
    for i in np.nonzero(s[:-1] * s[1:] < 0)[0]:
        if real(i, i + 1):
            out.append(_bracketed_root(fpn, float(xs[i]), float(xs[i + 1])))
    for i in np.nonzero((s[1:-1] == 0) & (s[:-2] * s[2:] < 0))[0]:
        if real(i, i + 2):
            out.append(float(xs[i + 1]))
    return sorted(out)


def _bracketed_root(fn, a: float, b: float) -> float:
    """A zero of the float64 function ``fn`` in [a, b], where fn(a) and fn(b) have opposite signs:
    brentq, and plain bisection where brentq does not converge in its 100 iterations. Brent's method
    can need far more than 100 steps at a multiple root (f' = 12*(x - 0.1)**3 of a quartic's flat
    minimum: float64 noise and the slow interpolation there), while bisection of a sign change always
    closes in on one within the same tolerance, in at most about 2100 halvings of a float64 interval."""
    one = lambda t: float(fn(np.array([t]))[0])   # noqa: E731
    root, info = brentq(one, a, b, xtol=1e-15, rtol=1e-15, full_output=True, disp=False)
    if info.converged:
        return float(root)
    fa = one(a)
    for _ in range(2200):
        m = 0.5 * (a + b)
        if not a < m < b or b - a <= 1e-15 + 1e-15 * abs(m):
            break
        fm = one(m)
        if fm == 0:
            return m
        if (fm < 0) == (fa < 0):
            a, fa = m, fm
        else:
            b = m
    return 0.5 * (a + b)


def _precise_change(fp: sp.Expr | None, xs: np.ndarray):
    """(i, j) -> False when f' to 15 correct digits (:func:`precise`) has the same nonzero sign at the
    grid points xs[i] and xs[j], else True (also where ``fp`` is None or evalf gives no real number).
    Where evalf gives f' with no significant digit (printed like 0.e-2597: a zero of f' on the grid,
    or a cancellation beyond evalf's 2000 bits, as x/(x/2 + exp(-x/3)) has far out), the next grid
    point outwards stands in; where that cannot tell either, float64's change is noise: False."""
    if fp is None:
        return lambda i, j: True
    signs: dict[int, int | None] = {}   # neighbouring changes share grid points: evalf each once

    def sign(k: int) -> int | None:
        if k not in signs:
            signs[k] = _precise_sign(fp, float(xs[k]))
        return signs[k]

    def told(k: int, step: int) -> int | None:
        s = sign(k)
        return sign(k + step) if s is None and 0 <= k + step < xs.size else s

    def change(i: int, j: int) -> bool:
        si, sj = told(i, -1), told(j, 1)
        if si is None or sj is None:
            return False
        return not (si != 0 and si == sj)
    return change


def _precise_sign(fp: sp.Expr, x: float) -> int | None:
    """The sign of f' at x to 15 correct digits (:func:`precise`): 0 where evalf gives no real number,
    None where its value has no significant digit."""
    v = precise(fp, x)
    if isinstance(v, sp.Float) and v._prec < PRECISE_BITS:
        return None
    return 0 if v is None else int(sp.sign(v))


def _polish_root(fp: sp.Expr, x0: float) -> float:
    """Refine a root of f' with mpmath at 30 digits; float64 result."""
    import mpmath
    try:
        f = sp.lambdify(X, fp, "mpmath")
        with mpmath.workdps(30):
            return float(mpmath.findroot(f, mpmath.mpf(x0)))
    except Exception:  # noqa: BLE001 - keep the bracketed root when mpmath cannot refine it
        return float(x0)
