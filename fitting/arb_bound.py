"""Rigorous bound of |P(u(x)) - v(x)| over a piece, in Arb ball arithmetic (python-flint).

The piece is parametrised by x, where everything is explicit: y = f(x), t = T(y), u = (t - c) s,
E(x) = P(u(x)) - v(x) with v = f' (derivative target) or x (inverse target). Each cell [m - r, m + r]
gets the second-order Taylor form |E| <= |E(m)| + |E'(m)| r + sup|E''| r^2 / 2, E(m) and E'(m) as
point balls and E'' over the whole cell; cells that do not meet the bound are bisected.
"""

from __future__ import annotations

import math
from functools import lru_cache

import sympy as sp
from flint import arb, ctx

from .formulas import X

__all__ = ["piece_bound", "compile_arb"]

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
                   "cosh": "cosh", "atan": "atan", "sin": "sin", "cos": "cos", "Abs": "__abs__"}
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


def piece_bound(expr: sp.Expr, seg: dict, target: str, x_lo: float, x_hi: float, tolerance: float,
                max_cells: int = MAX_CELLS) -> tuple[float, int, bool]:
    """(bound, cells used, proved) for |P(u(x)) - v(x)| on [x_lo, x_hi].

    Cells are refined until each meets a goal a little above the piece's sampled error, so the
    reported bound is informative; past ``max_cells`` the tolerance itself is the goal.
    f over a cell is enclosed in mean-value form f(m) + f'(X)(X - m), so the radicand of a sqrt
    transform stays tight (and positive) next to the branch point, where a naive enclosure of
    f(X) - y_min would straddle zero.
    """
    goal = min(tolerance, 1.25 * float(seg.get("error", tolerance)) + 1e-10)
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
        tf = seg["transform"]
        origin = sum((arb(v) for v in tf.get("origin", [0.0])), arb(0))
        shape = (tf["kind"], origin, tf.get("sign", 1))
        coeffs = [arb(seg["coeffs"][0]) + arb(seg["c0_lo"])] + [arb(c) for c in seg["coeffs"][1:]]
        c, s = arb(seg["center"]), arb(seg["scale"])
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
                bound = _endpoint_bound(shape, target, on_x, coeffs, c, s, _upper(e0), r)
            if bound <= goal:
                worst = max(worst, bound)
                continue
            if _lower(e0) > goal or not (a < m < b):
                return _lower(e0), cells, False
            stack += [(a, m), (m, b)]
        return worst, cells, True
    finally:
        ctx.prec = old


def _endpoint_bound(shape, target, on_x, coeffs, c, s, e0: float, r: float) -> float:
    """A cell touching a sqrt branch point whose radicand reaches 0 (origin == y_min exactly, as for
    x*tanh(x)): Taylor forms divide by t = 0 there. Instead, with t(x) and t(m) both in [0, t_hi],
    |E(x)| <= |E(m)| + sup|P'(U)| s t_hi + sup|v'(X)| r, where t_hi = sqrt(sup of the radicand)."""
    kind, origin, sign = shape
    if kind != "sqrt":
        return math.inf
    f, f1, f2, _ = on_x
    d_hi = _upper(sign * (f - origin))
    if not math.isfinite(d_hi):
        return math.inf
    t_hi = math.sqrt(d_hi) * (1 + 2.0**-50)
    t_ball = arb(t_hi / 2, t_hi / 2)
    _, dp, _ = _horner3(coeffs, (t_ball - c) * s)
    v1 = f2 if target == "derivative" else arb(1)
    return e0 + _upper(dp * s) * t_hi + _upper(v1) * r


def _errors(shape, target, x, fs, coeffs, c, s):
    f, f1, f2, f3 = fs
    h, h1, h2 = _transform(*shape, f, f1, f2)
    v, v1, v2 = (f1, f2, f3) if target == "derivative" else (x, arb(1), arb(0))
    u = (h - c) * s
    p, dp, ddp = _horner3(coeffs, u)
    return p - v, dp * s * h1 - v1, ddp * s * s * h1 * h1 + dp * s * h2 - v2


def _upper(x: arb) -> float:
    if not x.is_finite():
        return float("inf")
    return float(abs(x).upper()) * (1 + 2.0**-50)  # round the double conversion up


def _lower(x: arb) -> float:
    if not x.is_finite():
        return 0.0
    return float(abs(x).lower())
