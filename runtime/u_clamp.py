"""Which sides of the float32 scheme's clamp of u to [-1, 1] can change a value (docs/table-format.md).

Each segment evaluates its polynomial at u = clamp((t - center) * scale, -1, 1), t the segment's
transform of y. The fitter places center and scale so that u stays inside [-1, 1] over the segment,
but the float32 y a segment is chosen for (its thresholds as compared) reach a little past the range
it was fitted on, and the first and last segment of a class take every y below or above it (-inf and
+inf included). Where no float32 y can give a u beyond a side, the clamp on that side returns its
operand unchanged and the AVX-512 kernel (csrc/cpu_kernels.c) leaves it out: two operations of
about fifty per vector of 16 elements, with bits unchanged; where no y reaches past either side, so
do the Triton kernels (invact.impl_triton.clamps: two instructions of ~80 an element).

The proof is exact: every step from y to u (the origin subtractions, the sign, max(d, 0), the
correctly rounded sqrt, t - center, times scale) is monotone in y, so over a segment u is extreme at
the least and the greatest float32 y that select it. Both are evaluated in float32 arithmetic
(double, then rounded once: innocuous for +, -, *, sqrt, since 53 >= 2 * 24 + 2), with denormals as
IEEE has them and flushed (flush-to-zero and denormals-are-zero, which a kernel run may be under;
flushing is monotone too). A log transform (invact.fastmath's, not proven monotone) keeps both sides.
"""

from __future__ import annotations

import math
import struct

from .common.slots import float_after

__all__ = ["LOWER", "UPPER", "clamp_sides"]

LOWER, UPPER = 1, 2               # bits of clamp_sides: max(-1, u) is needed, min(1, u) is needed
_TINY = 2.0 ** -126               # the least normal float32


def _f32(x: float, flushed: bool) -> float:
    """x rounded to float32 (nearest, ties to even); subnormals to zero where ``flushed``. Exact
    whatever this thread's MXCSR says (the subnormal range is rounded here, not by a C cast)."""
    if not math.isfinite(x):
        return x
    if abs(x) < _TINY:
        return math.copysign(0.0 if flushed else round(x * 2.0 ** 149) * 2.0 ** -149, x)
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _u(y: float, row, transform, flushed: bool) -> float:
    """u of float32 y in a segment's row, step for step as the scheme computes it."""
    kind, sign, origin = transform
    t = _f32(y, flushed)
    if kind == "sqrt":
        for o in origin:
            t = _f32(t - _f32(o, flushed), flushed)
        if sign < 0:
            t = -t
        t = _f32(math.sqrt(max(t, 0.0)), flushed) if not math.isnan(t) else t
    center, scale = _f32(row[1], flushed), _f32(row[2], flushed)
    d = _f32(t - center, flushed)
    return math.nan if math.isinf(d) and scale == 0 else _f32(d * scale, flushed)


def clamp_sides(classes, transforms, rows, passed_from) -> int:
    """LOWER | UPPER: the sides of the clamp some float32 y can reach, for a table's CLASSES ((code,
    first row, rows, first threshold) each), TRANSFORMS, POLY rows and the least float32 y that passes
    each threshold (``passed_from``; NaN where none does). Codes of no class take the first class, and
    so the same rows."""
    sides = 0
    for _, first, count, first_thr in classes:
        own = list(passed_from[first_thr:first_thr + count - 1])
        order = [math.inf if math.isnan(v) else v for v in own]  # NaN: passed by no y, as +inf would be
        if order != sorted(order):
            return LOWER | UPPER  # rows that are not ranges of y (no fitted table has them)
        for k in range(count):
            lo = -math.inf if k == 0 else own[k - 1]
            above = math.nan if k == count - 1 else own[k]  # the row ends below this (NaN: at +inf)
            if math.isnan(lo) or above == -math.inf:
                continue  # no float32 y selects this row
            hi = math.inf if math.isnan(above) else -float_after(-above)  # the float below it
            if lo > hi:
                continue
            row = rows[first + k]
            transform = transforms[int(row[0])]
            if transform[0] not in ("identity", "sqrt"):
                return LOWER | UPPER
            for y in (lo, hi):
                for flushed in (False, True):
                    u = _u(y, row, transform, flushed)
                    sides |= (LOWER if u < -1.0 else 0) | (UPPER if u > 1.0 else 0)
    return sides
