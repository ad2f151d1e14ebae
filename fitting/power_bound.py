"""The proved relative bound of a power-tail piece (:class:`.segments.PowerTailSegment`): Arb Taylor
forms in s = log|x| over cells bisected until the goal holds (:func:`tail_bound`)."""

from __future__ import annotations

import math
from typing import Any

import sympy as sp
from flint import arb, arb_series, ctx

from .arb_bound import PREC, compile_arb
from .errors import FitError
from .formulas import X

MAX_CELLS = 20_000


def tail_bound(expr: sp.Expr, seg: Any, x_lo: float, x_hi: float, tolerance: float,
               max_cells: int = MAX_CELLS, detail: bool = False) -> tuple:
    """(bound, proved) for the relative error of ``seg`` (a :class:`.segments.PowerTailSegment`),
    with ``detail`` (bound, proved, violated): violated where |R| exceeds the goal at a point (the
    bound is then that lower bound), not where the cells ran out or one too narrow to split has a
    bound above the goal (the bound is then the one reached on it, inf where it is not finite);
    R = w h~(u(t)) / f'(x) - 1 over x in [x_lo, x_hi] (one sign, |x| >= 1), with y = f(x), a = sign*y, t = a^(-1/n), w = a t, u = (t - center) scale;
    for root 0 (exponential growth) t = log a and w = a, and the cells are in s = x itself (there
    |x| <= ~89 and f varies on the scale 1 in x, which log|x| would shrink by |x|).

    In s = log|x| (where R and its derivatives are of one scale from |x| = 1 to 1e13), each cell
    [m - r, m + r] gets the Taylor form of order K: |R| <= sum_k<K |R_k(m)| r^k + sup|R_K| r^K, the
    coefficients R_k as Arb power series at the point m and R_K over the whole cell; cells that miss
    the goal (a little above the piece's error, then the tolerance) are bisected."""
    if not (x_lo * x_hi > 0 and min(abs(x_lo), abs(x_hi)) >= 1.0):
        return (math.inf, False, False)[:3 if detail else 2]
    old = ctx.prec
    ctx.prec = PREC
    try:
        ev = compile_arb(_exp_form((expr, sp.diff(expr, X)), (x_lo, x_hi)))
        tf = seg.transform
        coeffs = [arb(seg.coeffs[0]) + arb(seg.c0_lo)] + [arb(c) for c in seg.coeffs[1:]]
        inv_n = arb(1) / tf.root if tf.root else None
        parts = (ev, math.copysign(1.0, x_lo), tf.sign, inv_n, arb(seg.center), arb(seg.scale), coeffs)
        s_lo, s_hi = sorted(math.log(abs(v)) if tf.root else v for v in (x_lo, x_hi))
        goal = min(tolerance, 1.25 * float(seg.error) + 1e-10)
        out = _cells(parts, s_lo, s_hi, goal, max_cells // 4)
        if not out[1] and goal < tolerance:
            out = _cells(parts, s_lo, s_hi, tolerance, max_cells)
        return out if detail else out[:2]
    except (NotImplementedError, AttributeError) as exc:   # a function without an Arb power series
        raise FitError(f"the tail of f on x in [{x_lo:g}, {x_hi:g}] cannot be bounded rigorously ({exc}: "
                       "Arb power series cover exp, log, sqrt, erf, atan and the hyperbolic functions); "
                       "write the formula with those") from None
    finally:
        ctx.prec = old


ORDER = 8          # Taylor order of the cells of tail_bound


_EXP_FORMS = {  # exact identities: Arb's power series have none of these functions
    sp.sinh: lambda z: (sp.exp(z) - sp.exp(-z)) / 2,
    sp.cosh: lambda z: (sp.exp(z) + sp.exp(-z)) / 2,
    sp.asinh: lambda z: sp.log(z + sp.sqrt(z**2 + 1)),
    sp.acosh: lambda z: sp.log(z + sp.sqrt(z**2 - 1)),
    sp.atanh: lambda z: sp.log((1 + z) / (1 - z)) / 2,
}


def _exp_form(exprs: tuple[sp.Expr, ...], xs: tuple[float, float]) -> tuple[sp.Expr, ...]:
    """The hyperbolic functions and their inverses written with exp, log and sqrt (exact identities).
    tanh(z) = 1 - 2/(exp(2z) + 1) where z < 0 at both ends ``xs`` of the tail, else 2/(1 + exp(-2z)) - 1:
    the exp that stays small, whose ball stays narrow on a wide cell of a far tail; then every exp
    that grows on the tail is written through its reciprocal (:func:`_small_exps`)."""
    def tanh(z):
        negative = all(_sign_at(z, v) < 0 for v in xs)
        return 1 - 2 / (sp.exp(2 * z) + 1) if negative else 2 / (1 + sp.exp(-2 * z)) - 1

    out = []
    for e in exprs:
        for fn, form in {**_EXP_FORMS, sp.tanh: tanh}.items():
            e = e.replace(fn, form)
        out.append(_small_exps(e, xs))
    return tuple(out)


def _small_exps(e: sp.Expr, xs: tuple[float, float]) -> sp.Expr:
    """``e`` with each exp(c B) whose exponent has one sign at both ends ``xs`` written as a power
    w^k of w = exp(-|u| B') > 0, the small one (u the smallest |c| of the exps of B, when every
    c / u is an integer), then the fractions holding a negative power cancelled and each log(A)
    with A ~ w^-k written k |u| B' + log(A w^k) (exact identities): softplus's log(1 + exp(x)) becomes
    x + log(1 + exp(-x)), its derivative exp(x)/(1 + exp(x)) becomes 1/(1 + exp(-x)). A ball of exp(x)
    over a wide cell far out (x ~ 1e19) is wide beyond use (and 1 + exp(x), log(1 + exp(x)) lose
    their sign), where one of exp(-x) is a narrow ball next to 0."""
    groups: dict[sp.Expr, list[sp.Expr]] = {}
    for a in e.atoms(sp.exp):
        if not a.args[0].has(sp.exp):
            c, base = a.args[0].as_coeff_Mul()
            groups.setdefault(base, []).append(c)
    small: dict[sp.Symbol, sp.Expr] = {}          # w -> log w (the exponent of the small exp)
    subs = {}
    for base, cs in groups.items():
        signs = {_sign_at(base, v) for v in xs}
        unit = min((abs(sp.Rational(c)) for c in cs), default=0)
        if len(signs) != 1 or 0.0 in signs or unit == 0 or not all((sp.Rational(c) / unit).is_integer for c in cs):
            continue
        s = int(signs.pop())
        w = sp.Dummy("w", positive=True)
        small[w] = -s * unit * base                              # w = exp(-s unit base) < 1 on the tail
        for c in cs:
            subs[sp.exp(c * base)] = w ** int(-sp.Rational(c) / (s * unit))
    if not any(k.exp < 0 for k in subs.values() if k.is_Pow):
        return e
    ws = set(small)

    def large(z) -> bool:            # a negative power of a w in z's rational structure
        if z.is_Pow and z.base in ws:
            return bool(z.exp.is_negative)
        return (z.is_Add or z.is_Mul or z.is_Pow) and any(large(a) for a in z.args)

    def cancel(z):
        try:
            return sp.cancel(z)
        except (sp.PolynomialError, TypeError, ValueError):
            return z

    def log(z):
        z = cancel(z) if large(z) else z
        num, den = sp.fraction(z)
        shift = sp.Integer(0)
        for w in ws:
            low = [_lowest(part, w) for part in (num, den)]
            if None in low:
                continue
            num, den = sp.expand(num / w ** low[0]), sp.expand(den / w ** low[1])
            shift += (low[0] - low[1]) * small[w]
        return sp.log(num / den) + shift

    def norm(z):
        if not z.args or not z.has(*ws):
            return z
        args = [norm(a) for a in z.args]
        if isinstance(z, sp.log):
            return log(args[0])
        z = z.func(*args)
        return cancel(z) if (z.is_Add or z.is_Mul or z.is_Pow) and large(z) else z

    return norm(e.xreplace(subs)).xreplace({w: sp.exp(lw) for w, lw in small.items()})


def _lowest(p: sp.Expr, w: sp.Symbol) -> int | None:
    """The lowest power of ``w`` in polynomial ``p`` (None where p is not a polynomial in w)."""
    try:
        return min(m[0] for m in sp.Poly(p, w).monoms())
    except (sp.PolynomialError, ValueError):
        return None


def _sign_at(z: sp.Expr, x: float) -> float:
    """The sign of z at x (0 where it is not a finite real number there)."""
    try:
        v = complex(z.subs(X, sp.Float(x, 30)).evalf(20))
    except (TypeError, ValueError):
        return 0.0
    return math.copysign(1.0, v.real) if v.imag == 0 and math.isfinite(v.real) and v.real != 0 else 0.0


def _cells(parts, s_lo: float, s_hi: float, goal: float, max_cells: int) -> tuple[float, bool, bool]:
    """(bound, proved, violated) over s in [s_lo, s_hi] (:func:`tail_bound`)."""
    worst, cells, stack = 0.0, 0, [(s_lo, s_hi)]
    while stack:
        a, b = stack.pop()
        cells += 1
        if cells > max_cells:
            return goal, False, False
        m, r = 0.5 * (a + b), 0.5 * (b - a)
        at_m = _series(parts, arb(m), ORDER)
        rest = _series(parts, arb(m, r), ORDER + 1)[ORDER]
        bound = sum(_upper(c) * r ** k for k, c in enumerate(at_m)) + _upper(rest) * r ** ORDER
        bound = bound if math.isfinite(bound) else math.inf
        if bound <= goal:
            worst = max(worst, bound)
            continue
        if _lower(at_m[0]) > goal:
            return _lower(at_m[0]), False, True
        if not (a < m < b):
            return bound, False, False
        stack += [(a, m), (m, b)]
    return worst, True, False


def _series(parts, s: arb, length: int) -> list[arb]:
    """The first ``length`` Taylor coefficients of R in s = log|x| (s = x for root 0) at s (a point or a cell)."""
    ev, sign_x, sign, inv_n, c, scale, coeffs = parts
    x = sign_x * arb_series([s, 1], prec=length).exp() if inv_n is not None else arb_series([s, 1], prec=length)
    try:
        f, f1 = ev(x)
        a = sign * f
        t = (-(a.log() * inv_n)).exp() if inv_n is not None else a.log()
        u = (t - c) * scale
        p = coeffs[-1] + 0 * u
        for k in reversed(coeffs[:-1]):
            p = p * u + k
        r = (a * t if inv_n is not None else a) * p / f1 - 1
    except (ValueError, ZeroDivisionError):  # a denominator (f', or one inside f such as a sigmoid's
        return [arb("nan")] * length          # 1 + exp(-x)) whose ball holds 0 on a wide cell: bisect
    return [r.coeffs()[k] if k < len(r.coeffs()) else arb(0) for k in range(length)]


def _upper(x: arb) -> float:
    return float(abs(x).upper()) * (1 + 2.0**-50) if x.is_finite() else math.inf


def _lower(x: arb) -> float:
    return float(abs(x).lower()) if x.is_finite() else 0.0
