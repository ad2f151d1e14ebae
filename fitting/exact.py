"""The exact route: a closed form of g(y) = f'(f^-1(y)) (or of x = f^-1(y)) per branch, via sympy.

Every candidate sympy returns is checked numerically against f' at points of the branch before it is
accepted, so a wrong root (a quadratic's other sign, say) is never recorded.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import sympy as sp

from .branches import Branch
from .domain import time_limit
from .formulas import X, ActivationSpec
from .numeric import numeric

__all__ = ["Y", "exact_expression"]

Y = sp.Symbol("y", real=True)
SOLVE_SECONDS = 30.0   # a guard only: what is attempted is decided by _invertible, not by the clock
SOLVE_FAILURES = (TimeoutError, NotImplementedError, ValueError, TypeError, AttributeError, RecursionError)
RUNTIME_FUNCS = {"exp", "log", "Abs"}   # plus + - * / and powers (sqrt): what generated code evaluates


def exact_expression(branch: Branch, spec: ActivationSpec, target: str) -> sp.Expr | None:
    """A validated closed form in ``y`` (keeping parameter names when possible), or None."""
    for expr, symbolic in ((branch.sym_expr, True), (branch.expr, False)):
        if symbolic and not spec.params:
            continue
        found = _solve(expr, spec, target, symbolic, branch)
        if found is not None:
            return found
    return None


def _solve(expr: sp.Expr, spec: ActivationSpec, target: str, symbolic: bool, branch: Branch) -> sp.Expr | None:
    positive = {sp.Symbol(n, real=True): sp.Symbol(n, positive=True) for n in spec.params} if symbolic else {}
    back = {v: sp.Symbol(k.name, real=True) for k, v in positive.items()}
    e = expr.subs(positive)
    fp = sp.diff(e, X)
    if fp.has(X) and not _invertible(e):
        return None
    if target == "derivative" and not fp.has(X):
        candidates = [fp]
    elif (roots := _roots(e)) is None:
        return None
    elif target != "derivative":
        candidates = list(roots)
    elif (candidates := _at_roots(fp, roots)) is None:
        return None
    for cand in candidates:
        cand = cand.subs(back)
        if _agrees(cand, expr, spec, target, branch):
            return _factor_radicands(cand)
    return None


@functools.lru_cache(maxsize=64)
def _roots(e: sp.Expr) -> tuple[sp.Expr, ...] | None:
    """sympy's solutions x of e(x) = y, None where solve fails or runs past SOLVE_SECONDS (f'(x) at
    them is simplified under a guard of its own, :func:`_solve`). Cached:
    branches of one piece share e, and a solve that runs into the guard (tanh(x)**3, rewritten as a
    cubic in exp(2x)) costs the full SOLVE_SECONDS each time."""
    try:
        with time_limit(SOLVE_SECONDS):
            return tuple(sp.solve(sp.Eq(e, Y), X))
    except SOLVE_FAILURES:
        return None


@functools.lru_cache(maxsize=64)
def _at_roots(fp: sp.Expr, roots: tuple[sp.Expr, ...]) -> tuple[sp.Expr, ...] | None:
    """f' at each root, simplified (:func:`_simplest`); None where that fails or runs past SOLVE_SECONDS.
    Cached like :func:`_roots`: branches of one piece share f' and its roots."""
    try:
        with time_limit(SOLVE_SECONDS):
            return tuple(_simplest(fp, r) for r in roots)
    except SOLVE_FAILURES:
        return None


def _invertible(e: sp.Expr) -> bool:
    """Whether sympy can be expected to invert y = e(x) in closed form, and to simplify f' there, within
    seconds: x occurs once (a chain of invertible functions), e is a polynomial whose roots are cheap
    radicals (:func:`_cheap_polynomial`), or e is rational in one exp(k*x). Deciding this structurally
    (not by a time limit) keeps table generation deterministic."""
    if e.count(X) == 1:
        return True
    if e.is_polynomial(X):
        return _cheap_polynomial(e)
    if e.is_rational_function(X):      # softsign's pieces x/(1 - x): a polynomial equation in x
        num, den = sp.fraction(sp.together(e))
        return max(sp.degree(num, X), sp.degree(den, X)) <= 2
    roots = {a.base for a in e.atoms(sp.Pow) if a.has(X) and a.exp in (sp.S.Half, -sp.S.Half)}
    if len(roots) == 1:                # squareplus (x + sqrt(x^2 + 4))/2: one quadratic radicand
        (base,) = roots
        z = sp.Dummy("z", positive=True)
        rest = e.subs({sp.sqrt(base): z, 1 / sp.sqrt(base): 1 / z})
        if not (base.is_polynomial(X) and sp.degree(base, X) <= 2 and rest.is_rational_function(X, z)):
            return False
        num, den = sp.fraction(sp.together(rest))
        return max(sp.Poly(num, X, z).total_degree(), sp.Poly(den, X, z).total_degree()) <= 4
    z = sp.Dummy("z", positive=True)
    exps = {a.args[0] for a in e.rewrite(sp.exp).atoms(sp.exp) if a.has(X)}
    if len(exps) == 1:
        (arg,) = exps
        k = sp.simplify(arg / X)
        if k.has(X):
            return False
        rewritten = e.rewrite(sp.exp).subs(sp.exp(arg), z)
        return not rewritten.has(X)
    return False


