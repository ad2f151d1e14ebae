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

__all__ = ["Y", "SOLVE_SECONDS", "SolveGuardError", "exact_expression", "agrees"]

Y = sp.Symbol("y", real=True)
SOLVE_SECONDS = 30.0   # a safety net only: what is attempted is decided by _invertible, not by the clock
SOLVE_FAILURES = (NotImplementedError, ValueError, TypeError, AttributeError, RecursionError)
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
    floats = e.is_polynomial(X) and e.has(sp.Float)
    if floats:     # solved as the rationals _cheap_polynomial reads, the closed form written back in floats
        e = sp.nsimplify(e, rational=True)
    fp = sp.diff(e, X)
    if fp.has(X) and not _invertible(e):
        return None
    if target == "derivative" and not fp.has(X):
        candidates = [fp]
    elif (roots := _roots(e)) is None:
        return None
    elif target != "derivative":
        candidates = list(roots)
    elif (candidates := _at_roots(fp, _roots_on(branch, roots, back, expr, spec))) is None:
        return None
    for cand in candidates:
        cand = sp.nfloat(cand.subs(back), exponent=False) if floats else cand.subs(back)
        if agrees(cand, expr, spec, target, branch):
            return _factor_radicands(cand)
    return None


@functools.lru_cache(maxsize=64)
def _roots(e: sp.Expr) -> tuple[sp.Expr, ...] | None:
    """sympy's solutions x of e(x) = y, None where sympy finds none or cannot solve; where x occurs once in
    more than one function or power (:func:`_layers`), the chain's layers are inverted one at a time
    (:func:`_chain_roots`). Cached: branches of one piece share e. Only what :func:`_invertible` admits is
    solved; the guard is a safety net (:func:`_guarded`)."""
    if e.count(X) == 1 and _layers(e) > 1:
        return _chain_roots(e)
    return _guarded("solve of f(x) = y", e, lambda: tuple(sp.solve(sp.Eq(e, Y), X)))


@functools.lru_cache(maxsize=64)
def _at_roots(fp: sp.Expr, roots: tuple[sp.Expr, ...]) -> tuple[sp.Expr, ...] | None:
    """f' at each root, simplified (:func:`_simplest`); None where that fails (the guard as in :func:`_roots`).
    Cached like :func:`_roots`: branches of one piece share f' and its roots."""
    return _guarded("simplification of f'(x) at x = f^-1(y)", fp, lambda: tuple(_simplest(fp, r) for r in roots))


class SolveGuardError(RuntimeError):
    """sympy ran past :data:`SOLVE_SECONDS` on a solve or simplification that :func:`_invertible` admitted as
    cheap: a fault of that structural test (the formula should be reported), never a reason to fit instead,
    which would let the machine's speed choose the table."""


def _guarded(what: str, e: sp.Expr, compute):
    """``compute()`` under the :data:`SOLVE_SECONDS` safety guard; None where sympy fails
    (:data:`SOLVE_FAILURES`). The guard firing raises :class:`SolveGuardError` naming it."""
    try:
        with time_limit(SOLVE_SECONDS):
            return compute()
    except TimeoutError:
        raise SolveGuardError(
            f"sympy's {what} for {e} ran past the {SOLVE_SECONDS:g} s safety guard (exact.SOLVE_SECONDS), "
            "although exact._invertible admitted it as cheap: whether a branch gets a closed form is decided "
            "by the formula's structure, never by the clock, so this is a fault of that test") from None
    except SOLVE_FAILURES:
        return None


Z = sp.Dummy("z", real=True)   # a chain layer's argument (:func:`_chain_roots`)
V = sp.Dummy("v")              # and the layer's value
CHAIN_FUNCS = (sp.exp, sp.log, sp.sinh, sp.cosh, sp.tanh, sp.asinh, sp.acosh, sp.atanh, sp.sin, sp.cos, sp.tan,
               sp.asin, sp.acos, sp.atan, sp.erf, sp.erfc)   # one-argument layers sympy inverts by its table


