"""A table's numbers and the scheme's arithmetic (docs/table-format.md): parameter expressions, breaks,
Horner, segment indices; the plain parts the table model (:mod:`.model`) is built from."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import sympy as sp

from .float32 import fma32

__all__ = ["number", "horner", "segment_index", "Break", "is_numbers", "plain_extra", "param_values",
           "closed_form_fn"]

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
    pairs), in y's dtype."""
    e = _sym(expr, tuple(k for k, _ in params)).subs(param_values(dict(params)))
    f = sp.lambdify(sp.Symbol("y", real=True), e, modules=["numpy"])

    def call(y):
        with np.errstate(all="ignore"):
            return np.broadcast_to(np.asarray(f(y), dtype=y.dtype), y.shape)
    return call


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

