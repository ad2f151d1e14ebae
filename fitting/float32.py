"""The fitter's float32 arithmetic, in one place: limits, rounding, float32 order and the runtime's log.

Everything the fitter computes about float32 values (fitting coefficients, sampling y in float32
order, emulating the generated scheme bit for bit) goes through these helpers.
"""

from __future__ import annotations

import numpy as np

from ..common.float32_scheme import LN2_HI, LN2_LO, LOG_POLY, SQRT2_F32, TINY32, root_seed, root_steps

__all__ = ["F32_MAX", "TINY32", "ORDINAL_NODES", "f32", "f32_below", "split3", "ordinal", "from_ordinal",
           "ordinal_nodes", "end_neighbours", "half_values", "round_to", "log32", "root_power32", "fma32",
           "overflows_as"]

F32_MAX = float(np.finfo(np.float32).max)
F32_OVERFLOW = 2.0**128 - 2.0**103   # the least float64 magnitude that rounds to float32 inf (a midpoint: even)
ORDINAL_NODES = 1 << 16                      # default count of :func:`ordinal_nodes`


def overflows_as(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Where float32 ``got`` is +-inf and is ``want`` (float64) correctly rounded to float32: an
    exponential tail's g = c|y| past float32 max (c > 1), which no float32 can hold."""
    with np.errstate(invalid="ignore"):
        return np.isinf(got) & (np.abs(want) >= F32_OVERFLOW) & (np.sign(got) == np.sign(want))


def f32(v: float) -> float:
    """``v`` rounded to the nearest float32, as a Python float."""
    return float(np.float32(v))


def f32_below(v: float) -> float:
    """The largest float32 <= ``v``."""
    r = np.float32(v)
    return float(r if float(r) <= v else np.nextafter(r, np.float32(-np.inf)))


def split3(value) -> tuple[float, float, float]:
    """float32 hi + mid + lo with hi + mid + lo <= value (an mpmath or float value), ~72 bits."""
    import mpmath
    with mpmath.workdps(40):
        v = mpmath.mpf(value)
        hi = f32(float(v))
        mid = f32(float(v - hi))
        lo = f32_below(float(v - hi - mid))
    return hi, mid, lo


def ordinal(v: float) -> int:
    """Monotone integer index of the float32 nearest ``v`` (negative values below positive ones)."""
    i = int(np.array(v, dtype=np.float32).view(np.int32))
    return i if i >= 0 else -(i & 0x7FFFFFFF)


def from_ordinal(k: np.ndarray) -> np.ndarray:
    """The float32 values of ordinals ``k`` (inverse of :func:`ordinal`)."""
    k = np.asarray(k, dtype=np.int64)
    bits = np.where(k >= 0, k, (-k) | 0x80000000).astype(np.uint32)
    return bits.view(np.float32)


def ordinal_nodes(lo: float, hi: float, n: int = ORDINAL_NODES) -> np.ndarray:
    """float32 values evenly spaced in float32 order strictly inside (lo, hi), as float64."""
    lo, hi = max(lo, -F32_MAX), min(hi, F32_MAX)
    if not lo < hi:
        return np.empty(0)
    k = np.unique(np.linspace(ordinal(lo), ordinal(hi), n).astype(np.int64))
    y = from_ordinal(k).astype(np.float64)
    return y[(y > lo) & (y < hi)]


END_STEPS = np.unique(np.concatenate([np.arange(64), np.geomspace(64, 1 << 24, 97).astype(np.int64)]))


def end_neighbours(lo: float, hi: float, steps: np.ndarray = END_STEPS) -> np.ndarray:
    """float32 values of [lo, hi] next to its finite ends, as float64: the first 64 float32 values in
    from each finite end, then ~100 geometrically spaced ones out to 2^24 values in. There a closed
    form's float32 arithmetic cancels: 4*(y + 0.3)**(3/4) at y = -0.29999998, the float32 above -0.3,
    sums y and 0.3 rounded to float32 and is 3e-6 off, where a sample spread over the range rarely
    lands (its runs are thousands of float32 values wide)."""
    out = []
    for end, inward in ((lo, 1), (hi, -1)):
        if not (np.isfinite(end) and abs(end) <= F32_MAX):
            continue
        k = ordinal(end)
        first = float(from_ordinal(np.array([k]))[0])
        if (first < end) if inward > 0 else (first > end):
            k += inward                        # the nearest float32 lies outside: start one inside
        top = ordinal(F32_MAX)
        out.append(from_ordinal(np.clip(k + inward * steps, -top, top)).astype(np.float64))
    y = np.concatenate(out) if out else np.empty(0)
    return np.unique(y[np.isfinite(y) & (y >= lo) & (y <= hi)])


def half_values(dtype: str) -> np.ndarray:
    """Every finite value of bf16 or fp16, as float64, sorted."""
    bits = np.arange(1 << 16, dtype=np.uint32)
    with np.errstate(invalid="ignore"):
        if dtype == "fp16":
            vals = bits.astype(np.uint16).view(np.float16).astype(np.float64)
        else:
            vals = (bits << 16).astype(np.uint32).view(np.float32).astype(np.float64)
    return np.unique(vals[np.isfinite(vals)])


def round_to(y: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values rounded to ``dtype`` ("bf16" via float32, round-to-nearest-even; "fp16";
    "fp32") and back."""
    y = np.asarray(y, dtype=np.float64)
    with np.errstate(over="ignore"):
        if dtype == "fp32":
            return y.astype(np.float32).astype(np.float64)
        if dtype == "fp16":
            return y.astype(np.float16).astype(np.float64)
        if dtype == "bf16":
            bits = y.astype(np.float32).view(np.uint32).astype(np.uint64)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.astype(np.uint32).view(np.float32).astype(np.float64)
    raise ValueError(f"dtype must be one of bf16, fp16, fp32, got {dtype!r}")


def fma32(a, b, c) -> np.ndarray:
    """fmaf(a, b, c) of float32 values (float32 arrays, or float64 arrays of float32 values), emulated
    exactly: one rounding of a * b + c to float32.

    a * b is exact in float64 (24 + 24 <= 53 bits), so s = float64(a * b + c) is rounded once. Rounding
    s on to float32 is then correct except where s is a float32 midpoint (double rounding goes wrong only
    there) or where the result is a float32 subnormal (other midpoints): those few values are redone
    with the error of s (TwoSum) and rounding to odd (correct at 53 >= 24 + 2 bits, Boldo and
    Melquiond). float64 never goes subnormal here (|a * b| >= 2^-298)."""
    a, b, c = (np.asarray(v, dtype=np.float64) for v in (a, b, c))
    with np.errstate(invalid="ignore", over="ignore"):
        p = a * b
        s = np.asarray(p + c)                   # (writable, 0-d inputs too)
        bits = s.view(np.int64)
        hard = ((bits & _LOW29) == _HALF29) | (np.abs(s) < _SUBNORMAL32)
        if hard.any():
            p, c = np.broadcast_to(p, s.shape)[hard], np.broadcast_to(c, s.shape)[hard]
            s[hard] = _round_to_odd(p, c)
        return s.astype(np.float32)


_LOW29, _HALF29 = (1 << 29) - 1, 1 << 28       # the bits float64 -> float32 drops; a midpoint's pattern
_SUBNORMAL32 = 2.0 ** -125                      # below this, float32 rounding drops more than 29 bits


def _round_to_odd(p: np.ndarray, c: np.ndarray) -> np.ndarray:
    """p + c rounded to odd in float64: the float64 nearest, or where that is inexact the bracketing
    float64 with an odd last bit (TwoSum gives the rounding error err: p + c == s + err exactly)."""
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)
    fix = np.isfinite(err) & (err != 0) & ((s.view(np.int64) & 1) == 0)
    return np.where(fix, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)


# The runtime's float32 log, emulated exactly.
_SQRT2 = np.float32(SQRT2_F32)
_LOG_POLY = tuple(np.float32(c) for c in LOG_POLY)
_LN2_HI, _LN2_LO = np.float32(LN2_HI), np.float32(LN2_LO)


def log32(a: np.ndarray) -> np.ndarray:
    """log of positive normal float32 ``a`` exactly as the generated scheme computes it (Cephes logf
    from the float's bits, docs/table-format.md; constants shared with the runtime in common/)."""
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


def root_power32(a: np.ndarray, n: int, k: int) -> np.ndarray:
    """float32 a^(k/n) (k = -1 or n - 1) of float32 ``a`` in [1, F32_MAX] exactly as the generated
    scheme computes it (docs/table-format.md, power_tail): a seed from a's bits, ROOT_STEPS Newton
    steps on r^n = a in float64, r^k in float64 rounded once to float32."""
    a = np.asarray(a, dtype=np.float32)
    with np.errstate(all="ignore"):
        r = ((a.view(np.int32) // np.int32(n)) + np.int32(root_seed(n))).view(np.float32).astype(np.float64)
        return root_steps(r, a.astype(np.float64), n, k).astype(np.float32)
