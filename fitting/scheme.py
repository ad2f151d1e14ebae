"""A table's numbers and the scheme's arithmetic (docs/table-format.md): parameter expressions, breaks,
Horner, segment indices; the plain parts the table model (:mod:`.model`) is built from."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import numpy as np
import sympy as sp
from sympy.codegen.cfunctions import log1p
from sympy.printing.numpy import NumPyPrinter
from sympy.printing.precedence import precedence

from .float32 import fma32

__all__ = ["number", "horner", "segment_index", "Break", "is_numbers", "plain_extra", "param_values",
           "closed_form_fn", "ClosedForm", "LIBRARY_ULPS", "library_shifts", "ulps_apart", "fold_numbers",
           "emitted_form", "softplus_argument", "softplus_terms", "StableSoftplus", "power_form", "power64"]

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


# The most a float32 library result may be off the exact value, in ulps of the exact value, per function
# generated code calls on the tensor (sqrt, correctly rounded, is not one). exp, log, log1p: 1, SLEEF's
# documented bound for its u10 functions, which ATen's CPU kernels and the C kernels call; tanh: 2, as
# SLEEF's u10 tanhf returns x + 1 ulp at tiny x just below x (1.00000002 ulps, both builds). erf,
# atan, sinh, cosh, asinh: the larger of glibc's x86_64 float figure (sysdeps/x86_64/fpu/libm-test-ulps,
# round to nearest, the larger of an old 2.2x table and the current one: erf 1, atan 1, sinh 2, cosh 2,
# asinh 2) and ATen's (SLEEF u10: 1). Not covered: a GPU library's own bounds (CUDA's expf is 2 ulps).
LIBRARY_ULPS = {"exp": 1, "log": 1, "log1p": 1, "tanh": 2, "erf": 1, "atan": 1, "sinh": 2, "cosh": 2, "asinh": 2}
EVERY_SHIFT_UP_TO = 3      # calls whose 3**k combinations of moves are all evaluated; more: three sets


def _erf64(a: np.ndarray) -> np.ndarray:
    from scipy.special import erf   # numpy has no erf; the fitter's extra installs scipy
    return erf(a)


# each library function in float64 (numpy's; scipy's erf), not mpmath: within a few float64 ulps, 2^-29 of
# a float32 ulp, so rounded to float32 it is one of the two floats around the exact value, and the floats
# within U ulps of it are those within U ulps of the exact value (but for one exactly U ulps away, which
# 2^-52 cannot place). Where float64 gives a power of two, the binade the exact value lies in decides its
# ulp: :func:`_below_power_of_two` (else the larger ulp, which admits more)
_FLOAT64 = {"exp": np.exp, "log": np.log, "log1p": np.log1p, "tanh": np.tanh, "erf": _erf64, "atan": np.arctan,
            "sinh": np.sinh, "cosh": np.cosh, "asinh": np.arcsinh}


def library_shifts(calls: int) -> list[tuple[int, ...]]:
    """The results of ``calls`` library calls evaluated (-1: the least within LIBRARY_ULPS of the exact
    value, 0: rounded to nearest, 1: the greatest), one tuple per evaluation: all 3**calls for at most
    EVERY_SHIFT_UP_TO calls, else all nearest, all least and all greatest."""
    if calls <= EVERY_SHIFT_UP_TO:
        return list(itertools.product((-1, 0, 1), repeat=calls))
    return [(0,) * calls, (-1,) * calls, (1,) * calls]


def _library(shifts: tuple[int, ...] | None, k: int, name: str, a) -> np.ndarray:
    """Library call ``k`` of a closed form, ``name`` of ``a`` in a's dtype: float64's result rounded to
    nearest, or where ``shifts[k]`` is -1 (1) the least (greatest) value of a's dtype within
    LIBRARY_ULPS[name] ulps of it (:func:`ulps_apart`; not at an exact point: :func:`_exact_point`)."""
    a = np.asarray(a)
    exact = _FLOAT64[name](a.astype(np.float64))
    nearest = exact.astype(a.dtype)
    if not shifts or not shifts[k]:
        return nearest
    a64 = a.astype(np.float64)
    moved = ulps_apart(exact, nearest, shifts[k] * LIBRARY_ULPS[name], _below_power_of_two(name, a64, exact))
    if name in ("tanh", "erf"):      # a library's result stays in the function's range: |tanh|, |erf| <= 1
        moved = np.clip(moved, -1, 1).astype(moved.dtype)
    return np.where(_exact_point(name, a64), nearest, moved)


def _exact_point(name: str, a: np.ndarray) -> np.ndarray:
    """Where C's Annex F has function ``name`` return its exact value, which every library here does:
    f(±0) (exp and cosh 1, the others ±0) and log(1) = 0."""
    return (a == 0) | ((a == 1) if name == "log" else False)


def _below_power_of_two(name: str, a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Where function ``name``'s exact value at ``a`` is smaller in magnitude than its float64 result
    ``w`` when w is a power of two (float64 rounds exp(-1e-30) to 1: the exact value's ulp is the binade
    below's), as the function's range tells: |tanh|, |erf| < 1; exp(a) < 1 for a < 0; |tanh(a)|,
    |atan(a)|, |asinh(a)| < |a| and log1p(a) < a for a > 0 (w = a for a tiny a)."""
    below = np.zeros(w.shape, dtype=bool)
    if name in ("tanh", "erf"):
        below |= np.abs(w) == 1
    if name == "exp":
        below |= (w == 1) & (a < 0)
    if name in ("tanh", "atan", "asinh") or name == "log1p":
        below |= (w == a) & ((a > 0) if name == "log1p" else (a != 0))
    return below


