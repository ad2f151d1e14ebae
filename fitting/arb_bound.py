"""Rigorous bound of |P(u(x)) - v(x)| over a piece, in Arb ball arithmetic (python-flint).

The piece is parametrised by x, where everything is explicit: y = f(x), t = T(y), u = (t - c) s,
E(x) = P(u(x)) - v(x) with v = f' (derivative target) or x (inverse target). Each cell [m - r, m + r]
gets the second-order Taylor form |E| <= |E(m)| + |E'(m)| r + sup|E''| r^2 / 2, E(m) and E'(m) as
point balls and E'' over the whole cell; cells that do not meet the bound are bisected.

A rational piece P(u) = c0 + u N(u) / Q(u) is first proved pole-free: Q > 0 on all of [-1, 1] (the
clamped u range), by enclosures of Q on a bisection of [-1, 1], with a margin above the worst float32
Horner rounding of Q, so the emitted float32 scheme never divides by zero or by a Q of the wrong sign
either. The Taylor form then encloses Q on every cell again (a cell whose enclosure of Q holds 0
gets an infinite bound and is bisected).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import sympy as sp
from flint import arb, ctx

from .formulas import X

__all__ = ["piece_bound", "compile_arb", "den_lower_bound"]

PREC = 160
MAX_CELLS = 400_000


class _Printer:
    """sympy -> Python source over flint.arb, with exact rational constants."""

    def __init__(self):
        self.consts: list[str] = []

    def const(self, value: sp.Expr) -> str:
        r = sp.Rational(value) if not isinstance(value, sp.Rational) else value
        name = f"k{len(self.consts)}"
        self.consts.append(f"{name} = arb({r.p}) / arb({r.q})" if r.q != 1 else f"{name} = arb({r.p})")
        return name

    def __call__(self, e: sp.Expr) -> str:
        if e.is_Symbol:
            return e.name
        if e is sp.pi:
            return "arb.pi()"
        if e is sp.E:
            return "arb(1).exp()"
        if e.is_Number:
            return self.const(e)
        if e.is_Add:
            return "(" + " + ".join(self(a) for a in e.args) + ")"
        if e.is_Mul:
            return "(" + " * ".join(self(a) for a in e.args) + ")"
        if e.is_Pow:
            base, ex = self(e.base), e.exp
            if ex == sp.Rational(1, 2):
                return f"{base}.sqrt()"
            if ex == -sp.Rational(1, 2):
                return f"(1 / {base}.sqrt())"
            if ex.is_Integer:
                return f"({base} ** {int(ex)})" if ex > 0 else f"(1 / {base} ** {-int(ex)})"
            return f"({base}.log() * {self(ex)}).exp()"
        name = type(e).__name__
        methods = {"exp": "exp", "log": "log", "erf": "erf", "erfc": "erfc", "tanh": "tanh", "sinh": "sinh",
                   "cosh": "cosh", "atan": "atan", "sin": "sin", "cos": "cos", "Abs": "__abs__",
                   "asinh": "asinh", "acosh": "acosh", "atanh": "atanh", "asin": "asin", "acos": "acos", "tan": "tan"}
        if name in methods:
            return f"{self(e.args[0])}.{methods[name]}()"
        raise NotImplementedError(f"no Arb form for {name}")


@lru_cache(maxsize=64)
def compile_arb(exprs: tuple[sp.Expr, ...]):
    """A function x -> tuple of arb values of ``exprs`` (common subexpressions shared)."""
    replacements, reduced = sp.cse(list(exprs))
    pr = _Printer()
    body = [f"    {sym} = {pr(val)}" for sym, val in replacements]
    body.append("    return (" + ", ".join(pr(r) for r in reduced) + ",)")
    src = "\n".join(pr.consts) + "\ndef _f(x):\n" + "\n".join(body)
    scope = {"arb": arb}
    exec(compile(src, "<invact-arb>", "exec"), scope)  # noqa: S102 - generated from sympy, not user text
    return scope["_f"]


def derivative_exprs(expr: sp.Expr) -> tuple[sp.Expr, ...]:
    """f and its first three derivatives as sympy expressions in x."""
    f1 = sp.diff(expr, X)
    f2 = sp.diff(f1, X)
    return expr, f1, f2, sp.diff(f2, X)


def _transform(kind: str, origin: arb, sign: int, f, f1, f2):
    """t, t', t'' of t = T(f(x)) from f and its derivatives (balls)."""
    if kind == "identity":
        return f, f1, f2
    d = sign * (f - origin)
    d1, d2 = sign * f1, sign * f2
    if kind == "sqrt":
        t = d.sqrt()
        return t, d1 / (2 * t), d2 / (2 * t) - d1 * d1 / (4 * t * d)
    return d.log(), d1 / d, d2 / d - d1 * d1 / (d * d)


