"""Per-element table rows by selection instead of gathering: the compiled CPU path of the backward.

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

__all__ = ["columns"]

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
