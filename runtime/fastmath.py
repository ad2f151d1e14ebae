"""Float32 functions written with operations torch.compile vectorises on CPU.

Inductor's CPU code computes ``torch.log`` far slower than arithmetic (measured: a kernel with one
log costs ~2.5x the same kernel with a sqrt), so the log transform of docs/table-format.md is
evaluated here from the float's bits: exponent plus a polynomial in the mantissa (Cephes ``logf``,
within about one float32 ulp). Certification (``invact.fitting.evaluate``) emulates exactly these
operations, so the certified float32 error covers them. float64 tensors use ``torch.log``.

The scheme's sqrt is correctly rounded, which ``torch.sqrt`` is not on CPU tensors (ATen calls MKL's
vsSqrt: measured, 381 of 65,536 random floats one ulp off); :func:`sqrt` restores it in eager code.

:func:`where` is ``torch.where`` bit for bit; in eager CPU code it blends the bits of its operands,
since ATen's CPU ``where`` branches per element: ~4.5 ns per element on a random condition
(measured, 2^16 elements), four to five times the five whole-tensor integer operations of the blend,
though ~0.8x of them where the condition is uniform.
"""

from __future__ import annotations

import torch

from .common.float32_scheme import LN2_HI, LN2_LO, LOG_POLY, SQRT2_F32  # Cephes logf's constants
from .common.float32_scheme import root_seed, root_steps

__all__ = ["log", "sqrt", "where", "root_power", "power", "LOG_POLY", "SQRT2_F32", "LN2_HI", "LN2_LO"]

_SAME_SIZE_INT = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
                  torch.bfloat16: torch.int16, torch.int32: torch.int32, torch.int64: torch.int64}


def log(a: torch.Tensor) -> torch.Tensor:
    """Natural log of positive normal float32 ``a`` (inf and NaN are not handled: callers clamp
    to the smallest normal and restore NaN themselves); ``torch.log`` for other dtypes."""
    if a.dtype != torch.float32:
        return torch.log(a)
    bits = a.view(torch.int32)
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)      # mantissa in [1, 2)
    big = m >= SQRT2_F32
    e = ((bits >> 23) - 127 + big.to(torch.int32)).to(torch.float32)
    f = where(big, m * 0.5, m) - 1.0                                 # in [sqrt(1/2) - 1, sqrt(2) - 1)
    z = f * f
    p = LOG_POLY[0]
    for c in LOG_POLY[1:]:
        p = p * f + c
    r = f * z * p
    r = r + e * LN2_LO
    r = r - 0.5 * z
    return (f + r) + e * LN2_HI


def sqrt(a: torch.Tensor) -> torch.Tensor:
    """Correctly rounded square root of float32 CPU ``a`` in eager code: float64's root, within one
    float64 ulp (2^-52 relative), rounds to the correctly rounded float32, since the root of a
    float32 lies at least 2^-50 (relative) from every float32 midpoint. Compiled code (Inductor's
    vsqrtps), other devices and dtypes use ``torch.sqrt``."""
    if a.dtype != torch.float32 or a.device.type != "cpu" or torch.compiler.is_compiling():
        return torch.sqrt(a)
    return torch.sqrt(a.double()).float()


def root_power(a: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """a^(k/n) (k = -1 or n - 1) of float32 ``a`` in [1, float32 max] as the power_tail scheme states
    (docs/table-format.md): a seed from a's bits, ROOT_STEPS float64 Newton steps on r^n = a, r^k in
    float64 rounded once to float32 (measured: the correctly rounded value); ``a ** (k / n)`` for
    other dtypes."""
    if a.dtype != torch.float32:
        return a ** (k / n)
    r = (torch.div(a.view(torch.int32), n, rounding_mode="floor") + root_seed(n)).view(torch.float32).double()
    return root_steps(r, a.double(), n, k).float()


def power(a: torch.Tensor, exponent: float) -> torch.Tensor:
    """``a ** exponent`` of float32 ``a`` (a closed form's fractional power, docs/table-format.md) as
    float64's pow rounded once to float32: within 2^-52 (relative) before that rounding, so the
    correctly rounded power but where the exact one lies that close to a float32 midpoint, where
    ``exp(exponent * log(a))`` in float32 loses |exponent * log(a)| ulps (5e-6 relative near 1e38).
    Certification (``invact.fitting.scheme.power64``) computes the same. Other dtypes: ``a ** exponent``."""
    if a.dtype != torch.float32:
        return torch.pow(a, exponent)
    return torch.pow(a.double(), exponent).float()


def where(cond: torch.Tensor, a: torch.Tensor | float | int, b: torch.Tensor | float | int) -> torch.Tensor:
    """``torch.where(cond, a, b)``, bit for bit (the same dtype promotion, NaN payloads and signed
    zeros). Eager CPU code selects bits: ``b ^ ((a ^ b) & -cond)`` in the same-size integer type;
    compiled code (Inductor vectorises torch.where), other devices and dtypes call torch.where."""
    tensors = [t for t in (a, b) if isinstance(t, torch.Tensor)]
    if not tensors or cond.device.type != "cpu" or torch.compiler.is_compiling():
        return torch.where(cond, a, b)
    dtype = torch.result_type(a, b)
    bits = _SAME_SIZE_INT.get(dtype)
    if bits is None or any(t.device.type != "cpu" for t in tensors):
        return torch.where(cond, a, b)
    a_bits = torch.as_tensor(a, dtype=dtype).view(bits)
    b_bits = torch.as_tensor(b, dtype=dtype).view(bits)
    diff, mask = a_bits ^ b_bits, cond.to(bits).neg_()
    if mask.shape != torch.broadcast_shapes(mask.shape, diff.shape):
        return (b_bits ^ (diff & mask)).view(dtype)
    return mask.bitwise_and_(diff).bitwise_xor_(b_bits).view(dtype)  # in place: two temporaries in all