def _horner3(coeffs: list[arb], u: arb) -> tuple[arb, arb, arb]:
    """P(u), P'(u), P''(u)."""
    p, dp, ddp = coeffs[-1], arb(0), arb(0)
    for c in reversed(coeffs[:-1]):
        ddp = ddp * u + 2 * dp
        dp = dp * u + p
        p = p * u + c
    return p, dp, ddp


class _Approximant:
    """The piece's function of u and its first two derivatives: a polynomial (``den`` None) or
    c0 + u S(u) with S = N / Q, N = c1 + c2 u + ..., Q = den (docs/table-format.md)."""

    def __init__(self, seg: _Piece):
        c0 = arb(seg.coeffs[0]) + arb(seg.c0_lo)
        self.coeffs = [c0] + [arb(c) for c in seg.coeffs[1:]]
        self.den = [arb(d) for d in seg.den] if seg.den is not None else None

    def __call__(self, u: arb) -> tuple[arb, arb, arb]:
        if self.den is None:
            return _horner3(self.coeffs, u)
        n0, n1, n2 = _horner3(self.coeffs[1:], u)
        q0, q1, q2 = _horner3(self.den, u)
        s0 = n0 / q0                                   # arb division by a ball holding 0: not finite
        s1 = (n1 - s0 * q1) / q0
        s2 = (n2 - 2 * s1 * q1 - s0 * q2) / q0
        return self.coeffs[0] + u * s0, s0 + u * s1, 2 * s1 + u * s2


def den_lower_bound(den: list[float], max_cells: int = 4096) -> float:
    """A proved lower bound of Q(u) = den[0] + den[1] u + ... on u in [-1, 1] that also exceeds the
    float32 Horner rounding of Q (so float32 Q > 0 too), or -inf when that cannot be shown.

    Horner in float32 with |u| <= 1 errs by at most gamma_2n sum |d_j| (Higham, Thm 5.1; an FMA
    only does better), so a margin above that keeps the emitted scheme's Q positive."""
    old = ctx.prec
    ctx.prec = PREC
    try:
        d = [arb(v) for v in den]
        n = len(den) - 1
        eps = 2.0**-24
        gamma = 2 * n * eps / (1 - 2 * n * eps)
        rounding = gamma * sum(abs(float(v)) for v in den) * (1 + 2.0**-40)
        worst, cells, stack = math.inf, 0, [(-1.0, 1.0)]
        while stack:
            a, b = stack.pop()
            cells += 1
            if cells > max_cells:
                return -math.inf
            m, r = 0.5 * (a + b), 0.5 * (b - a)
            q = _horner3(d, arb(m, r))[0]
            lower = float(q.lower()) if q.is_finite() else -math.inf
            if lower > rounding:
                worst = min(worst, lower * (1 - 2.0**-50))
                continue
            q_mid = _horner3(d, arb(m))[0]
            if not q_mid.is_finite() or float(q_mid.upper()) <= rounding or not (a < m < b):
                return -math.inf                            # Q (or float32 Q) reaches 0 here
            stack += [(a, m), (m, b)]
        return worst
    finally:
        ctx.prec = old


@dataclass(frozen=True)
class _Piece:
    """What a proof reads of a fitted piece (a :class:`.model.PolySegment`, or its JSON dict)."""

    kind: str
    origin: tuple
    sign: int
    center: float
    scale: float
    coeffs: list
    c0_lo: float
    den: list | None
    error: float

    @classmethod
    def of(cls, seg) -> _Piece:
        if isinstance(seg, dict):
            tf = seg["transform"]
            origin = tf.get("origin", [0.0])
            return cls(tf["kind"], tuple(origin if isinstance(origin, list) else [origin]), tf.get("sign", 1),
                       seg["center"], seg["scale"], seg["coeffs"], seg["c0_lo"], seg.get("den"), seg["error"])
        tf = seg.transform
        return cls(tf.kind, tf.origin, tf.sign, seg.center, seg.scale, seg.coeffs, seg.c0_lo, seg.denominator,
                   seg.error)


