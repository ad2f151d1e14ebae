"""Independent float64 reference: x = f_b^-1(y) by bracketed Newton, and g_b(y) = f'(x) (or x).

Never uses a fitted table. A dense monotone table (x_i, f(x_i)) along the branch gives brackets and
starting points; Newton steps that leave the bracket are replaced by bisection, so convergence is
guaranteed also next to a branch point, where f' -> 0.
"""

from __future__ import annotations

import math

import numpy as np
import sympy as sp

from .branches import Branch, numeric
from .formulas import X

__all__ = ["BranchReference"]

TABLE_SIZE = 1 << 16
MAX_ITER = 80


class BranchReference:
    """Vectorised inverse and target values on one monotone branch."""

    def __init__(self, branch: Branch, target: str = "derivative"):
        if branch.flat:
            raise ValueError("a flat branch has no inverse")
        self.branch = branch
        self.target = target
        self.f = numeric(branch.expr)
        self.fp = numeric(sp.diff(branch.expr, X))
        self.x_table = _grid(*branch.x_range, self.f)
        y = self.f(self.x_table)
        order = np.argsort(y, kind="stable")
        self.y_sorted, self.x_sorted = y[order], self.x_table[order]
        self.increasing = branch.direction == "increasing"

    def value(self, x: np.ndarray) -> np.ndarray:
        """The target at x: f'(x) for the derivative target, x for the inverse target."""
        x = np.asarray(x, dtype=np.float64)
        if self.target != "derivative":
            return x
        v = self.fp(x)
        bad = np.isnan(v) & ~np.isnan(x)      # inf/inf far out: the limit at that end
        if bad.any():
            lo_lim, hi_lim = (self.branch.limits.get(w, np.nan) for w in ("lower", "upper"))
            near_lo_y = (x < 0) == (self.branch.direction != "decreasing")
            v[bad] = np.where(near_lo_y[bad], lo_lim, hi_lim)
        return v

    def __call__(self, y: np.ndarray) -> np.ndarray:
        """g_b(y), y clamped to the branch's range (rounded outputs below y_min give g(y_min))."""
        return self.value(self.inverse(y))

    def inverse(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        out = np.empty_like(y)
        flat = y.ravel()
        res = out.ravel()
        for start in range(0, flat.size, 1 << 20):
            res[start:start + (1 << 20)] = self._inverse(flat[start:start + (1 << 20)])
        return out

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
        for _ in range(MAX_ITER):
            r = self.f(xa) - ya
            below = r < 0                        # f(xa) < y: the root lies on the hi side in y order
            la = np.where(below, xa, la)
            ha = np.where(below, ha, xa)
            with np.errstate(all="ignore"):
                step = r / self.fp(xa)
            xn = xa - step
            # A Newton step of relative size <= 1e-8 leaves an error ~ (f''/2f') step^2 <= 1e-15 |x|
            # (quadratic convergence), so that x is final, even when rounding puts it on the
            # bracket's edge; otherwise a step leaving the bracket is replaced by bisection.
            conv = np.abs(step) <= 1e-8 * np.abs(xa) + 1e-300
            bad = ~conv & ~((xn > np.minimum(la, ha)) & (xn < np.maximum(la, ha)))
            xn = np.where(bad, 0.5 * (la + ha), xn)
            xn = np.where(r == 0, xa, xn)
            done = conv | (r == 0) | (np.abs(ha - la) <= 4e-16 * np.abs(xa))
            x[idx] = xn
            keep = ~done
            if not keep.any():
                break
            idx, xa, ya, la, ha = idx[keep], xn[keep], ya[keep], la[keep], ha[keep]
        x[nan] = np.nan
        return x


def _grid(lo: float, hi: float, f) -> np.ndarray:
    """x points along the branch, asinh-spaced, reaching far enough to cover every float32 y."""
    lo, hi = (_far_end(lo, hi, f, -1) if math.isinf(lo) else lo,
              _far_end(hi, lo, f, +1) if math.isinf(hi) else hi)
    s = np.linspace(np.arcsinh(lo), np.arcsinh(hi), TABLE_SIZE)
    x = np.sinh(s)
    x[0], x[-1] = lo, hi
    return x


def _far_end(inf: float, other: float, f, sign: int) -> float:
    """A finite stand-in for x = +-inf: y has reached its limit to 1e-300, or passed float32's range."""
    x = (other if math.isfinite(other) else 0.0) + sign
    prev = float(f(np.array([x]))[0])
    for _ in range(400):
        x_next = x * 1.25 + sign if x * sign > 0 else x + sign
        y = float(f(np.array([x_next]))[0])
        if not math.isfinite(y) or abs(y - prev) < 1e-300:
            return x
        if abs(y) > 3.5e38:        # past the largest float32: every float32 y is covered
            return x_next
        x, prev = x_next, y
    return x
