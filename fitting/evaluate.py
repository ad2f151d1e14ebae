"""Evaluate a table the way generated code does: the float32 scheme of docs/table-format.md in numpy.

``dtype=np.float32`` emulates the runtime bit for bit (no FMA); ``np.float64`` gives the table's
value in (nearly) real arithmetic, for approximation errors and plots.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import sympy as sp

__all__ = ["eval_code_class", "eval_segment", "horner", "segment_index", "number", "error_curve"]

TINY32 = np.float32(np.finfo(np.float32).tiny)
# The runtime's float32 log (invact.fastmath, Cephes logf from the float's bits), emulated exactly.
_SQRT2 = np.float32(1.4142135381698608)
_LOG_POLY = tuple(np.float32(c) for c in (
    7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
    -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1))
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)


def log32(a: np.ndarray) -> np.ndarray:
    """log of positive normal float32 ``a`` exactly as invact.fastmath.log computes it."""
    bits = a.view(np.int32)
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(np.float32)
    big = m >= _SQRT2
    e = ((bits >> 23) - 127 + big.astype(np.int32)).astype(np.float32)
    f = np.where(big, m * np.float32(0.5), m) - np.float32(1)
    z = f * f
    p = np.full_like(f, _LOG_POLY[0])
    for c in _LOG_POLY[1:]:
        p = p * f + c
    r = f * z * p
    r = r + e * _LN2_LO
    r = r - np.float32(0.5) * z
    return (f + r) + e * _LN2_HI


def number(text, params: dict | None = None) -> float:
    """A table number: a float, "inf"/"-inf", or an expression string in parameter names."""
    if isinstance(text, (int, float)):
        return float(text)
    if text in ("inf", "-inf"):
        return float(text)
    params = params or {}
    return float(_sym(text, tuple(sorted(params))).subs(_symbols(params)))


def _symbols(params: dict) -> dict:
    return {sp.Symbol(k, real=True): v for k, v in params.items()}


@lru_cache(maxsize=512)
def _sym(text: str, names: tuple[str, ...]) -> sp.Expr:
    """``text`` parsed with y, x and the table's parameter names as the real symbols they are."""
    from .expressions import parse
    return parse(text, ("y", "x"), names, "table expression")


def segment_index(breaks: list[dict], y: np.ndarray, params: dict | None = None) -> np.ndarray:
    idx = np.zeros(y.shape, dtype=np.int64)
    for b in breaks:
        v = y.dtype.type(number(b["value"], params))
        idx += (y > v) if b["side"] == "left" else (y >= v)
    return idx


def eval_segment(seg: dict, y: np.ndarray, params: dict | None = None) -> np.ndarray:
    ft = y.dtype.type
    kind = seg["kind"]
    if kind == "constant":
        return np.full_like(y, ft(number(seg["value"], params))) + y * ft(0)  # NaN propagates
    if kind == "exact":
        return _exact_fn(seg["expr"], tuple(sorted((params or {}).items())))(y).astype(y.dtype)
    tf = seg["transform"]
    if tf["kind"] == "identity":
        t = y
    else:
        hi, mid, lo = (ft(v) for v in tf["origin"])
        d = ft(tf["sign"]) * (((y - hi) - mid) - lo)
        with np.errstate(all="ignore"):
            if tf["kind"] == "sqrt":
                t = np.sqrt(np.maximum(d, ft(0)))
            else:
                d = np.maximum(d, ft(TINY32))
                t = np.where(np.isnan(d), d, log32(d)) if y.dtype == np.float32 else np.log(d)
    u = np.clip((t - ft(seg["center"])) * ft(seg["scale"]), ft(-1), ft(1))
    return horner(seg["coeffs"], seg["c0_lo"], u, seg.get("den"))


def horner(coeffs, c0_lo: float, u: np.ndarray, den=None) -> np.ndarray:
    """The documented evaluation order in u's dtype (docs/table-format.md): c0 + u N(u), or with a
    denominator (1, d1 .. dn) c0 + u N(u) / Q(u), Q by Horner down to d0 = 1."""
    u = np.asarray(u)
    ft = u.dtype.type
    if len(coeffs) == 1:
        return (u * ft(0) + ft(c0_lo)) + ft(coeffs[0])   # u * 0: NaN propagates, as in generated code
    p = np.full_like(u, coeffs[-1])
    for c in coeffs[-2:0:-1]:
        p = p * u + ft(c)
    if den is not None:
        q = np.full_like(u, den[-1])
        for d in den[-2::-1]:
            q = q * u + ft(d)
        with np.errstate(all="ignore"):
            p = p / q
    p = p * u
    return (p + ft(c0_lo)) + ft(coeffs[0])


@lru_cache(maxsize=256)
def _exact_fn(expr: str, params: tuple):
    e = _sym(expr, tuple(k for k, _ in params)).subs(_symbols(dict(params)))
    f = sp.lambdify(sp.Symbol("y", real=True), e, modules=["numpy"])

    def call(y):
        with np.errstate(all="ignore"):
            return np.broadcast_to(np.asarray(f(y), dtype=y.dtype), y.shape)
    return call


def eval_code_class(cc: dict, y: np.ndarray, params: dict | None = None) -> np.ndarray:
    """g~(y) for one code class; y's dtype (float32 or float64) is the arithmetic used."""
    y = np.asarray(y)
    idx = segment_index(cc["y_breaks"], y, params)
    out = np.empty_like(y)
    for i, seg in enumerate(cc["segments"]):
        m = idx == i
        if m.any():
            out[m] = eval_segment(seg, y[m], params)
    return out


def error_curve(table: dict, branch: int, n: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """y over the branch's range and |g~(y) - g(y)| (float64 arithmetic vs. the float64 reference)."""
    from .certify import branch_reference, branch_sample_range
    b = table["branches"][branch]
    ref = branch_reference(table, branch)
    lo, hi = branch_sample_range(table, branch)
    y = np.unique(np.concatenate([np.linspace(lo, hi, n // 2), _geom_between(lo, hi, n // 2)]))
    cc = table["code_classes"][b["code"]]
    if ref is None:
        return y, np.zeros_like(y)
    return y, np.abs(eval_code_class(cc, y, table["params"]) - ref(y))


def _geom_between(lo: float, hi: float, n: int) -> np.ndarray:
    """Points clustered towards both ends (where singularities sit)."""
    s = np.geomspace(1e-12, 1.0, n // 2)
    return np.concatenate([lo + (hi - lo) * s, hi - (hi - lo) * s])
