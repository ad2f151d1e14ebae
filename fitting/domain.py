"""Points where a formula piece is not defined or not continuous, found symbolically.

The branch scan samples f and f' on a grid, so a pole between two grid points (1/(x - 0.01)) would
pass unseen. Before the scan, :func:`singular_points` takes the zeros of every denominator and of
every log's argument (and atanh's argument = +-1) in the piece (sympy's ``solveset``) and keeps those
where f has no finite two-sided limit that agrees from both sides (``limit``, else 30-digit values
next to the point). sympy gets a time limit; where it cannot answer, the scan's own checks decide.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager

import sympy as sp

from .formulas import X

__all__ = ["time_limit", "singular_points"]

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


def singular_points(expr: sp.Expr, lo: float, hi: float, lo_closed: bool, hi_closed: bool
                    ) -> list[tuple[str, str]]:
    """(x, why) of each point of the piece [lo, hi] (ends as given) where ``expr`` is not defined or
    not continuous: a pole, a jump, or no real value. x is text: ``x = %.6g``, or ``every x in`` the
    set of infinitely many points. Empty where none is found or sympy cannot tell in time."""
    start = time.monotonic()
    region = sp.Interval(lo, hi, not lo_closed, not hi_closed)
    found: dict[str, str] = {}
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
            text = f"x = {float(c):.6g}"
            if text not in found and not _continuous_at(expr, c, float(c) != lo, float(c) != hi):
                found[text] = why
    return sorted(found.items(), key=lambda kv: _order(kv[0]))


def _order(text: str) -> float:
    try:
        return float(text.removeprefix("x = "))
    except ValueError:
        return -math.inf


def _zeros(base: sp.Expr, region: sp.Interval):
    """The real zeros of ``base`` in ``region``: a list of numbers, a sympy set for infinitely many,
    or None when sympy cannot say in time."""
    try:
        with time_limit(CALL_SECONDS):
            zeros = sp.solveset(base, X, region)
    except Exception:  # noqa: BLE001 - solveset fails in many ways: unknown
        return None
    if zeros.is_empty:
        return []
    if isinstance(zeros, sp.FiniteSet):   # cubic roots may carry a vanishing imaginary part: evaluate
        values = [complex(sp.N(z, 30)) for z in zeros]
        return sorted(sp.Float(v.real, 30) for v in values
                      if math.isfinite(v.real) and abs(v.imag) <= 1e-20 * (1 + abs(v.real)))
    if isinstance(zeros, (sp.ConditionSet, sp.Complement, sp.Intersection)):
        return None
    return zeros


def _continuous_at(expr: sp.Expr, c: sp.Expr, from_left: bool, from_right: bool) -> bool:
    """Whether ``expr`` has one finite real limit at c from the sides given (a removable zero of a
    denominator, as (x**2 - 1)/(x - 1) at 1). sympy's limit decides where it is infinite or not real,
    or finite at an exact c; a finite limit at a float c (a root known to 30 digits, where sympy
    reads the huge value next to a pole as a limit) is checked by 30-digit values 1e-9 and 1e-12 away."""
    limits = []
    for d, use in (("-", from_left), ("+", from_right)):
        if not use:
            continue
        v = _limit(expr, c, d)
        if v is None or math.isinf(v):
            return False
        if math.isnan(v) or not c.is_Rational:
            v = _near(expr, c, -1 if d == "-" else 1)
        if v is None:
            return False
        limits.append(v)
    return all(abs(v - limits[0]) <= 1e-9 * (1 + abs(limits[0])) for v in limits)


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


def _near(expr: sp.Expr, c: sp.Expr, side: int) -> float | None:
    """expr at 30 digits 1e-12 (relative) to one side of c, where the values 1e-9 and 1e-12 away
    agree (a finite limit), else None."""
    vals = []
    for h in (1e-9, 1e-12):
        try:
            x = sp.Float(c, 40) + side * sp.Float(h, 40) * max(1, abs(sp.Float(c, 40)))
            v = complex(expr.evalf(30, subs={X: x}))
        except Exception:  # noqa: BLE001 - not a number there
            return None
        if v.imag != 0 or not math.isfinite(v.real):
            return None
        vals.append(v.real)
    return vals[1] if abs(vals[1] - vals[0]) <= 1e-6 * (1 + abs(vals[1])) else None