def ulps_apart(exact: np.ndarray, nearest: np.ndarray, ulps: int, below: np.ndarray | bool = False) -> np.ndarray:
    """The greatest value of nearest's dtype at most ``ulps`` ulps above float64 ``exact`` (ulps > 0), or
    the least at most -ulps below. An ulp is the dtype's spacing at the exact value v,
    2^(floor(log2|v|) - p + 1) (p the precision, as library bounds are measured): at |exact|, but the
    binade below's where ``below`` and ``exact`` is a power of two (v lies below it in magnitude). Where ``nearest``
    (exact rounded) is not finite it stays; a finite value stays finite, and none has the other sign than
    ``exact`` (it stops at zero; float64's 0 may be a positive value's underflow): a library's result is
    finite where the exact value rounds to a finite float, and has its sign (a crossed sign would make a
    later sqrt or log NaN)."""
    dtype, info = nearest.dtype, np.finfo(nearest.dtype)
    tiny = float(info.smallest_subnormal)
    with np.errstate(all="ignore"):
        m, e = np.frexp(exact)
        e = np.where(below & (np.abs(m) == 0.5), e - 1, e)
        ulp = np.where(exact == 0, tiny, np.maximum(np.ldexp(1.0, e - 1 - info.nmant), tiny))
        bound = exact + ulps * ulp
        out = bound.astype(dtype)
        past = out.astype(np.float64) > bound if ulps > 0 else out.astype(np.float64) < bound
        out = np.where(past, np.nextafter(out, np.asarray(-math.inf if ulps > 0 else math.inf, dtype)), out)
        crossed = (out != 0) & (np.signbit(out) != np.signbit(exact))
        out = np.where(crossed, np.copysign(np.zeros_like(out), exact.astype(dtype)), out)
        return np.where(np.isfinite(nearest) & np.isfinite(out), out, nearest)