def _layer(e: sp.Expr) -> tuple[sp.Expr, sp.Expr]:
    """(e's outermost layer, its one argument holding x replaced by :data:`Z`; that argument), for e in
    which x occurs once."""
    inner = next(a for a in e.args if a.has(X))
    return e.xreplace({inner: Z}), inner


def _is_chain(e: sp.Expr) -> bool:
    """Whether e, in which x occurs once, is a chain of layers each inverted by one cheap solve: + and *
    by terms free of x, a power with an exponent free of x (or a base free of x), a function of
    :data:`CHAIN_FUNCS`."""
    while e != X:
        if not (isinstance(e, (sp.Add, sp.Mul, sp.Pow)) or isinstance(e, CHAIN_FUNCS)):
            return False
        e = _layer(e)[1]
    return True


def _layers(e: sp.Expr) -> int:
    """How many layers of a chain are not a sum or product (with terms free of x): sympy's solve of the whole
    equation inverts those and one function by its table, as fast as a layer."""
    n = 0
    while e != X:
        n += not isinstance(e, (sp.Add, sp.Mul))
        e = _layer(e)[1]
    return n


def _chain_roots(e: sp.Expr) -> tuple[sp.Expr, ...] | None:
    """x = f^-1(y) where x occurs once in e (tanh(x)**3): the layers inverted from the outside in, each by
    sympy's solve of one function of a bare symbol (:func:`_layer_roots`), so what is solved, and how
    long it takes, is set by the layers alone (sympy's solve of tanh(x)**3 = y as a whole rewrites it
    as a cubic in exp(2x) and runs for minutes)."""
    values = [Y]
    while e != X:
        layer, e = _layer(e)
        roots = _layer_roots(layer)
        if not roots:
            return None
        values = [r.subs(V, v) for v in values for r in roots]
    return tuple(values)


@functools.lru_cache(maxsize=64)
def _layer_roots(layer: sp.Expr) -> tuple[sp.Expr, ...] | None:
    """The solutions z of layer(z) = v (in :data:`Z` and :data:`V`), None where sympy fails."""
    return _guarded("solve of one layer", layer, lambda: tuple(sp.solve(sp.Eq(layer, V), Z)))


def _invertible(e: sp.Expr) -> bool:
    """Whether sympy can be expected to invert y = e(x) in closed form, and to simplify f' there, within
    seconds: x occurs once in a chain of layers each solved on its own (:func:`_is_chain`), e is a
    polynomial whose roots are cheap radicals (:func:`_cheap_polynomial`), rational in x or in one
    sqrt of a quadratic with low degrees, or rational in one exp(k*x) of degree <= 2 in it (a cubic in
    exp(2x), tanh(x)**3's form, takes sympy minutes). Deciding this structurally (not by a time limit)
    keeps table generation deterministic: the guard of :func:`_guarded` only reports a fault of it."""
    if e.count(X) == 1:
        return _is_chain(e)
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
        if rewritten.has(X) or not rewritten.is_rational_function(z):
            return False
        num, den = sp.fraction(sp.together(rewritten))
        return bool(max(sp.degree(num, z), sp.degree(den, z)) <= 2)
    return False


def _cheap_polynomial(e: sp.Expr) -> bool:
    """Whether the roots of the polynomial equation e(x) = y are radicals sympy gives and simplifies
    f' at quickly: degree <= 2; a cubic whose f' has no two distinct real zeros (Cardano's formula in
    real radicals: one real root for every y); a cubic or quartic a*(x - h)**n + c, or a quartic
    a*(x - h)**4 + b*(x - h)**2 + c (a quadratic in (x - h)**2). Not a cubic with two turning points
    (between their y it has three real roots, and Cardano's formula takes cube roots of complex
    numbers: casus irreducibilis) nor any other quartic (Ferrari's nested radicals: minutes of
    simplification a root, x**4 - 2*x**2 + 0.5*x); a symbolic coefficient must settle the test. Float
    coefficients are read as the rationals sympy's solve makes of them (nsimplify(rational=True)), so
    (x + 0.1)**4 - 1e-4 expanded in floats, whose shifted x**3 to x coefficients round to ~1e-20 and not
    to 0, is told as (x + 1/10)**4 - 1/10000 is."""
    e = sp.nsimplify(e, rational=True)
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


