"""A table's numbers and the scheme's arithmetic (docs/table-format.md): parameter expressions, breaks,
Horner, segment indices; the plain parts the table model (:mod:`.model`) is built from."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import sympy as sp
from sympy.codegen.cfunctions import log1p
from sympy.printing.numpy import NumPyPrinter
from sympy.printing.precedence import precedence

from .float32 import fma32

__all__ = ["number", "horner", "segment_index", "Break", "is_numbers", "plain_extra", "param_values",
           "closed_form_fn", "fold_numbers", "emitted_form", "softplus_argument", "softplus_terms", "StableSoftplus",
           "power_form", "power64"]

NUMBER = (int, float)


def number(text, params: dict | None = None) -> float:
    """A table number: a float, "inf"/"-inf", or an expression string in parameter names."""
    if isinstance(text, (int, float)):
        return float(text)
    if text in ("inf", "-inf"):
        return float(text)
    params = params or {}
    return float(_sym(text, tuple(sorted(params))).subs(param_values(params)))


def param_values(params: dict) -> dict:
    """Parameter symbols (real, as parsed) -> their values."""
    return {sp.Symbol(k, real=True): v for k, v in params.items()}


@lru_cache(maxsize=512)
def _sym(text: str, names: tuple[str, ...]) -> sp.Expr:
    """``text`` parsed with y, x and the table's parameter names as the real symbols they are."""
    from .expressions import parse
    return parse(text, ("y", "x"), names, "table expression")


@lru_cache(maxsize=256)
def closed_form_fn(expr: str, params: tuple):
    """A numpy function of y for closed form ``expr`` with parameter values ``params`` ((name, value)
    pairs), in y's dtype: the operations generated code evaluates it with (:func:`emitted_form`, each
    power by :func:`power_form`), so certification measures the emitted code's rounding."""
    y = sp.Symbol("y", real=True)
    e = _exponents_kept(emitted_form(_sym(expr, tuple(k for k, _ in params)), y), y)
    e = fold_numbers(e.subs(param_values(dict(params))), y)
    f = sp.lambdify(y, e, modules=[{"power64": power64, "exp_log": _exp_log}, "numpy"], printer=_EmittedPrinter)

    def call(y):
        with np.errstate(all="ignore"):
            return np.broadcast_to(np.asarray(f(y), dtype=y.dtype), y.shape)
    return call


def fold_numbers(e: sp.Expr, var: sp.Symbol) -> sp.Expr:
    """``e`` with the numeric factors of each product that holds ``var`` multiplied into one float
    where there are two or more: sqrt(3)*sqrt(8*y + 3)/6 is printed as 0.28867513459481287*sqrt(..),
    one multiply where it was a multiply and a division (~0.1 ns an element of hardswish's backward on
    CPU, a correctly rounded division's ~16 instructions on a GPU), and no less accurate: one rounding
    of the constant where there were two of the tensor. A single number (y/6) keeps its exact form."""
    def fold(m: sp.Mul) -> sp.Expr:
        numbers = [a for a in m.args if a.is_number]
        if len(numbers) < 2 or not m.has(var):
            return m
        rest = [a for a in m.args if not a.is_number]
        return sp.Mul(sp.Float(float(sp.Mul(*numbers))), *rest, evaluate=False)
    return e.replace(lambda a: isinstance(a, sp.Mul), fold)


def softplus_argument(e: sp.Expr) -> sp.Expr | None:
    """z where ``e`` is log(1 + exp(z)) (the formula language's softplus), else None."""
    if not (isinstance(e, sp.log) and isinstance(e.args[0], sp.Add) and len(e.args[0].args) == 2
            and sp.S.One in e.args[0].args):
        return None
    (other,) = [a for a in e.args[0].args if a is not sp.S.One]
    return other.args[0] if isinstance(other, sp.exp) else None


class StableSoftplus(sp.Function):
    """log(1 + exp(z)) of the tensor, printed as :func:`softplus_terms` (kept whole: a factor of
    the product around it is not distributed over its two terms)."""
    nargs = 1


