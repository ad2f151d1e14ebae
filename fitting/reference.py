"""Independent float64 reference: x = f_b^-1(y) by bracketed Newton, and g_b(y) = f'(x) (or x).

Never uses a fitted table. A dense monotone table (x_i, f(x_i)) along the branch gives brackets and
starting points; Newton steps that leave the bracket are replaced by bisection, so convergence is
guaranteed also next to a branch point, where f' -> 0.

Two modes share that scheme. The default (the fitter's) starts Newton by linear interpolation in an
asinh-spaced table and accepts a step of relative size <= 1e-8. ``bulk=True`` (certification: 2^24
float32 values and more per branch) is built for throughput and is at least as accurate:

- the table also has nodes evenly spaced in float32 order of y (where certification samples),
  inverted once by the same bracketed Newton, and f' at every node;
- a cubic Hermite interpolant of x(y) (slopes 1/f'; linear on the few cells where the cubic would
  not be monotone, by the Fritsch-Carlson test, e.g. next to a branch point) starts Newton within
  ~1e-12 relative almost everywhere, so one step usually suffices (1.0000-1.0004 f evaluations
  per value on the built-ins, against 2-60 in the default mode);
- a step s is final when |s| <= 1e-8 |x| (the default mode's test) AND the error it leaves,
  K s^2 with K = max|f''| / 2|f'| (quadratic convergence), is <= 2^-53 |x|; max|f''| on a cell is
  taken as 4x the largest divided difference of f' over the cell and its two neighbours. Otherwise
  Newton continues (bisection where a step leaves the bracket) under the same test;
- f and f' come from one lambdified function with common subexpressions shared and small integer
  powers written as products (:func:`.numeric.numeric_many`), so values differ from the default
  mode's in the last float64 digits.
"""

from __future__ import annotations

import math

import numpy as np
import sympy as sp

from .branches import Branch
from .float32 import ordinal_nodes
from .formulas import X
from .numeric import numeric, numeric_fast, numeric_many, raw_values

__all__ = ["BranchReference"]

TABLE_SIZE = 1 << 16          # asinh-spaced x nodes
MAX_ITER = 80
BULK_CHUNK = 1 << 16          # bulk mode: values per vectorised pass (cache-sized)
STEP_REL = 1e-8               # a Newton step is final only if |s| <= STEP_REL |x| ...
EPS = 2.0 ** -53              # ... and (bulk mode) the error it leaves, K s^2, is <= EPS |x|
CURVATURE_SAFETY = 4.0        # max|f''| on a cell <= this x the largest divided difference nearby