def piece_bound(expr: sp.Expr, seg, target: str, x_lo: float, x_hi: float, tolerance: float,
                max_cells: int = MAX_CELLS) -> tuple[float, int, bool]:
    """(bound, cells used, proved) for |P(u(x)) - v(x)| on [x_lo, x_hi]; ``seg`` a fitted piece
    (:class:`.model.PolySegment` or its JSON dict).

    Cells are refined until each meets a goal a little above the piece's sampled error, so the
    reported bound is informative; past ``max_cells`` the tolerance itself is the goal.
    f over a cell is enclosed in mean-value form f(m) + f'(X)(X - m), so the radicand of a sqrt
    transform stays tight (and positive) next to the branch point, where a naive enclosure of
    f(X) - y_min would straddle zero.
    """
    seg = _Piece.of(seg)
    if seg.den is not None and not den_lower_bound(seg.den) > 0:
        return math.inf, 0, False              # a pole (or a float32 sign change) on [-1, 1]
    goal = min(tolerance, 1.25 * float(seg.error) + 1e-10)
    bound, cells, proved = _bisect(expr, seg, target, x_lo, x_hi, goal, max_cells // 4)
    if not proved and goal < tolerance:
        bound, more, proved = _bisect(expr, seg, target, x_lo, x_hi, tolerance, max_cells)
        cells += more
    return bound, cells, proved


def _bisect(expr, seg, target, x_lo, x_hi, goal, max_cells):
    old = ctx.prec
    ctx.prec = PREC
    try:
        ev = compile_arb(derivative_exprs(expr))
        origin = sum((arb(v) for v in seg.origin), arb(0))
        shape = (seg.kind, origin, seg.sign)
        coeffs = _Approximant(seg)
        c, s = arb(seg.center), arb(seg.scale)
        worst, cells, stack = 0.0, 0, [(x_lo, x_hi)]
        while stack:
            a, b = stack.pop()
            cells += 1
            if cells > max_cells:
                return goal, cells, False
            m, r = 0.5 * (a + b), 0.5 * (b - a)
            xm = arb(m)
            at_m = ev(xm)
            e0, e1, _ = _errors(shape, target, xm, at_m, coeffs, c, s)
            xb = arb(m, r)
            on_x = ev(xb)
            f_x = at_m[0] + on_x[1] * arb(0, r)
            _, _, e2 = _errors(shape, target, xb, (f_x,) + tuple(on_x[1:]), coeffs, c, s)
            bound = _upper(e0) + _upper(e1) * r + _upper(e2) * r * r / 2
            if not math.isfinite(bound) and math.isfinite(_upper(e0)):
                bound = _endpoint_bound(shape, target, on_x, coeffs, c, s, _upper(e0), r, f_x)
            bound = _clamped_bound(shape, target, xm, at_m, on_x, f_x, coeffs, c, s, r, bound)
            if bound <= goal:
                worst = max(worst, bound)
                continue
            e0 = _clamped_point(shape, target, xm, at_m, coeffs, c, s, e0)
            if _lower(e0) > goal:          # the error at m itself is above the goal
                return _lower(e0), cells, False
            if not (a < m < b):            # a cell of two adjacent doubles whose enclosure stays wider
                return goal, cells, False  # than the goal: as when the cells run out
            stack += [(a, m), (m, b)]
        return worst, cells, True
    finally:
        ctx.prec = old


def _endpoint_bound(shape, target, on_x, coeffs, c, s, e0: float, r: float, f_mean: arb | None = None) -> float:
    """A cell touching a sqrt branch point whose radicand reaches 0 (origin == y_min exactly, as for
    x*tanh(x)): Taylor forms divide by t = 0 there. Instead, with t(x) and t(m) both in [0, t_hi],
    |E(x)| <= |E(m)| + sup|P'(U)| s t_hi + sup|v'(X)| r, where t_hi = sqrt(sup of the radicand).
    The radicand's sup is the lesser of f's two enclosures on the cell, direct (``on_x``) and in
    mean-value form (``f_mean``): next to y_min f' is near 0, and the direct one of x**2 + 2*x at
    x = -1 is as wide as the cell (cancellation), which puts sqrt(r) ~ 1e-8 in t_hi, not r."""
    kind, origin, sign = shape
    if kind != "sqrt":
        return math.inf
    f, f1, f2, _ = on_x
    d_hi = min(_upper(sign * (enc - origin)) for enc in ((f,) if f_mean is None else (f, f_mean)))
    if not math.isfinite(d_hi):
        return math.inf
    t_hi = math.sqrt(d_hi) * (1 + 2.0**-50)
    t_ball = arb(t_hi / 2, t_hi / 2)
    _, dp, _ = coeffs((t_ball - c) * s)
    v1 = f2 if target == "derivative" else arb(1)
    return e0 + _upper(dp * s) * t_hi + _upper(v1) * r


LOG_FLOOR = 2.0**-126      # the log transform's floor on d (TINY32: the scheme's max(d, TINY32))


def _clamped_bound(shape, target, xm, at_m, on_x, f_x, coeffs, c, s, r: float, smooth: float) -> float:
    """The cell's bound with the scheme's clamps: u = clamp((T(y) - c) s, -1, 1), and the log
    transform's floor d >= TINY32. Where the cell's y may put u outside [-1, 1] (or d below the
    floor), g~ there is a constant K (P(-1), P(1), or P at the floor's u), and |E(x)| <= |K - v(m)|
    + sup|v'| r over the cell; the bound is the largest over the cases the cell may be in, ``smooth``
    (the unclamped form's) only where u may lie inside. A piece starting at the float32 below a y_min
    that float32 cannot hold (x**4 - 0.3: y = -0.30000001) reaches u < -1 at real y just above y_min,
    where the unclamped polynomial extrapolates (1e-6 off) but the scheme evaluates P(-1)."""
    kind, origin, sign = shape
    f = f_x if f_x.is_finite() else on_x[0]
    consts, inside = [], True
    if kind in ("log", "sqrt"):
        d = sign * (f - origin)
        if not d.is_finite():
            return smooth
        lo, hi = float(d.lower()), float(d.upper())
        lo, hi = lo - abs(lo) * 2.0**-50, hi + abs(hi) * 2.0**-50      # outward: float() rounds
        if kind == "log":
            floor = arb(LOG_FLOOR)
            if hi < LOG_FLOOR:                          # every y of the cell is floored
                return _worst_const(target, xm, at_m, on_x, coeffs, r, [(floor.log() - c) * s], 0.0)
            if lo < LOG_FLOOR:
                consts.append((floor.log() - c) * s)
            t = arb(max(lo, LOG_FLOOR)).log().union(arb(hi).log())
        else:
            t = arb(max(lo, 0.0)).sqrt().union(arb(max(hi, 0.0)).sqrt())
    else:
        t = f
    u = (t - c) * s
    if not u.is_finite():
        return smooth
    if not (u >= -1):
        consts.append(arb(-1))
    if not (u <= 1):
        consts.append(arb(1))
    if not consts:
        return smooth
    inside = not (u < -1 or u > 1)
    return _worst_const(target, xm, at_m, on_x, coeffs, r, consts, smooth if inside else 0.0)


def _clamped_point(shape, target, xm, at_m, coeffs, c, s, e0):
    """The scheme's error at the point m: ``e0`` (the unclamped E(m)) unless u(m) certainly lies
    outside [-1, 1] or d(m) below the log transform's floor, where it is P(+-1) (or P at the
    floor's u) - v(m) (:func:`_clamped_bound`)."""
    kind, origin, sign = shape
    f = at_m[0]
    if kind in ("log", "sqrt"):
        d = sign * (f - origin)
        if kind == "log" and d < arb(LOG_FLOOR):
            t = arb(LOG_FLOOR).log()
        elif kind == "log" and d >= arb(LOG_FLOOR):
            t = d.log()
        elif kind == "sqrt" and d >= 0:
            t = d.sqrt()
        else:
            return e0
    else:
        t = f
    u = (t - c) * s
    if not (u.is_finite() and (u < -1 or u > 1 or (u >= -1 and u <= 1))):
        return e0
    u = arb(-1) if u < -1 else arb(1) if u > 1 else u
    v = at_m[1] if target == "derivative" else xm
    return coeffs(u)[0] - v


def _worst_const(target, xm, at_m, on_x, coeffs, r: float, consts: list, worst: float) -> float:
    """max(worst, |P(uc) - v(m)| + sup|v'| r) over the clamped u values ``consts`` (balls, clipped
    to [-1, 1] as the scheme clips them)."""
    for uc in consts:
        if not (uc >= -1 and uc <= 1):
            uc = arb(-1) if uc < -1 else arb(1) if uc > 1 else uc.union(arb(-1) if uc.mid() < 0 else arb(1))
        k = coeffs(uc)[0]
        if target == "derivative":
            worst = max(worst, _upper(k - at_m[1]) + _upper(on_x[2]) * r)
        else:
            worst = max(worst, _upper(k - xm) + r)
    return worst


def _errors(shape, target, x, fs, coeffs, c, s):
    f, f1, f2, f3 = fs
    h, h1, h2 = _transform(*shape, f, f1, f2)
    v, v1, v2 = (f1, f2, f3) if target == "derivative" else (x, arb(1), arb(0))
    u = (h - c) * s
    p, dp, ddp = coeffs(u)
    return p - v, dp * s * h1 - v1, ddp * s * s * h1 * h1 + dp * s * h2 - v2


def _upper(x: arb) -> float:
    if not x.is_finite():
        return float("inf")
    return float(abs(x).upper()) * (1 + 2.0**-50)  # round the double conversion up


def _lower(x: arb) -> float:
    if not x.is_finite():
        return 0.0
    return float(abs(x).lower())
