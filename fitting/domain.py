"""Points where a formula piece is not defined or not continuous, found symbolically.

The branch scan samples f and f' on a grid, so a pole between two grid points (1/(x - 0.01)) would
pass unseen. Before the scan, :func:`singular_points` takes the zeros of every denominator and of
every log's argument (and atanh's argument = +-1) in the piece (sympy's ``solveset``) and keeps those
where f has no finite two-sided limit that agrees from both sides (``limit``, else 30-digit values
next to the point). The zeros where f has such a limit are *removable points* (0/0, as
t/(exp(t) - 1) at t = 0): :func:`classify_points` returns them too, for the scan to step over and the
fitter to refuse where a fitted branch runs through one. sympy gets a time limit; where it cannot
answer, the scan's own checks decide.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager
from typing import NamedTuple

import sympy as sp

from .formulas import X

__all__ = ["time_limit", "singular_points", "classify_points", "Points"]

BUDGET_SECONDS = 4.0     # for all of one piece's solveset and limit calls
CALL_SECONDS = 2.0       # for any one of them


@contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in the block after ``seconds`` (main thread only; no-op elsewhere)."""
    try:
        old = signal.signal(signal.SIGALRM, _raise_timeout)
    except ValueError:  # not the main thread
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _raise_timeout(signum, frame):
    raise TimeoutError


def _candidates(expr: sp.Expr) -> list[tuple[sp.Expr, str]]:
    """(an expression whose real zeros may be singular points of f, what such a zero is)."""
    out = []
    for e in sp.preorder_traversal(expr):
        if isinstance(e, sp.Pow) and e.exp.is_number and e.exp.is_negative:
            out.append((e.base, "a pole (a division by 0)"))
        elif isinstance(e, sp.log):
            out.append((e.args[0], "a logarithm of 0"))
        elif isinstance(e, sp.atanh):
            out += [(e.args[0] - 1, "atanh of 1"), (e.args[0] + 1, "atanh of -1")]
        elif isinstance(e, sp.tan):
            out.append((sp.cos(e.args[0]), "a pole of tan"))
    return out


class Points(NamedTuple):
    """The points of a piece found by :func:`classify_points`."""

    singular: list[tuple[str, str]]   # (x as text, why): f not defined or not continuous there
    removable: list[float]            # f continuous there, its formula 0/0 (or 0*inf) at the point


def singular_points(expr: sp.Expr, lo: float, hi: float, lo_closed: bool, hi_closed: bool
                    ) -> list[tuple[str, str]]:
    """(x, why) of each point of the piece [lo, hi] (ends as given) where ``expr`` is not defined or
    not continuous: :func:`classify_points`' ``singular``."""
    return classify_points(expr, lo, hi, lo_closed, hi_closed).singular


def classify_points(expr: sp.Expr, lo: float, hi: float, lo_closed: bool, hi_closed: bool) -> Points:
    """The zeros in the piece [lo, hi] (ends as given) of what :func:`_candidates` lists, split into
    singular ones (a pole, a jump, or no real value; x as text: ``x = %.6g``, or ``every x in`` the
    set of infinitely many points) and removable ones (finite zeros where f has one finite limit).
    Empty where none is found or sympy cannot tell in time; the budget (:data:`BUDGET_SECONDS`) is
    checked before every candidate and every zero, and the points found until it runs out are
    returned (the scan's own checks decide the rest)."""
    start = time.monotonic()
    region = sp.Interval(lo, hi, not lo_closed, not hi_closed)
    exact_expr = _rationalised(expr)
    found: dict[str, str] = {}
    removable: dict[str, float] = {}
    for base, why in _candidates(expr):
        if time.monotonic() - start > BUDGET_SECONDS:
            break
        zeros = _zeros(base, region)
        if zeros is None:
            continue
        if not isinstance(zeros, list):     # infinitely many (tan's poles): name the set
            found.setdefault(f"every x in {zeros}", why)
            continue
        for c in zeros:
            if time.monotonic() - start > BUDGET_SECONDS:
                break
            text = f"x = {float(c):.6g}"
            if text in found or text in removable:
                continue
            if _continuous_at(expr, exact_expr, c, float(c) != lo, float(c) != hi):
                removable[text] = float(c)
            else:
                found[text] = why
    return Points(sorted(found.items(), key=lambda kv: _order(kv[0])), sorted(removable.values()))


def _order(text: str) -> float:
    try:
        return float(text.removeprefix("x = "))
    except ValueError:
        return -math.inf


def _rationalised(expr: sp.Expr) -> sp.Expr:
    """``expr`` with every Float replaced by the rational number it holds exactly (its binary value,
    not the 15 digits ``nsimplify(rational=True)`` prints), so sympy's limit and high-precision
    evaluation see the float64 constants the generated code computes with."""
    return expr.xreplace({f: sp.Rational(f) for f in expr.atoms(sp.Float)})


