"""Bit-level helpers: packing small integer codes into bytes, and comparison thresholds per dtype.

Planar layout: ``numel`` codes of ``bits`` bits (1, 2, 4 or 8) fill ``B = ceil(numel / per)`` bytes,
``per = 8 // bits``. Element ``i`` lives in byte ``i % B`` at bit offset ``(i // B) * bits``: plane
``j`` (elements ``j*B .. (j+1)*B - 1``) is the ``j``-th bit field of every byte. Packing and unpacking
then read and write whole contiguous planes, which vectorises (compiled CPU code) and coalesces
(Triton); the unused tail of the last plane is zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

__all__ = ["BITS", "packed_bytes", "bit_position", "pack", "unpack", "plane_chunks", "threshold",
           "denormals_flushed"]

BITS = (1, 2, 4, 8)


def _check_bits(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    return 8 // bits


def packed_bytes(numel: int, bits: int) -> int:
    """Number of bytes B holding ``numel`` codes of ``bits`` bits (works for SymInts too)."""
    per = _check_bits(bits)
    return (numel + per - 1) // per


def bit_position(index: int, bits: int, numel: int) -> tuple[int, int]:
    """(byte, bit shift) of element ``index`` of ``numel``; plain integers, exact past 2**31."""
    nbytes = packed_bytes(numel, bits)
    return index % nbytes, (index // nbytes) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (any shape, read in row-major order, values < 2**bits) into uint8 bytes.

    Compiled, arithmetic is int32 and bytes are formed once at the end: compiled CPU code converting masks
    to uint8 vectors per element is ~100x slower than int32 lanes (measured on 2**22 elements). Eager, it
    is bytes throughout, planes or-ed in one at a time: ~1 byte an element of temporaries, where int32
    planes, their padded copy and their shifted copy took 12.
    """
    per = _check_bits(bits)
    nbytes = packed_bytes(codes.numel(), bits)
    if not torch.compiler.is_compiling():
        flat = codes.new_zeros(per * nbytes, dtype=torch.uint8)
        flat[:codes.numel()] = codes.reshape(-1)
        planes = flat.view(per, nbytes)
        if per == 1:
            return planes[0]
        out = planes[0].clone()
        for j in range(1, per):
            out |= planes[j] << (j * bits)
        return out
    flat = codes.reshape(-1).to(torch.int32)
    pad = per * nbytes - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    planes = flat.view(per, nbytes)
    if per == 1:
        return planes[0].to(torch.uint8)
    out = planes[0]
    for j in range(1, per):  # compiled: unrolled, one fused vectorised loop over contiguous planes
        out = out | (planes[j] << (j * bits))
    return out.to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The ``numel`` codes of ``packed`` as a flat int32 tensor."""
    per = _check_bits(bits)
    wide = packed.to(torch.int32)
    if per == 1:
        return wide[:numel]
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=packed.device).unsqueeze(1)
    return ((wide.unsqueeze(0) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:numel]


def plane_chunks(numel: int, bits: int, size: int) -> Iterator[tuple[int, int, int, int]]:
    """(start, stop, first byte, shift) of element ranges of at most ``size`` within one plane.

    The codes of elements ``start .. stop - 1`` are
    ``(packed[first : first + stop - start] >> shift) & (2**bits - 1)``. With ``bits == 0`` (no
    code) the whole range is one plane and ``first`` and ``shift`` are 0. No elements: no chunks
    (whatever ``size``; the compiled backward asks for chunks of ``numel`` elements).
    """
    if numel <= 0:
        return
    if size < 1:
        raise ValueError(f"size must be a positive number of elements, got {size!r}")
    if bits == 0:
        yield from ((a, min(a + size, numel), 0, 0) for a in range(0, numel, size))
        return
    nbytes = packed_bytes(numel, bits)
    for plane in range(math.ceil(numel / nbytes) if nbytes else 0):
        for start in range(plane * nbytes, min((plane + 1) * nbytes, numel), size):
            stop = min(start + size, (plane + 1) * nbytes, numel)
            yield start, stop, start - plane * nbytes, plane * bits


# ----------------------------------------------------------------------------------------------
# thresholds: `x > b` / `x >= b` for a real b, as the same comparison with t representable in x's dtype

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def threshold(value: float, side: str, dtype: torch.dtype) -> float:
    """The ``t`` of ``dtype`` that stands for the real break ``value`` in the break test on ``x`` of ``dtype``.

    ``side == "left"`` (x == value belongs to the left) tests ``x > value``, as ``x > t`` with t the
    largest ``dtype`` value <= ``value``; ``"right"`` tests ``x >= value``, as ``x >= t`` with t the
    smallest one >= ``value`` (docs/table-format.md). Rounding ``value`` to nearest would move the
    break. ``t`` is never a subnormal number (of the float32 or float64 arithmetic that compares it):
    with denormals flushed (``torch.set_flush_denormal(True)``) a comparison reads a subnormal as 0,
    so the break itself is compared, strictly where it belongs to the left: ``y > 0``, never
    ``y >= 1.4e-45``. ``-0.0`` is returned as ``+0.0``. ValueError for a break inside the subnormal range.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if dtype not in _FLOATS:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    if math.isinf(value):
        return value
    tiny = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny
    if value != 0 and abs(value) < tiny:  # 0 < |value| < tiny: t would be subnormal or move the break
        raise ValueError(f"a break at {value!r} lies in the subnormal range of the comparison "
                         f"(|value| < {tiny!r}): it cannot be compared with denormals flushed")
    t = torch.tensor(value, dtype=torch.float64).to(dtype)
    if side == "left" and t.item() > value:
        t = torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype))
    elif side == "right" and t.item() < value:
        t = torch.nextafter(t, torch.tensor(math.inf, dtype=dtype))
    return t.item() + 0.0


_SMALLEST_SUBNORMAL = 5e-324  # float64; a variable, so that the comparison below runs when called


def denormals_flushed() -> bool:
    """Whether this thread's CPU arithmetic reads subnormal numbers as 0 (``torch.set_flush_denormal(True)``
    sets one flag for float32 and float64, which Python's own float comparison obeys too)."""
    return not _SMALLEST_SUBNORMAL > 0.0
