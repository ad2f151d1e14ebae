"""float64 evaluation of formulas: numpy functions of x rewritten for stability, and 15-digit values.

:func:`numeric` (and :func:`numeric_many` for several expressions at once) lambdifies a sympy expression
after :func:`stable` rewrites its cancellation-prone forms; :func:`precise` gives the value to 15 correct
digits (sympy's evalf), which tells a float64 artefact (overflow, cancellation) from a property of f.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import sympy as sp

from .domain import time_limit
from .errors import SpecError
from .formulas import X

__all__ = ["stable", "numeric", "raw_values", "numeric_many", "numeric_fast", "precise", "float64_fault",
           "LIMIT_SECONDS"]

NUMERIC_CACHE = 64    # float64 functions numeric keeps, by expression
LIMIT_SECONDS = 5.0   # a guard for sympy's evalf and limit; numeric extrapolation decides when limit gives up

_SOFTPLUS, _ERFC, _SECH2 = sp.Function("softplus_"), sp.Function("erfc_"), sp.Function("sech2_")
_EXPM1 = sp.Function("expm1_")


def stable(expr: sp.Expr) -> sp.Expr:
    """Rewrite cancellation-prone forms for float64 evaluation: c + c*erf(a) -> c*erfc(-a),
    c + c*tanh(a) -> 2c/(1 + exp(-2a)), c - c*tanh(a)**2 -> c*sech(a)**2, c*exp(a) - c -> c*expm1(a),
    log(1 + exp(a)) -> softplus(a), exp(a)/(1 + exp(a))**2 -> sech(a/2)**2/4 (a sigmoid's derivative),
    exp(a)/(1 + exp(a)) -> 1/(1 + exp(-a))."""
    def fix_add(e: sp.Add):
        terms = list(e.args)
        consts = [t for t in terms if t.is_number]
        for t in terms:
            c, rest = t.as_coeff_Mul()
            if isinstance(rest, sp.exp) and -c in consts:
                new, c = c * _EXPM1(rest.args[0]), -c
            elif isinstance(rest, (sp.erf, sp.tanh)) and c in consts:
                a = rest.args[0]
                new = c * _ERFC(-a) if isinstance(rest, sp.erf) else 2 * c / (1 + sp.exp(-2 * a))
            elif isinstance(rest, sp.Pow) and rest.exp == 2 and isinstance(rest.base, sp.tanh) and -c in consts:
                new, c = -c * _SECH2(rest.base.args[0]), -c
            else:
                continue
            others = list(terms)
            others.remove(t)
            others.remove(c)
            return sp.Add(*others) + new
        return e

    def fix_log(e: sp.log):
        a = e.args[0]
        if isinstance(a, sp.Add) and len(a.args) == 2 and 1 in a.args:
            other = a.args[0] if a.args[1] == 1 else a.args[1]
            if isinstance(other, sp.exp):
                return _SOFTPLUS(other.args[0])
        return e

    def fix_mul(e: sp.Mul):
        # exp(u)/(1 + exp(u))**2 -> sech(u/2)**2/4 and exp(u)/(1 + exp(u)) -> 1/(1 + exp(-u)): inf/inf
        # where exp(u) overflows (x*sigmoid(25*x)'s f' at x = -30) becomes 0 and 1
        factors = list(e.args)
        for t in factors:
            if not (isinstance(t, sp.Pow) and t.exp in (-1, -2) and isinstance(t.base, sp.Add)
                    and len(t.base.args) == 2 and 1 in t.base.args):
                continue
            ex = t.base.args[0] if t.base.args[1] == 1 else t.base.args[1]
            if isinstance(ex, sp.exp) and ex in factors:
                u = ex.args[0]
                others = list(factors)
                others.remove(t)
                others.remove(ex)
                new = _SECH2(u / 2) / 4 if t.exp == -2 else 1 / (1 + sp.exp(-u))
                return sp.Mul(*others) * new
        return _exp_ratio(e)

    expr = expr.replace(lambda e: isinstance(e, sp.log), fix_log)
    expr = expr.replace(lambda e: isinstance(e, sp.Mul), fix_mul)
    expr = expr.replace(lambda e: isinstance(e, sp.Add), fix_add)
    return expr.replace(lambda e: isinstance(e, sp.Add), fix_add)


def _exp_ratio(e: sp.Mul) -> sp.Expr:
    """exp(k*u)/(c + exp(u))**n (c > 0, 0 < k <= n) -> (1/(1 + c*exp(-u)))**k * (1/(c + exp(u)))**(n - k):
    the same value with no factor overflowing where exp(u) does (inf/inf is NaN): the k = 2 term of
    x*exp(x)/(1 + exp(x))'s f', x*exp(2x)/(1 + exp(x))**2, at x >= 355. ``e`` itself where no factor
    pair has that form."""
    factors = list(e.args)
    for t in factors:
        if not (isinstance(t, sp.Pow) and t.exp.is_number and t.exp < 0 and isinstance(t.base, sp.Add)
                and len(t.base.args) == 2):
            continue
        c, ex = sorted(t.base.args, key=lambda a: isinstance(a, sp.exp))
        if not (isinstance(ex, sp.exp) and c.is_number and c.is_positive):
            continue
        u, n = ex.args[0], -t.exp
        for other in factors:
            k = sp.simplify(other.args[0] / u) if isinstance(other, sp.exp) else None
            if k is not None and k.is_number and 0 < k <= n:
                rest = list(factors)
                rest.remove(t)
                rest.remove(other)
                return sp.Mul(*rest) * (1 + c * sp.exp(-u)) ** -k * t.base ** (k - n)
    return e


def numeric(expr: sp.Expr):
    """float64 numpy function of x for a sympy expression, rewritten by :func:`stable`; one per
    expression (NUMERIC_CACHE of them kept): lambdify prints the expression, seconds for a long f'
    (a product of 400 factors), which the analysis evaluates in several steps."""
    return _numeric(expr)


@lru_cache(maxsize=NUMERIC_CACHE)
def _numeric(expr: sp.Expr):
    f = sp.lambdify(X, stable(expr), modules=[{"erf": _erf, "erfc": _erfc, "erfc_": _erfc, "softplus_": _softplus, "sech2_": _sech2, "expm1_": np.expm1}, "numpy"])

    def call(x):
        x = np.asarray(x, dtype=np.float64)
        with np.errstate(all="ignore"):
            out = f(x)
        return np.broadcast_to(np.asarray(out, dtype=np.float64), x.shape).copy()
    call.raw = f          # for callers already inside np.errstate(all="ignore"): see raw_values
    return call


def raw_values(fn, x: np.ndarray) -> np.ndarray:
    """``fn(x)`` for a :func:`numeric` function and a float64 array x, the same values without the
    per-call overhead; the caller must hold ``np.errstate(all="ignore")``."""
    return _own_array(fn.raw(x), x)


def numeric_many(exprs: list[sp.Expr]):
    """One float64 numpy function of x returning a tuple of arrays, one per expression (rewritten by
    :func:`stable`): common subexpressions are evaluated once (an erfc shared by f and f', say), and
    small integer powers are written as products (numpy's pow takes ~100x longer on negative bases).
    Values agree with :func:`numeric`'s to a few float64 ulps, not bit for bit."""
    mods = {"erf": _erf, "erfc": _erfc, "erfc_": _erfc, "softplus_": _softplus, "sech2_": _sech2,
            "expm1_": np.expm1, "_ipow": _ipow}
    f = sp.lambdify(X, [stable(e) for e in exprs], modules=[mods, "numpy"],
                    printer=_fast_printer(mods), cse=True)

    def call(x):
        x = np.asarray(x, dtype=np.float64)
        with np.errstate(all="ignore"):
            outs = f(x)
        return tuple(_own_array(o, x) for o in outs)
    return call


def _own_array(o, x: np.ndarray) -> np.ndarray:
    """o as a new float64 array of x's shape (a constant broadcast, never x itself)."""
    if isinstance(o, np.ndarray) and o.dtype == np.float64 and o.shape == x.shape and not np.may_share_memory(o, x):
        return o
    return np.broadcast_to(np.asarray(o, dtype=np.float64), x.shape).copy()


def numeric_fast(expr: sp.Expr):
    """:func:`numeric_many` for one expression: a float64 numpy function of x."""
    f = numeric_many([expr])
    return lambda x: f(x)[0]


def _ipow(v, n: int):
    """v**n for a small integer n >= 3 by repeated multiplication (within ~n ulps of pow)."""
    out = v * v
    for _ in range(n - 2):
        out = out * v
    return out


def _fast_printer(user_functions: dict):
    """A NumPy printer (with lambdify's own settings) writing x**n, 3 <= |n| <= 8, as products."""
    from sympy.printing.numpy import NumPyPrinter

    class FastPrinter(NumPyPrinter):
        def _print_Pow(self, expr, rational=False):
            n = expr.exp
            if n.is_Integer and 3 <= abs(int(n)) <= 8:
                base = f"_ipow({self._print(expr.base)}, {abs(int(n))})"
                return base if n > 0 else f"(1.0/{base})"
            return super()._print_Pow(expr, rational=rational)

    return FastPrinter({"fully_qualified_modules": False, "inline": True, "allow_unknown_functions": True,
                        "user_functions": {k: k for k in user_functions}})


def _erf(x):
    from scipy.special import erf
    return erf(x)


def _softplus(x):
    return np.logaddexp(0.0, x)


def _sech2(x):
    return 1.0 / np.cosh(x) ** 2


def _erfc(x):
    from scipy.special import erfc
    return erfc(x)


def precise(expr: sp.Expr, x: float):
    """expr at x by sympy's evalf, which raises its working precision until 15 digits are right (so
    neither float64 overflow nor cancellation shows), as a sympy number; None where it is no finite
    real number or evalf fails."""
    try:
        with time_limit(LIMIT_SECONDS):
            v = expr.evalf(15, subs={X: sp.Float(float(x), 17)}, maxn=2000)
        return v if v.is_extended_real and v.is_finite else None
    except Exception:  # noqa: BLE001 - evalf fails in many ways: unknown
        return None


def float64_fault(prefix: str, what: str, x: float, got, exact) -> SpecError:
    """The refusal where float64 gives ``got`` (inf or nan) for ``what`` (f or f') at x but its 15-digit
    value ``exact`` is a number: an overflow or a cancellation, not a property of f."""
    return SpecError(f"{prefix}float64 cannot evaluate {what} at x = {x:.6g} (it gives {got}, from an overflow or a "
                     f"cancellation; {what} is {float(exact):.6g} there): write the formula in a form whose terms "
                     "stay within float64's range")
