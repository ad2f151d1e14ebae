"""Per-element table rows by selection instead of gathering: the compiled CPU path of the backward
(:func:`columns`), and the eager code's segment count (:func:`passed`).

Inductor's CPU code turns a per-element gather (``poly[:, s]``) into a scalar loop per lane and per
coefficient (measured: eleven such gathers cost ~3x a native GELU backward on 2^24 fp32 elements),
while ``torch.where`` with a constant is one vector blend. So, for each column of the POLY table, the
value of each element's segment is selected by a chain of blends on the threshold masks
(``y > thr[j]`` or ``y >= thr[j]``, by the break's side), one chain per code class and one blend per extra class. Columns whose value is the
same in every segment stay Python floats (no work at all).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["columns", "passed", "COUNTED_FROM"]

Value = torch.Tensor | float


def _chain(values: Sequence[float], masks: Sequence[torch.Tensor]) -> Value:
    """values[k] where exactly the first k masks hold (masks nested: mask j implies mask j-1)."""
    out: Value = values[0]
    for last, value, mask in zip(values, values[1:], masks):
        if value != last:  # masks are nested: an equal neighbour needs no blend
            out = torch.where(mask, value, out)
    return out


def _blend(mask: torch.Tensor, a: Value, b: Value) -> Value:
    if isinstance(a, float) and isinstance(b, float) and a == b:
        return a
    return torch.where(mask, a, b)


def columns(rows: Sequence[Sequence[float]], classes: Sequence[tuple[int, int, int, int]],
            y: torch.Tensor, thr: Sequence[float], code: torch.Tensor | None,
            strict: Sequence[bool]) -> list[Value]:
    """Column j of each element's row of ``rows`` (one row per global segment), for every j.

    ``classes``: (code, first segment, number of segments, first threshold) per code class, the
    first one being the default where ``code`` matches no other class (or ``code`` is None).
    ``strict[j]``: threshold j is passed where ``y > thr[j]``, else where ``y >= thr[j]``.
    """
    if len(strict) != len(thr):
        raise ValueError(f"strict must have one flag per threshold ({len(thr)}), got {len(strict)}")
    masks = [y > t if s else y >= t for t, s in zip(thr, strict)]
    out: list[Value] = []
    for j in range(len(rows[0])):
        value: Value | None = None
        for code_value, first, count, first_thr in classes:
            chain = _chain([float(rows[first + k][j]) for k in range(count)],
                           masks[first_thr:first_thr + count - 1])
            value = chain if value is None else _blend(code == code_value, chain, value)
        out.append(value)
    return out


COUNTED_FROM = 1 << 13  # elements: from here counting compares beat aten.bucketize's search (7 thresholds:
                        # 4096 elements 64 against 50 µs, 8192 73 against 106 µs; one thread, Intel Xeon)


def passed(y: torch.Tensor, thr: torch.Tensor | Sequence[float], right: bool) -> torch.Tensor:
    """``torch.bucketize(y, thr, out_int32=True, right=right)`` for sorted ``thr``, bit for bit: how many
    thresholds each y passes (``y >= t`` where ``right``, else ``y > t``; NaN passes every one), as
    ``len(thr)`` minus a sum of vectorised compares that y does not pass. The eager code's segment
    index: aten.bucketize is a scalar binary search per element (7 thresholds, 2^16 float32: 1.15 ms
    on an Intel Xeon, the compares 0.29 ms). Fewer than :data:`COUNTED_FROM` elements search too (the
    compares' fixed cost, ~8 µs a threshold there, is more than the search's work), as do other devices
    (reading ``thr`` here would wait for the device). ``thr`` may be the floats the compiled backend
    passes (its compile-time constants), where its code runs eagerly after a failed compile."""
    if not isinstance(thr, torch.Tensor):
        thr = torch.tensor(thr, dtype=y.dtype, device=y.device)
    if y.device.type != "cpu" or thr.device.type != "cpu" or y.numel() < COUNTED_FROM:
        return torch.bucketize(y, thr, out_int32=True, right=right)
    values = thr.tolist()
    if not values:
        return torch.zeros(y.shape, dtype=torch.int32, device=y.device)
    fails = torch.lt if right else torch.le  # NaN fails no compare: it passes every threshold
    count = torch.empty(y.shape, dtype=torch.float32, device=y.device)  # float outputs: compares to
    fails(y, values[0], out=count)                                       # bool measured 4x slower
    if len(values) > 1:
        step = torch.empty_like(count)
        for t in values[1:]:
            count += fails(y, t, out=step)
    return torch.rsub(count, float(len(values))).to(torch.int32)
