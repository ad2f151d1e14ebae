"""One-interval rational approximation P(u)/Q(u) on u in [-1, 1], and the denominator's safety margin.

The fit linearises |P/Q - g| as |P - g Q| / |Q_prev| (Sanathanan-Koerner), solved as the smallest
singular vector in Chebyshev bases (no coefficient is privileged by the normalisation), then moves
towards minimax with Lawson's reweighting (w <- w |error|). The result is converted to monomials in u
and normalised to Q(0) = 1; :mod:`.fit` rounds it to float32 and refits. Candidates whose denominator
comes close to zero on a slightly extended interval are refused (:func:`den_margin`); certification
then proves Q > 0 on [-1, 1] in ball arithmetic (:mod:`.arb_bound`).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numpy.polynomial import chebyshev as cheb

__all__ = ["rational_fit", "den_margin", "rounding_amplification", "MIN_DEN_MARGIN", "DEN_EXTENSION",
           "MAX_AMPLIFICATION"]

SK_STEPS = 6          # linearised refits with 1/Q_prev weights
LAWSON_STEPS = 16     # then Lawson steps towards minimax
STALE_STEPS = 4       # ... until this many in a row gain less than 1 %
MIN_DEN_MARGIN = 2.0**-10  # min Q on the extended interval / max |Q| on [-1, 1]: below, refused
DEN_EXTENSION = 1.125     # the interval checked is [-1.125, 1.125] (roots just outside are refused too)
MAX_AMPLIFICATION = 2.5  # rounding_amplification above this: refused (float32 error would show it)


def rational_fit(u: np.ndarray, g: np.ndarray, m: int, n: int):
    """(numerator, denominator, weights): monomial coefficients in u of P (degree m) and Q (degree n,
    Q(0) = 1) with max |P/Q - g| near minimax over the points ``u``, and the final Lawson weights
    (for a near-minimax weighted refit after rounding); None when no fit has Q > 0 at every point.

    Where g is (nearly) a rational of lower type, the linearised problem is degenerate (P and Q may
    share any factor, with its root anywhere): then the type is lowered one step at a time and the
    result padded with zero coefficients."""
    for k in range(min(m, n)):
        fitted = _fit(u, g, m - k, n - k)
        if fitted is not None:
            num, den, v = fitted
            return np.pad(num, (0, k)), np.pad(den, (0, k)), v
    return None


def _fit(u: np.ndarray, g: np.ndarray, m: int, n: int):
    tm, tn = cheb.chebvander(u, m), cheb.chebvander(u, n)
    q = np.ones_like(u)
    v = np.full_like(u, 1.0 / u.size)
    best, stale = None, 0
    for step in range(SK_STEPS + LAWSON_STEPS):
        w = np.sqrt(v) / np.abs(q)
        a_mat = np.hstack([tm, -g[:, None] * tn]) * w[:, None]
        try:
            x = np.linalg.svd(a_mat, full_matrices=False)[2][-1]
        except np.linalg.LinAlgError:
            break
        a, b = x[:m + 1], x[m + 1:]
        q_new = tn @ b
        if q_new.sum() < 0:
            a, b, q_new = -a, -b, -q_new
        if not q_new.min() > 0:
            break                                   # a pole among the points: keep the best so far
        err = tm @ a / q_new - g
        worst = float(np.max(np.abs(err)))
        if not np.isfinite(worst):
            break
        if best is None or worst < best[0]:
            stale = 0 if best is None or worst < 0.99 * best[0] else stale + 1
            best = (worst, a, b, v)
        else:
            stale += 1
        if step >= SK_STEPS and stale >= STALE_STEPS:
            break                                   # Lawson has stopped improving
        q = q_new
        if step >= SK_STEPS:
            v = v * np.abs(err)
            total = v.sum()
            if not total > 0:
                break
            v = v / total
    if best is None:
        return None
    _, a, b, v = best
    num, den = _cheb_to_monomial(m) @ a, _cheb_to_monomial(n) @ b
    if not den[0] > 0:
        return None
    return num / den[0], den / den[0], v


@lru_cache(maxsize=32)
def _cheb_to_monomial(degree: int) -> np.ndarray:
    """Matrix taking Chebyshev coefficients to monomial ones (cheb2poly of each basis vector)."""
    out = np.zeros((degree + 1, degree + 1))
    for k in range(degree + 1):
        col = cheb.cheb2poly(np.eye(degree + 1)[k])
        out[:col.size, k] = col
    return out


def den_margin(den) -> float:
    """min Q(u) over [-DEN_EXTENSION, DEN_EXTENSION] / max |Q(u)| over [-1, 1], or -inf when Q has a
    real root there or its minimum is within float32 Horner rounding, (n + 1) 2^-23 sum |d_j| E^n,
    of zero. A dense grid and the roots (a dip between grid points would need a root nearby)."""
    d = np.asarray(den, dtype=np.float64)
    roots = np.roots(d[::-1]) if d.size > 1 and np.any(d[1:]) else np.array([])
    real = roots[np.abs(roots.imag) <= 1e-9 * (1 + np.abs(roots))].real
    if np.any(np.abs(real) <= DEN_EXTENSION):
        return -np.inf
    u = np.linspace(-DEN_EXTENSION, DEN_EXTENSION, 4097)
    q = np.polynomial.polynomial.polyval(u, d)
    rounding = d.size * 2.0**-23 * np.abs(d).sum() * DEN_EXTENSION ** (d.size - 1)
    if not q.min() > rounding:
        return -np.inf
    return float(q.min() / np.abs(q[np.abs(u) <= 1.0]).max())


def rounding_amplification(num, den) -> float:
    """How much g = c0 + u N(u) / Q(u) amplifies float32 rounding, in units of the rounding of one
    operation on 1: max over u in [-1, 1] of (|u| sum |c_j u^(j-1)| + |u N / Q| sum |d_j u^j|) / |Q|
    (Horner's error bounds of N and Q, carried through the division). Polynomial pieces of the
    committed tables reach ~2.4; a denominator whose roots crowd just outside [-1, 1] (how a
    rational mimics an exponential) or a numerator with large cancelling coefficients goes far above."""
    u = np.linspace(-1.0, 1.0, 2049)
    pv = np.polynomial.polynomial.polyval
    q = np.abs(pv(u, den))
    with np.errstate(all="ignore"):
        amp = (np.abs(u) * pv(np.abs(u), np.abs(np.asarray(num)))
               + np.abs(u * pv(u, num)) / q * pv(np.abs(u), np.abs(np.asarray(den)))) / q
    worst = float(np.max(amp))
    return worst if np.isfinite(worst) else np.inf