def _zeros(base: sp.Expr, region: sp.Interval):
    """The real zeros of ``base`` in ``region``: a sorted list of numbers (sympy's exact root where it
    is exact and real, as 1, sqrt(2) or log(2); else a 30-digit Float of its value), a sympy set for
    infinitely many, or None when sympy cannot say in time."""
    try:
        with time_limit(CALL_SECONDS):
            zeros = sp.solveset(base, X, region)
    except Exception:  # noqa: BLE001 - solveset fails in many ways: unknown
        return None
    if zeros.is_empty:
        return []
    if isinstance(zeros, sp.FiniteSet):
        out = []
        for z in zeros:
            if not z.has(sp.Float, sp.I) and z.is_extended_real and z.is_finite:
                out.append(z)
                continue
            # a Float root, or cubic roots carrying a vanishing imaginary part: evaluate
            v = complex(sp.N(z, 30))
            if math.isfinite(v.real) and abs(v.imag) <= 1e-20 * (1 + abs(v.real)):
                out.append(sp.Float(v.real, 30))
        return sorted(out, key=float)
    if isinstance(zeros, (sp.ConditionSet, sp.Complement, sp.Intersection)):
        return None
    return zeros


def _continuous_at(expr: sp.Expr, exact_expr: sp.Expr, c: sp.Expr, from_left: bool, from_right: bool) -> bool:
    """Whether ``expr`` has one finite real limit at c from the sides given (a removable zero of a
    denominator, as (x**2 - 1)/(x - 1) at 1 or (exp(x) - exp(0.7))/(x - 0.7) at 0.7).

    Where both ``expr`` and c are exact (no Float), sympy's limit decides. Otherwise (a float64
    constant in the formula, or a root known only as a Float) the limit of ``exact_expr`` (the
    rationalised formula, :func:`_rationalised`) at the rationalised c decides only where it is not
    real: a finite or infinite value there is no proof (next to a pole sympy reads the huge value at
    a float c as a finite limit, and separately rounded constants, as exp(0.7) and 0.7, leave a pole
    of residue ~1e-16 at a removable point), so 50-digit values next to c decide (:func:`_near`).
    Where neither can say in time, c is taken as continuous: the scan's own checks decide."""
    exact = not expr.has(sp.Float) and not c.has(sp.Float)
    c_exact = c if exact else _rationalised(c)
    limits = []
    for d, use in (("-", from_left), ("+", from_right)):
        if not use:
            continue
        v = _limit(exact_expr, c_exact, d)
        if v is None or (exact and math.isinf(v)):
            return False
        if not exact or math.isnan(v):
            v = _near(exact_expr, c_exact, -1 if d == "-" else 1)
            if v is None:
                return False
            if math.isnan(v):       # cannot tell in time: the scan decides
                return True
        limits.append(v)
    return all(abs(v - limits[0]) <= 1e-6 * (1 + abs(limits[0])) for v in limits)


def _limit(expr: sp.Expr, c: sp.Expr, direction: str) -> float | None:
    """sympy's one-sided limit as a float (+-inf included); None where it is not real; nan where
    sympy cannot say in time."""
    try:
        with time_limit(CALL_SECONDS):
            lim = sp.limit(expr, X, c, direction)
        value = complex(lim)
    except Exception:  # noqa: BLE001 - sympy fails in many ways: unknown
        return math.nan
    return value.real if value.imag == 0 and not math.isnan(value.real) else None


NEAR_STEPS = (sp.Rational(1, 10**5), sp.Rational(1, 10**6), sp.Rational(1, 10**7))


def _near(expr: sp.Expr, c: sp.Expr, side: int) -> float | None:
    """The one-sided limit of ``expr`` (exact: rationalised) at c from 50-digit values at
    h = 1e-5, 1e-6, 1e-7 (relative to max(1, |c|)) to one side of c, extrapolated linearly to
    h = 0; None where they do not settle (a pole grows like 1/h: each difference 10 times the one
    before; a logarithm by equal differences) or are not finite real numbers; nan where evalf cannot
    say in time.

    The values settle where each difference is at most half the one before (f(c) + a h + ...), or
    where the last one is below 1e-8 (1 + |f|): separately rounded float64 constants (exp(0.7) and
    0.7) leave a pole of residue ~1e-16 |f| at a removable point, ~1e-9 |f| at h = 1e-7."""
    scale = sp.Max(1, abs(c))
    vals = []
    try:
        with time_limit(CALL_SECONDS):
            for h in NEAR_STEPS:
                v = complex(expr.evalf(50, subs={X: c + side * h * scale}))
                if v.imag != 0 or not math.isfinite(v.real):
                    return None
                vals.append(v.real)
    except TimeoutError:
        return math.nan
    except Exception:  # noqa: BLE001 - not a number there
        return None
    d1, d2 = vals[0] - vals[1], vals[1] - vals[2]
    if abs(d2) <= 0.5 * abs(d1) or abs(d2) <= 1e-8 * (1 + abs(vals[2])):
        return vals[2] - d2 / 9
    return None