def softplus_terms(z: sp.Expr) -> sp.Expr:
    """max(z, 0) + log1p(exp(-|z|)), unevaluated: log(1 + exp(z)) without overflow where exp(z)
    overflows (z > 88.7 in float32, where log(1 + exp(z)) gave inf) and without losing exp(z) next
    to 1 (z < -17)."""
    return sp.Add(sp.Max(z, 0), log1p(sp.exp(-sp.Abs(z))), evaluate=False)


def emitted_form(e: sp.Expr, var: sp.Symbol) -> sp.Expr:
    """``e`` as generated code evaluates it: sign and Heaviside as the Piecewise they are, and
    log(1 + exp(z)) of the tensor as :class:`StableSoftplus`."""
    e = e.replace(lambda a: isinstance(a, (sp.sign, sp.Heaviside)), lambda a: a.rewrite(sp.Piecewise))

    def stable(a: sp.Expr) -> sp.Expr:
        z = softplus_argument(a)
        return StableSoftplus(z) if z is not None and z.has(var) else a
    return e.replace(lambda a: isinstance(a, sp.log), stable)


def power_form(exponent: sp.Expr) -> str:
    """How generated code computes a tensor's power ``base ** exponent``: 'sqrt' (1/2, correctly
    rounded), 'rsqrt' (-1/2: 1 / that root), 'product' (an integer 1..8 in size: the base times
    itself, 1 / that where negative), 'power' (any other number: :func:`power64`) or 'exp_log'
    (an exponent in parameters or the tensor: exp(exponent * log(base)))."""
    if exponent == sp.Rational(1, 2):
        return "sqrt"
    if exponent == -sp.Rational(1, 2):
        return "rsqrt"
    if exponent.is_Integer and 0 < abs(int(exponent)) <= 8:
        return "product"
    return "power" if exponent.is_number and exponent.is_real else "exp_log"


def power64(a: np.ndarray, exponent: float) -> np.ndarray:
    """``a ** exponent`` as generated code computes a 'power' (:func:`power_form`; invact.fastmath.power):
    float64's pow of float32 ``a`` rounded once to float32 (within 2^-52 before that rounding: the
    correctly rounded power but where the exact one lies that close to a float32 midpoint), where
    exp(exponent * log(a)) in float32 lost |exponent * log(a)| ulps (5e-6 relative near 1e38).
    float64 ``a``: float64's pow."""
    a = np.asarray(a)
    return np.power(a.astype(np.float64), exponent).astype(a.dtype)


class _ExpLog(sp.Function):
    """base ** exponent with an exponent in parameters, kept as generated code computes it (power_form
    'exp_log') once the parameters are numbers."""
    nargs = 2


def _exp_log(base: np.ndarray, exponent: float) -> np.ndarray:
    return np.exp(exponent * np.log(base))


def _exponents_kept(e: sp.Expr, var: sp.Symbol) -> sp.Expr:
    """``e`` with each tensor power whose exponent is in parameters marked :class:`_ExpLog` (before
    their values make it a number, which generated code would compute otherwise)."""
    return e.replace(lambda a: isinstance(a, sp.Pow) and a.base.has(var) and power_form(a.exp) == "exp_log"
                     and not a.exp.has(var), lambda a: _ExpLog(a.base, a.exp))