class ClosedForm:
    """A closed form evaluated with the operations generated code runs (:func:`closed_form_fn`)."""

    def __init__(self, fn: Callable, calls: int):
        self._fn = fn
        self.calls = calls          # library calls on the tensor (exp, log, ...: LIBRARY_ULPS)

    def __call__(self, y: np.ndarray, shifts: tuple[int, ...] | None = None) -> np.ndarray:
        """g~(y) in y's dtype, each library result computed in float64 and rounded once to y's dtype,
        or where ``shifts`` (one per call: :func:`library_shifts`; None: all 0) says so the least or the
        greatest float within LIBRARY_ULPS of it."""
        with np.errstate(all="ignore"):
            return np.broadcast_to(np.asarray(self._fn(y, shifts), dtype=y.dtype), y.shape)

    def spread(self, y: np.ndarray) -> np.ndarray:
        """(least, greatest) g~(y) over the library results within LIBRARY_ULPS of the exact values,
        stacked (shape (2, *y.shape)), so that its error bounds every library within those ulps (SLEEF,
        glibc, numpy: not only numpy's float32 functions). Each call is evaluated rounded to nearest and
        at the least and the greatest float within LIBRARY_ULPS of the exact result (:func:`ulps_apart`;
        every such float lies between), every combination for up to EVERY_SHIFT_UP_TO calls: exact for a
        g~ monotone in each call's result between those values, which the emitted operations are (+, -,
        *, /, sqrt, rounding and the library functions themselves are monotone in one argument); beyond,
        the all-nearest, all-least and all-greatest sets are a sampled check. NaN in any variant gives NaN."""
        if self.calls == 0:
            g = self(y)
            return np.broadcast_to(g, (2, *g.shape))
        lo = hi = None
        for shifts in library_shifts(self.calls):
            g = self(y, shifts)
            lo = g if lo is None else np.minimum(lo, g)     # (NaN propagates)
            hi = g if hi is None else np.maximum(hi, g)
        return np.stack([lo, hi])


@lru_cache(maxsize=256)
def closed_form_fn(expr: str, params: tuple) -> ClosedForm:
    """Closed form ``expr`` with parameter values ``params`` ((name, value) pairs) as a function of y
    in y's dtype: the operations generated code evaluates it with (:func:`emitted_form`, each power by
    :func:`power_form`), so certification measures the emitted code's rounding; library calls (exp,
    log, ...) in float64 rounded to y's dtype, and :meth:`ClosedForm.spread` over every library within
    LIBRARY_ULPS of the exact result."""
    y = sp.Symbol("y", real=True)
    e = _exponents_kept(emitted_form(_sym(expr, tuple(k for k, _ in params)), y), y)
    e = fold_numbers(e.subs(param_values(dict(params))), y)
    printer = _EmittedPrinter()
    f = sp.lambdify((y, sp.Symbol(_SHIFTS)), e, modules=[{"power64": power64, "library": _library}, "numpy"],
                    printer=printer)
    return ClosedForm(f, printer.calls)


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


def _exponents_kept(e: sp.Expr, var: sp.Symbol) -> sp.Expr:
    """``e`` with each tensor power whose exponent is in parameters marked :class:`_ExpLog` (before
    their values make it a number, which generated code would compute otherwise)."""
    return e.replace(lambda a: isinstance(a, sp.Pow) and a.base.has(var) and power_form(a.exp) == "exp_log"
                     and not a.exp.has(var), lambda a: _ExpLog(a.base, a.exp))


_SHIFTS = "library_shifts"   # the name of the shifts argument of a closed form's lambdified function


class _EmittedPrinter(NumPyPrinter):
    """lambdify's NumPy printer with generated code's numbers and powers: numbers as Python floats
    (rounded to y's dtype where they meet it, as torch rounds a Python scalar), powers by :func:`power_form`,
    and each library function on the tensor as :func:`_library` call number k (``calls`` counts them)."""

    def __init__(self, settings=None):
        super().__init__(settings)
        self.calls = 0

    def _library_call(self, name: str, arg: str) -> str:
        self.calls += 1
        return f"library({_SHIFTS}, {self.calls - 1}, {name!r}, {arg})"

    def _print_library(self, e):
        return self._library_call(type(e).__name__, self._print(e.args[0]))

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
        return self._exp_log(self._print(base), self._print(ex))

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
        return self._exp_log(self._print(e.args[0]), self._print(e.args[1]))

    def _exp_log(self, base: str, exponent: str) -> str:
        """exp(exponent * log(base)) (power_form 'exp_log'), its two library calls counted."""
        return self._library_call("exp", f"({exponent}) * {self._library_call('log', base)}")


for _name in LIBRARY_ULPS:
    setattr(_EmittedPrinter, f"_print_{_name}", _EmittedPrinter._print_library)


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