def _cheap_polynomial(e: sp.Expr) -> bool:
    """Whether the roots of the polynomial equation e(x) = y are radicals sympy gives and simplifies
    f' at quickly: degree <= 2; a cubic whose f' has no two distinct real zeros (Cardano's formula in
    real radicals: one real root for every y); a cubic or quartic a*(x - h)**n + c, or a quartic
    a*(x - h)**4 + b*(x - h)**2 + c (a quadratic in (x - h)**2). Not a cubic with two turning points
    (between their y it has three real roots, and Cardano's formula takes cube roots of complex
    numbers: casus irreducibilis) nor any other quartic (Ferrari's nested radicals: minutes of
    simplification a root, x**4 - 2*x**2 + 0.5*x); a symbolic coefficient must settle the test."""
    p = sp.Poly(e, X)
    n = p.degree()
    if n <= 2:
        return True
    if n > 4:
        return False
    a, b = p.coeff_monomial(X**n), p.coeff_monomial(X**(n - 1))
    t = sp.Dummy("t")
    q = sp.Poly(sp.expand(e.subs(X, t - b / (n * a))), t)     # depressed: no t**(n-1) term
    inner = [sp.simplify(q.coeff_monomial(t**k)) for k in range(1, n - 1)]
    if all(c == 0 for c in inner) or (n == 4 and inner[0] == 0):
        return True      # a*t**n + c, or a*t**4 + b*t**2 + c
    return n == 3 and (b**2 - 3 * a * p.coeff_monomial(X)).is_nonpositive is True


def _factor_radicands(e: sp.Expr) -> sp.Expr:
    """sqrt(24*y + 9) -> sqrt(3)*sqrt(8*y + 3): y + c with a power-of-two scale keeps float32
    evaluation exact next to the branch point (Sterbenz), where 24*y + 9 cancels."""
    return e.replace(lambda a: isinstance(a, sp.Pow) and a.exp == sp.Rational(1, 2) and a.base.is_polynomial(Y),
                     lambda a: sp.sqrt(sp.factor(a.base)))


def _simplest(fp: sp.Expr, root: sp.Expr) -> sp.Expr:
    """f'(root) simplified; hyperbolic functions are rewritten through exp first (tanh -> 1 - y**2)."""
    forms = [sp.simplify(fp.subs(X, root)), sp.simplify(fp.rewrite(sp.exp).subs(X, root))]
    return min(forms, key=sp.count_ops)


def _agrees(cand: sp.Expr, expr: sp.Expr, spec: ActivationSpec, target: str, branch: Branch) -> bool:
    """cand(f(x)) == f'(x) (or x) at 24 points spread over the branch's x range."""
    values = {sp.Symbol(n, real=True): v for n, v in spec.params.items()}
    cand = cand.subs(values)
    e = expr.subs(values)
    if cand.free_symbols - {Y} or cand.has(sp.I) or cand.has(sp.zoo, sp.nan):
        return False
    if any(type(fn).__name__ not in RUNTIME_FUNCS for fn in cand.atoms(sp.Function)):
        return False  # e.g. LambertW: no float32 kernel for it
    f, fp = numeric(e), numeric(sp.diff(e, X))
    xs = _probe_points(branch)
    ys = f(xs)
    g = sp.lambdify(Y, cand, modules=["numpy"])
    with np.errstate(all="ignore"):
        got = np.broadcast_to(np.asarray(g(ys), dtype=np.complex128), xs.shape)
    want = fp(xs) if target == "derivative" else xs
    ok = np.isfinite(want) & np.isfinite(ys)
    if ok.sum() < 8:
        return False
    err = np.abs(got[ok] - want[ok])
    return bool(np.all(err <= 1e-9 * (1 + np.abs(want[ok]) + np.abs(ys[ok]))))


def _probe_points(branch: Branch) -> np.ndarray:
    lo, hi = branch.x_range
    lo = max(lo, hi - 24.0) if math.isfinite(hi) else max(lo, -12.0)
    hi = min(hi, lo + 24.0) if math.isfinite(lo) else min(hi, 12.0)
    return np.linspace(lo, hi, 26)[1:-1]