class _EmittedPrinter(NumPyPrinter):
    """lambdify's NumPy printer with generated code's numbers and powers: numbers as Python floats
    (rounded to y's dtype where they meet it, as torch rounds a Python scalar), powers by :func:`power_form`."""

    def _print(self, expr, **kwargs):
        if isinstance(expr, sp.Expr) and expr.is_number and not isinstance(expr, sp.Integer) and expr.is_finite:
            return repr(float(expr))
        return super()._print(expr, **kwargs)

    def _print_Pow(self, e, rational=False):
        base, ex = e.args
        form = power_form(ex)
        if form == "sqrt":
            return f"numpy.sqrt({self._print(base)})"
        if form == "rsqrt":
            return f"(1.0 / numpy.sqrt({self._print(base)}))"
        if form == "product":
            prod = " * ".join([self.parenthesize(base, precedence(e), strict=False)] * abs(int(ex)))
            return f"({prod})" if ex > 0 else f"(1.0 / ({prod}))"
        if form == "power":
            return f"power64({self._print(base)}, {float(ex)!r})"
        return f"numpy.exp({self._print(ex * sp.log(base))})"

    def _print_Max(self, e):
        return self._fold("numpy.maximum", e)

    def _print_Min(self, e):
        return self._fold("numpy.minimum", e)

    def _fold(self, fn: str, e) -> str:
        """Min / Max pairwise, NaN kept (torch.minimum / torch.clamp in generated code)."""
        out = self._print(e.args[0])
        for a in e.args[1:]:
            out = f"{fn}({out}, {self._print(a)})"
        return out

    def _print_StableSoftplus(self, e):
        return f"({self._print(softplus_terms(e.args[0]))})"

    def _print__ExpLog(self, e):
        return f"exp_log({self._print(e.args[0])}, {self._print(e.args[1])})"


def horner(coeffs, c0_lo: float, u: np.ndarray, den=None, fma: bool = False) -> np.ndarray:
    """The documented evaluation order in u's dtype (docs/table-format.md): c0 + u N(u), or with a
    denominator (1, d1 .. dn) c0 + u N(u) / Q(u), Q by Horner down to d0 = 1.

    ``fma`` (float32 u only): the FMA scheme, every Horner step p * u + c of N and Q and the last
    u N'(u) + c0_lo one fused multiply-add (fmaf, emulated exactly by :func:`.float32.fma32`); the
    division and the final + c0_hi stay as they are."""
    u = np.asarray(u)
    ft = u.dtype.type
    if len(coeffs) == 1:
        return (u * ft(0) + ft(c0_lo)) + ft(coeffs[0])   # u * 0: NaN propagates, as in generated code
    if fma and u.dtype != np.float32:
        raise TypeError(f"horner: the FMA scheme is float32 arithmetic, got u of dtype {u.dtype}")
    step, v = (fma32, u.astype(np.float64)) if fma else (_mul_add, u)   # (fma32 takes float64 u as is)
    p = np.full_like(u, coeffs[-1])
    for c in coeffs[-2:0:-1]:
        p = step(p, v, ft(c))
    if den is not None:
        q = np.full_like(u, den[-1])
        for d in den[-2::-1]:
            q = step(q, v, ft(d))
        with np.errstate(all="ignore"):
            p = p / q
    return step(p, v, ft(c0_lo)) + ft(coeffs[0])


def _mul_add(a: np.ndarray, b: np.ndarray, c) -> np.ndarray:
    """a * b + c, rounded twice (the scheme without FMA)."""
    return a * b + c


def segment_index(breaks, y: np.ndarray, params: dict | None = None) -> np.ndarray:
    """Index of the segment holding each y: sum over breaks of (y > b) (left side) or (y >= b)."""
    idx = np.zeros(y.shape, dtype=np.int64)
    for b in breaks:
        b = b if isinstance(b, Break) else Break.from_json(b)
        v = y.dtype.type(number(b.value, params))
        idx += (y > v) if b.side == "left" else (y >= v)
    return idx


def is_numbers(value: Any) -> bool:
    """A non-empty list of JSON numbers (bool excluded)."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, NUMBER) and not isinstance(v, bool) for v in value)


def plain_extra(d: dict, known) -> dict:
    """The keys of ``d`` a model class does not interpret (kept as read)."""
    return {k: v for k, v in d.items() if k not in known}


@dataclass(frozen=True)
class Break:
    """A break between intervals: ``value`` (number or expression string) and the side owning it."""

    value: Any
    side: str

    @classmethod
    def from_json(cls, d: dict) -> Break:
        return cls(d["value"], d["side"])

    def to_json(self) -> dict:
        return {"value": self.value, "side": self.side}