def agrees(cand: sp.Expr, expr: sp.Expr, spec: ActivationSpec, target: str, branch: Branch) -> bool:
    """Whether ``cand`` is a closed form the runtime evaluates (no I, no function besides
    :data:`RUNTIME_FUNCS`) with cand(f(x)) == f'(x) (or x for ``target`` "inverse") at 24 points spread
    over the branch's x range, to 1e-9 relative."""
    values = {sp.Symbol(n, real=True): v for n, v in spec.params.items()}
    cand = cand.subs(values)
    if cand.has(sp.I) or cand.has(sp.zoo, sp.nan):
        return False
    if any(type(fn).__name__ not in RUNTIME_FUNCS for fn in cand.atoms(sp.Function)):
        return False  # e.g. LambertW: no float32 kernel for it
    found = _misses(cand, expr, spec, target, branch)
    return found is not None and bool(np.all(found[0] <= 1e-9 * (1 + np.abs(found[1]) + np.abs(found[2]))))


def _roots_on(branch: Branch, roots: tuple[sp.Expr, ...], back: dict, expr: sp.Expr,
              spec: ActivationSpec) -> tuple[sp.Expr, ...]:
    """The roots not ruled out by the branch's probe points: f' is simplified at these only. A root is ruled
    out where it evaluates finite at some of them and gives x there (within 1e-6 relative) at none
    (tanh(x)**3's other four roots: complex cube roots of y); one that float64 cannot evaluate there
    (tanh(x - 1000)'s, where y rounds to -1) stays."""
    def on(root: sp.Expr) -> bool:
        found = _misses(root.subs(back).subs({sp.Symbol(n, real=True): v for n, v in spec.params.items()}),
                        expr, spec, "inverse", branch, complex)
        if found is None:
            return True
        err, x = found[0], found[1]
        finite = np.isfinite(err)
        return not finite.any() or bool(np.any(err[finite] <= 1e-6 * (1 + np.abs(x[finite]))))
    return tuple(r for r in roots if on(r))


def _misses(cand: sp.Expr, expr: sp.Expr, spec: ActivationSpec, target: str,
            branch: Branch, y_type: type = float) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(|cand(f(x)) - f'(x)| (or - x), f'(x) (or x), y) at the branch's probe points where f
    and f' are finite, cand having the parameters' values and evaluated in ``y_type`` (complex: the root of
    a negative number is a number, not NaN); None where cand holds another symbol, cannot be evaluated by
    numpy, or fewer than 8 points are finite."""
    e = expr.subs({sp.Symbol(n, real=True): v for n, v in spec.params.items()})
    if cand.free_symbols - {Y}:
        return None
    f, fp = numeric(e), numeric(sp.diff(e, X))
    xs = _probe_points(branch)
    ys = f(xs)
    try:
        g = sp.lambdify(Y, cand, modules=["numpy"])
        with np.errstate(all="ignore"):
            got = np.broadcast_to(np.asarray(g(ys.astype(y_type)), dtype=np.complex128), xs.shape)
    except (NameError, TypeError, ValueError, AttributeError, ZeroDivisionError):   # erfinv: not in numpy
        return None
    want = fp(xs) if target == "derivative" else xs
    ok = np.isfinite(want) & np.isfinite(ys)
    if ok.sum() < 8:
        return None
    return np.abs(got[ok] - want[ok]), want[ok], ys[ok]


def _probe_points(branch: Branch) -> np.ndarray:
    lo, hi = branch.x_range
    lo = max(lo, hi - 24.0) if math.isfinite(hi) else max(lo, -12.0)
    hi = min(hi, lo + 24.0) if math.isfinite(lo) else min(hi, 12.0)
    return np.linspace(lo, hi, 26)[1:-1]
