"""The segment index by binary search over slots, shared by the AVX-512 kernel (csrc/cpu_kernels.c,
``invact.cpu_kernel``) and the Triton kernels (``invact.act_triton.search``); the fitter's code
generator asks :func:`levels` whether a table gets a searching Triton ``g_search``.

Each code class of n segments owns 2^levels >= n slots, levels being the same for every class
(:func:`levels`). Level l adds step = 2^(levels - 1 - l) to slot s where y >= the class's threshold
s - first + step - 1 (as the float32 y passing it: :func:`passed_from`; padding NaN, never passed).
An element starts at its class's first slot; the slots index POLY rows (:attr:`SearchLayout.row_of_slot`).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

__all__ = ["MAX_SLOTS", "MAX_LEVELS", "BY_CODE", "SearchLayout", "levels", "float_after", "passed_from", "passed_from_each",
           "search_layout"]

MAX_SLOTS = 32        # classes x 2^levels: a two-register permute in the AVX-512 kernel
MAX_LEVELS = 5
BY_CODE = 32          # slot_of_code: codes 0..15, then one entry for codes past 15
FLOAT32_TINY = 2.0 ** -126  # the smallest normal float32


@dataclass(frozen=True)
class SearchLayout:
    """``levels`` of search; ``slot_of_code``: each class's first slot by code (entry 16: codes past
    15); ``level_thr``: each level's thresholds by slot (MAX_SLOTS each); ``row_of_slot``: the POLY
    row of each slot (MAX_SLOTS)."""

    levels: int
    slot_of_code: list[int]
    level_thr: list[list[float]]
    row_of_slot: list[int]


def levels(counts: list[int]) -> int | None:
    """Levels of search for classes of ``counts`` segments, or None where their slots would not fit
    (more than MAX_SLOTS) or there is no class."""
    if not counts:
        return None
    n = max(max(counts) - 1, 0).bit_length()
    return n if n <= MAX_LEVELS and len(counts) << n <= MAX_SLOTS else None


def float_after(v: float) -> float:
    """The least float32 above float32 ``v`` (the same after -0 as after +0; NaN after +inf). The
    greatest below v is ``-float_after(-v)``."""
    if v == math.inf:
        return math.nan
    bits = struct.unpack("<i", struct.pack("<f", v + 0.0))[0]  # v + 0: the float after -0 is after +0
    bits += 1 if bits >= 0 else -1
    return struct.unpack("<f", struct.pack("<i", bits if bits != -(2**31) else 0))[0]


def passed_from(v: float, strict: bool) -> float:
    """The least float32 y that passes threshold ``v`` (float32): v, or where ``y > v`` the float after
    v (NaN after +inf: never passed)."""
    return float_after(v) if strict else v


def passed_from_each(thresholds: tuple[float, ...], strict: tuple[bool, ...]) -> list[float]:
    return [passed_from(v, s) for v, s in zip(thresholds, strict, strict=True)]


def _ascending(values: list[float]) -> bool:
    """Whether ``values`` ascend, a NaN (never passed: after a strict +inf) only after every number:
    then the search passes, level by level, the thresholds that the count passes."""
    numbers = [v for v in values if v == v]
    return values[:len(numbers)] == numbers and numbers == sorted(numbers)


def search_layout(classes: tuple, thresholds: tuple[float, ...], strict: tuple[bool, ...]) -> SearchLayout | None:
    """The search of ``classes`` ((code, first row, segments, first threshold) each) over float32
    ``thresholds`` (passed where ``y > t`` if ``strict`` else ``y >= t``), or None where it does not
    apply and the kernels count thresholds instead: a class code past 15, slots that do not fit
    (:func:`levels`), a NaN threshold, a subnormal one or a strict one at zero (a compare with
    denormals flushed reads a subnormal as 0), or thresholds out of order (a strict +inf, passed by
    no y, before another). Codes of no class (and past 15) take the
    first class, as the count's selection does."""
    n = levels([count for _, _, count, _ in classes])
    if (n is None or any(not 0 <= code < 16 for code, *_ in classes) or any(v != v for v in thresholds)
            or any(v != 0 and abs(v) < FLOAT32_TINY for v in thresholds)
            or any(s and v == 0 for v, s in zip(thresholds, strict, strict=True))):
        return None
    slots = 1 << n
    passed = passed_from_each(thresholds, strict)
    level_thr, row_of_slot = [[math.nan] * MAX_SLOTS for _ in range(n)], [0] * MAX_SLOTS
    for c, (_, first, count, first_thr) in enumerate(classes):
        own = passed[first_thr:first_thr + count - 1]
        if not _ascending(own):
            return None
        own += [math.nan] * (2 * slots - len(own))  # level l reads up to slot k + 2^(levels-1-l) - 1
        for k in range(slots):
            row_of_slot[c * slots + k] = first + min(k, count - 1)
            for l in range(n):
                level_thr[l][c * slots + k] = own[k + (1 << (n - 1 - l)) - 1]
    class_of = [0] * BY_CODE  # the last class whose code matches, the first where none does
    for c, (code, *_) in enumerate(classes):
        class_of[code] = c
    return SearchLayout(n, [c * slots for c in class_of], level_thr, row_of_slot)
