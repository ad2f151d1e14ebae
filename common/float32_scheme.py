"""Constants of the float32 evaluation scheme (docs/table-format.md) that the fitter and the runtime share.

The fitter emulates the scheme to certify a table and prints these numbers into generated Triton
code; the runtime evaluates it (``invact.fastmath``, the C kernels of ``invact.cpu_kernel``, the
Triton kernels of ``invact.act_triton``). One definition here keeps them the same numbers.
"""

from __future__ import annotations

__all__ = ["SQRT2_F32", "LOG_POLY", "LN2_HI", "LN2_LO", "TINY32", "ROW_TID", "ROW_CENTER", "ROW_SCALE",
           "ROW_C0", "ROW_C0_LO", "ROW_C1", "row_length", "ROOT_STEPS", "ROOT_ORDERS", "root_seed",
           "root_steps"]

# The float32 log (Cephes logf, from the float's bits; within about one float32 ulp): mantissas at or
# above float32(sqrt(2)) are halved, then log(1 + f) = f - f^2 / 2 + f^3 P(f), plus e * ln 2 in two parts.
SQRT2_F32 = 1.4142135381698608
LOG_POLY = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
            -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4
TINY32 = 1.1754943508222875e-38  # smallest normal float32: the log transform's floor

# A POLY row (one per segment): transform id, center, scale, c0_hi, c0_lo, c1 .. c_degree, then the
# denominator's d1 .. d_den of rational segments (zeros on polynomial rows, so their Q is exactly 1).
ROW_TID, ROW_CENTER, ROW_SCALE, ROW_C0 = 0, 1, 2, 3
ROW_C0_LO = ROW_C0 + 1
ROW_C1 = ROW_C0 + 2


def row_length(degree: int, den_degree: int = 0) -> int:
    """Length of a POLY row of a table whose polynomials have ``degree`` and denominators ``den_degree``."""
    return ROW_C1 + degree + den_degree

# The power-tail primitive a^(k/n) (k = -1 or n - 1; docs/table-format.md, power_tail): a float32 seed
# from a's bits (bits // n + root_seed(n)), ROOT_STEPS Newton steps r += (a / r^(n-1) - r) * (1/n) in
# float64, then r^k (1 / r, or r times itself) in float64, rounded once to float32.
ROOT_STEPS = 6
ROOT_ORDERS = (2, 3, 4, 5, 6, 7, 8)   # the growth orders n a power tail may have


def root_seed(n: int) -> int:
    """The integer added to a float32's bits // n for a seed of a^(1/n) (within ~10 %)."""
    return (127 * (n - 1) << 23) // n


def root_steps(r, a, n: int, k: int):
    """r^k after ROOT_STEPS Newton steps on r^n = a from the seed r: float64 arrays or tensors (numpy's
    in the fitter's emulation, torch's in invact.fastmath), with these operations only, in this order."""
    inv = 1.0 / n
    for _ in range(ROOT_STEPS):
        p = r
        for _ in range(n - 2):
            p = p * r
        r = r + (a / p - r) * inv
    if k == -1:
        return 1.0 / r
    out = r
    for _ in range(k - 1):
        out = out * r
    return out