class BranchReference:
    """Vectorised inverse and target values on one monotone branch."""

    def __init__(self, branch: Branch, target: str = "derivative", bulk: bool = False):
        if branch.flat:
            raise ValueError("a flat branch has no inverse")
        self.branch = branch
        self.target = target
        self.bulk = bulk
        fp_expr = sp.diff(branch.expr, X)
        self.f = numeric(branch.expr)
        self.fp = numeric(fp_expr)
        self.x_table = _grid(branch, self.f)
        y = self.f(self.x_table)
        order = np.argsort(y, kind="stable")
        self.y_sorted, self.x_sorted = y[order], self.x_table[order]
        self.increasing = branch.direction == "increasing"
        if bulk:
            self._fp_fast = numeric_fast(fp_expr)
            self._f_fp = numeric_many([branch.expr, fp_expr])
            self._bulk_table(self.x_sorted, self.y_sorted)
            yo = ordinal_nodes(float(self.y_sorted[0]), float(self.y_sorted[-1]))   # bulk: y nodes evenly spaced in float32 order
            xo = self.inverse(yo)
            self._bulk_table(np.concatenate([self.x_sorted, xo[np.isfinite(xo)]]))

    def value(self, x: np.ndarray, bulk: bool | None = None) -> np.ndarray:
        """The target at x: f'(x) for the derivative target, x for the inverse target.
        ``bulk=False`` on a bulk reference: the default mode's values."""
        x = np.asarray(x, dtype=np.float64)
        if self.target != "derivative":
            return x
        bulk = self.bulk if bulk is None else bulk and self.bulk
        v = self._fp_fast(x) if bulk else self.fp(x)
        if bulk and not np.isnan(v.sum()):
            return v
        bad = np.isnan(v) & ~np.isnan(x)      # inf/inf far out: the limit at that end
        if bad.any():
            lo_lim, hi_lim = (self.branch.limits.get(w, np.nan) for w in ("lower", "upper"))
            near_lo_y = (x < 0) == (self.branch.direction != "decreasing")
            v[bad] = np.where(near_lo_y[bad], lo_lim, hi_lim)
        return v

    def __call__(self, y: np.ndarray) -> np.ndarray:
        """g_b(y), y clamped to the branch's range (rounded outputs below y_min give g(y_min))."""
        return self.value(self.inverse(y))

    def inverse(self, y: np.ndarray, bulk: bool | None = None) -> np.ndarray:
        """x = f^-1(y); ``bulk=False`` on a bulk reference: the default mode's values."""
        y = np.asarray(y, dtype=np.float64)
        out = np.empty_like(y)
        flat = y.ravel()
        res = out.ravel()
        bulk = self.bulk if bulk is None else bulk and self.bulk
        solve, chunk = (self._inverse_bulk, BULK_CHUNK) if bulk else (self._inverse, 1 << 20)
        for start in range(0, flat.size, chunk):
            res[start:start + chunk] = solve(flat[start:start + chunk])
        return out

    # -- default mode ------------------------------------------------------------------------

    def _inverse(self, y: np.ndarray) -> np.ndarray:
        ys, xs = self.y_sorted, self.x_sorted
        nan = np.isnan(y)
        y = np.clip(np.where(nan, ys[0], y), ys[0], ys[-1])
        k = np.clip(np.searchsorted(ys, y), 1, ys.size - 1)
        y0, dy = ys[k - 1], ys[k] - ys[k - 1]
        lo_x, hi_x = xs[k - 1], xs[k]            # f(lo_x) <= y <= f(hi_x) in y order
        w = np.divide(y - y0, dy, out=np.full_like(y, 0.5), where=dy > 0)
        x = lo_x + w * (hi_x - lo_x)
        idx = np.arange(y.size)
        xa, ya, la, ha = x, y, lo_x, hi_x
        f, fp = self.f, self.fp
        with np.errstate(all="ignore"):
            for _ in range(MAX_ITER):
                r = raw_values(f, xa) - ya
                below = r < 0                    # f(xa) < y: the root lies on the hi side in y order
                la = np.where(below, xa, la)
                ha = np.where(below, ha, xa)
                step = r / raw_values(fp, xa)
                xn = xa - step
                # A Newton step of relative size <= 1e-8 leaves an error ~ (f''/2f') step^2 <= 1e-15 |x|
                # (quadratic convergence), so that x is final, even when rounding puts it on the
                # bracket's edge; otherwise a step leaving the bracket is replaced by bisection.
                conv = np.abs(step) <= STEP_REL * np.abs(xa) + 1e-300
                lo, hi = np.minimum(la, ha), np.maximum(la, ha)
                ok = conv | ((xn > lo) & (xn < hi))
                zero = r == 0
                xn = np.where(zero, xa, np.where(ok, xn, 0.5 * (la + ha)))
                done = conv | zero | (hi - lo <= 4e-16 * np.abs(xa))
                x[idx] = xn
                if done.all():
                    break
                keep = ~done
                idx, xa, ya, la, ha = idx[keep], xn[keep], ya[keep], la[keep], ha[keep]
        x[nan] = np.nan
        return x

    # -- bulk mode ---------------------------------------------------------------------------

    def _bulk_table(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        """Nodes sorted by y, with f' at each, per-cell Hermite coefficients and curvature bounds."""
        y = self._f_fp(x)[0] if y is None else y
        order = np.argsort(y, kind="stable")
        xs, ys = x[order], y[order]
        ds = self._f_fp(xs)[1]
        self._b_ys = ys
        h, dx = np.diff(ys), np.diff(xs)
        with np.errstate(all="ignore"):
            inv_h = 1.0 / h
            inv_h = np.where((h > 0) & np.isfinite(inv_h), inv_h, 0.0)   # t = 0 in empty cells
            a1 = h / ds[:-1]                     # h * dx/dy at both ends of the cell
            b1 = h / ds[1:]
            a2 = 3 * dx - 2 * a1 - b1
            a3 = a1 + b1 - 2 * dx
            # the cubic is monotone on the cell (so within [x0, x1]) when the end slopes have dx's
            # sign and alpha^2 + beta^2 <= 9 (Fritsch-Carlson); elsewhere the start is linear
            alpha, beta = a1 / dx, b1 / dx
            ok = (inv_h > 0) & (alpha >= 0) & (beta >= 0) & (alpha * alpha + beta * beta <= 9.0) \
                & np.isfinite(a2) & np.isfinite(a3)
            dd = np.abs(np.diff(ds)) / np.abs(dx)  # divided differences of f': f'' somewhere inside
        dd = np.where(np.isnan(dd), np.inf, dd)
        dd = np.where((dx == 0) & (np.diff(ds) == 0), 0.0, dd)
        near = np.maximum(dd, np.maximum(np.concatenate([dd[:1], dd[:-1]]), np.concatenate([dd[1:], dd[-1:]])))
        # per cell: y0, 1/h, x0, the cubic's coefficients in t = (y - y0) / h, K |f'|; x1
        self._b_cells = [ys[:-1], inv_h, xs[:-1], np.where(ok, a1, dx), np.where(ok, a2, 0.0),
                         np.where(ok, a3, 0.0), CURVATURE_SAFETY / 2 * near]
        self._b_x1 = xs[1:]

    def _inverse_bulk(self, y: np.ndarray) -> np.ndarray:
        ys = self._b_ys
        has_nan = bool(np.isnan(y.sum()))           # (or infinities of both signs: rare, harmless)
        nan = np.isnan(y) if has_nan else None
        y = np.clip(np.where(nan, ys[0], y) if has_nan else y, ys[0], ys[-1])
        k = _search(ys, y)
        np.clip(k, 1, ys.size - 1, out=k)
        k -= 1
        y0, inv_h, lo_x, a1, a2, a3, curv = (np.take(c, k) for c in self._b_cells)
        t = (y - y0) * inv_h                        # in [0, 1]: f(x0) <= y <= f(x1)
        x = lo_x + t * (a1 + t * (a2 + t * a3))
        # one Newton step, final where the test accepts it (nearly everywhere)
        fx, d = self._f_fp(x)
        r = fx - y
        with np.errstate(all="ignore"):
            step = r / d
            xn = x - step
            conv = _converged(step, xn, d, curv)
        if not conv.all():
            rest = np.nonzero(~conv)[0]
            rr, xr = r[rest], x[rest]
            below = rr < 0                           # f(x) < y: the root lies on the hi side in y order
            la, ha = lo_x[rest], np.take(self._b_x1, k[rest])
            la, ha = np.where(below, xr, la), np.where(below, ha, xr)
            start = xn[rest]
            inside = (start > np.minimum(la, ha)) & (start < np.maximum(la, ha))
            start = np.where(inside, start, 0.5 * (la + ha))
            exact = rr == 0
            todo = np.nonzero(~exact)[0]
            xr[todo] = self._newton_bulk(y[rest][todo], start[todo], la[todo], ha[todo], curv[rest][todo])
            xn[rest] = xr
        if has_nan:
            xn[nan] = np.nan
        return xn

    def _newton_bulk(self, y, x, la, ha, curv) -> np.ndarray:
        """Bracketed Newton from x; la/ha: the bracket's ends on the low/high y side."""
        idx = np.arange(y.size)
        xa, ya = x, y
        for _ in range(MAX_ITER):
            fx, d = self._f_fp(xa)
            r = fx - ya
            below = r < 0
            la = np.where(below, xa, la)
            ha = np.where(below, ha, xa)
            with np.errstate(all="ignore"):
                step = r / d
                xn = xa - step
                conv = _converged(step, xn, d, curv)
            inside = (xn > np.minimum(la, ha)) & (xn < np.maximum(la, ha))
            # a final step may land on the bracket's edge by rounding; any other step leaving it
            # is replaced by bisection
            xn = np.where(conv | inside, xn, 0.5 * (la + ha))
            xn = np.where(r == 0, xa, xn)
            done = conv | (r == 0) | (np.abs(ha - la) <= 4e-16 * np.abs(xa))
            x[idx] = xn
            keep = ~done
            if not keep.any():
                break
            idx, xa, ya, la, ha, curv = idx[keep], xn[keep], ya[keep], la[keep], ha[keep], curv[keep]
        return x


def _converged(step, xn, d, curv):
    """The Newton step that gave xn is final: small (the default mode's test), and the error it
    leaves, (max|f''| / 2|f'|) step^2, is within 2^-53 |xn|."""
    scale = np.abs(xn)
    scale += 1e-300
    a = np.abs(step)
    small = a <= STEP_REL * scale
    a *= a
    a *= curv
    scale *= EPS
    scale *= np.abs(d)
    return small & (a <= scale)


def _search(table: np.ndarray, y: np.ndarray) -> np.ndarray:
    """np.searchsorted(table, y); for sorted y (certification's values come in order) by searching
    the few table entries inside y's range in y instead, several times faster."""
    if y.size < 64 or not (y[1:] >= y[:-1]).all():
        return np.searchsorted(table, y)
    a, b = np.searchsorted(table, [y[0], y[-1]])
    right = np.searchsorted(y, table[a:b], side="right")   # table[a + j] < y[i]  <=>  right[j] <= i
    return a + np.cumsum(np.bincount(right, minlength=y.size + 1)[:y.size])


def _grid(branch: Branch, f) -> np.ndarray:
    """x points along the branch, asinh-spaced, reaching far enough to cover every float32 y."""
    (lo, hi), (y_lo, y_hi) = branch.x_range, branch.y_range
    y_at_lo, y_at_hi = (y_lo, y_hi) if branch.direction != "decreasing" else (y_hi, y_lo)
    near = 1e-9 * (y_hi - y_lo if math.isfinite(y_hi - y_lo) else 1.0 + max(abs(y_lo), abs(y_hi)))
    lo, hi = (_far_end(lo, hi, f, -1, y_at_lo, near) if math.isinf(lo) else lo,
              _far_end(hi, lo, f, +1, y_at_hi, near) if math.isinf(hi) else hi)
    s = np.linspace(np.arcsinh(lo), np.arcsinh(hi), TABLE_SIZE)
    x = np.sinh(s)
    x[0], x[-1] = lo, hi
    return x


def _far_end(inf: float, other: float, f, sign: int, y_limit: float, near: float) -> float:
    """A finite stand-in for x = +-inf: y has settled (to 1e-300 over one step) within ``near`` of
    its limit ``y_limit``, or passed float32's range. A plateau away from the limit is passed: x = 1
    and 2.25 give y = 0 in tanh(x) + tanh(x - 1000), which still rises to 2 at x = 1000."""
    x = (other if math.isfinite(other) else 0.0) + sign
    prev = float(f(np.array([x]))[0])
    for _ in range(400):
        x_next = x * 1.25 + sign if x * sign > 0 else x + sign
        y = float(f(np.array([x_next]))[0])
        if not math.isfinite(y) or (abs(y - prev) < 1e-300 and abs(y - y_limit) <= near):
            return x
        if abs(y) > 3.5e38:        # past the largest float32: every float32 y is covered
            return x_next
        x, prev = x_next, y
    return x
