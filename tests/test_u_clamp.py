"""The AVX-512 kernel leaves out u's clamp to [-1, 1] where no float32 y reaches a side of it
(invact.u_clamp.clamp_sides), and that changes no bit.

Hand-made tables whose rows give g = u itself (c1 = 1, every other coefficient 0), with random
thresholds, transforms (identity, sqrt with either sign and up to three origin terms) and centers
and scales, some inside their segment's range and some reaching past it. y at every threshold and its
float32 neighbours (the ends of each segment, where u is extreme), at signed zeros, subnormals, the
largest floats and infinities, with denormals as IEEE has them and flushed. The kernel's g must be
the scheme's (clamp included), computed here with torch's float32 operations, bit for bit: u is a
choice of operations, not an approximation, so there is no tolerance.
"""

import contextlib
import math
import random

import pytest
import torch

from invact import bitpack, cpu_kernel, fastmath, u_clamp
from kernel_rows import POLY_ISAS, around, row_of
from tolerances import flushed_denormals

TINY = torch.finfo(torch.float32).tiny
POOL = [-3e38, -1e10, -2.5, -1.0, -0.25, -1e-30, -0.0, 0.0, 1e-30, 0.5, 1.0, 1.5, 7.0, 1e20, 3e38]


def _t(y: float, transform) -> float:
    kind, sign, origin = transform
    if kind == "identity":
        return y
    d = (y - sum(origin)) * sign
    return math.sqrt(d) if d > 0 else 0.0


def _random_table(rng: random.Random):
    """(classes, transforms, thresholds, strict, rows): two classes of up to 6 segments. A table either
    fits (each row's center and scale map its segment's t onto [-0.999, 0.999] or [-0.5, 0.5]; a class's
    first row by a sqrt up from below its first threshold, its last by a sqrt down from above its last,
    so that t stays finite; a class of one row: scale 0) or is loose (any transform, reaching up to 4
    times past [-1, 1])."""
    fits = rng.random() < 0.5
    drawn = [sorted((rng.choice(POOL[1:-1]), rng.random() < 0.5) for _ in range(rng.randint(0, 5))) for _ in (0, 1)]
    low = min([own[0][0] for own in drawn if own] or [0.0])
    high = max([own[-1][0] for own in drawn if own] or [0.0])
    transforms = (("identity", 1.0, ()), ("sqrt", 1.0, (low - 1.0, rng.choice([0.0, 1e-9]), rng.choice([0.0, 3e-17]))),
                  ("sqrt", -1.0, (high + 1.0, 0.0, 0.0)), ("sqrt", 1.0, (0.5, 1e-9, 3e-17)))
    classes, thresholds, strict, rows = [], [], [], []
    for code, own in enumerate(drawn):
        count = len(own) + 1
        classes.append((code, len(rows), count, len(thresholds)))
        thresholds += [v for v, _ in own]
        strict += [s for _, s in own]
        ends = [-math.inf, *(v for v, _ in own), math.inf]
        for k in range(count):
            tid = rng.randrange(len(transforms))
            if fits:
                tid = 1 if k == 0 else 2 if k == count - 1 else rng.choice([0, 1, 2])
            t_lo, t_hi = sorted((_t(ends[k], transforms[tid]), _t(ends[k + 1], transforms[tid])))
            reach = rng.choice([0.5, 0.999] if fits else [0.5, 1.0, 1.001, 4.0])
            if math.isfinite(t_hi - t_lo) and t_hi > t_lo and count > 1:
                center, scale = (t_lo + t_hi) / 2, reach / ((t_hi - t_lo) / 2)
            else:
                center, scale = rng.uniform(-2.0, 2.0), 0.0 if fits else rng.choice([0.0, 0.5])
            rows.append([float(tid), center, scale, 0.0, 0.0, 1.0])
    return tuple(classes), transforms, tuple(thresholds), tuple(strict), rows


def _probes(thresholds) -> torch.Tensor:
    return around(list(thresholds) + POOL,
                  [TINY, -TINY, 1e-45, -1e-45, 1e-40, -1e-40, math.inf, -math.inf, 3.4028235e38, -3.4028235e38])


def _scheme(classes, transforms, thresholds, strict, rows, y: torch.Tensor, codes: torch.Tensor,
            flushed: bool) -> torch.Tensor:
    """g = ((1 * u) + 0) + 0 with u = clamp((t - center) * scale, -1, 1) of each y's row
    (kernel_rows.row_of), in torch."""
    row = row_of(classes, thresholds, strict, y, codes, flushed)
    out = torch.full_like(y, math.nan)
    for _, first, count, _ in classes:
        for k in range(count):
            tid, center, scale, c0, c0_lo, c1 = (torch.tensor(v, dtype=torch.float32) for v in rows[first + k])
            kind, sign, origin = transforms[int(tid)]
            t = y
            if kind == "sqrt":
                for o in origin:
                    if o != 0.0:
                        t = t - torch.tensor(o, dtype=torch.float32)
                t = fastmath.sqrt(torch.clamp_min(-t if sign < 0 else t, 0.0))  # correctly rounded
            u = torch.clamp((t - center) * scale, -1.0, 1.0)
            out = torch.where(row == first + k, (c1 * u + c0_lo) + c0, out)
    return out


def _run(table, y: torch.Tensor, codes: torch.Tensor, isa: str) -> torch.Tensor:
    out = torch.empty_like(y)
    assert cpu_kernel.run(table, out, torch.ones_like(y), y, bitpack.pack(codes, 1), 1, use_fma=False, isa=isa)
    return out


def _differs(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    nan = want.isnan()
    return (got.isnan() != nan) | (~nan & (got.view(torch.int32) != want.view(torch.int32)))


@pytest.mark.parametrize("isa", POLY_ISAS)
@pytest.mark.parametrize("flushed", [False, True])
def test_the_clamp_is_left_out_only_where_no_y_reaches_it(flushed, isa):
    if flushed and not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals (no SSE3)")
    rng = random.Random(f"u-clamp-{flushed}")
    left_out = kept = caught = 0
    for trial in range(60):
        classes, transforms, thresholds, strict, rows = _random_table(rng)
        probes = _probes(thresholds)
        y, codes = probes.repeat(2), torch.arange(2).repeat_interleave(probes.numel())  # each y in each class
        for search in (True, False):
            table = cpu_kernel.table_of(classes, transforms, rows, thresholds, strict, search=search)
            with flushed_denormals() if flushed else contextlib.nullcontext():
                want = _scheme(classes, transforms, thresholds, strict, rows, y, codes, flushed)
                got = _run(table, y, codes, isa)
                bad = _differs(got, want)
                assert not bad.any(), (trial, search, table.clamp_sides, y[bad], got[bad], want[bad])
                if table.clamp_sides:
                    kept += 1
                    table.clamp_sides = 0  # left out where a y reaches it: some g must change
                    caught += bool(_differs(_run(table, y, codes, isa), want).any())
                else:
                    left_out += 1
    assert left_out >= 10 and kept >= 10, (left_out, kept)  # both outcomes drawn
    assert caught == kept  # every table that keeps the clamp needs it for some probe


def test_clamp_sides_of_hand_made_rows():
    """One class, one row: y from -inf to +inf. The identity reaches both sides (u = +-inf); the sqrt
    from origin 0.5 gives t in [0, inf]: u = t - 0.5 reaches only above; scale 0 gives u = 0, or NaN at
    t = inf, which the clamp would leave NaN: no side."""
    one = ((0, 0, 1, 0),)
    ident, root = ("identity", 1.0, ()), ("sqrt", 1.0, (0.5,))
    assert u_clamp.clamp_sides(one, (ident,), [[0.0, 0.0, 1.0, 0.0, 0.0, 1.0]], []) == u_clamp.LOWER | u_clamp.UPPER
    assert u_clamp.clamp_sides(one, (root,), [[0.0, 0.5, 1.0, 0.0, 0.0, 1.0]], []) == u_clamp.UPPER
    assert u_clamp.clamp_sides(one, (root,), [[0.0, 0.5, -1.0, 0.0, 0.0, 1.0]], []) == u_clamp.LOWER
    assert u_clamp.clamp_sides(one, (ident,), [[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]], []) == 0
    two = ((0, 0, 2, 0),)  # y < 1: u = 0 (scale 0); y >= 1: u = 2 (sqrt(y - 1) - 0.5), above only
    rows = [[0.0, 1.0, 0.0, 0.0, 0.0, 1.0], [1.0, 0.5, 2.0, 0.0, 0.0, 1.0]]
    assert u_clamp.clamp_sides(two, (ident, ("sqrt", 1.0, (1.0,))), rows, [1.0]) == u_clamp.UPPER
    assert u_clamp.clamp_sides(two, (ident, ("log", 1.0, (1.0,))), rows, [1.0]) == u_clamp.LOWER | u_clamp.UPPER
    # a threshold no y passes (`y > inf`: NaN) ends the row before it at +inf, and no y reaches the next
    never = [[1.0, 0.5, 1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]]
    assert u_clamp.clamp_sides(two, (ident, root), never, [math.nan]) == u_clamp.UPPER
    # thresholds out of order: rows are not ranges of y, so the clamp stays
    three = ((0, 0, 3, 0),)
    flat = [[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]] * 3  # scale 0: no row reaches a side
    assert u_clamp.clamp_sides(three, (ident,), flat, [0.0, 1.0]) == 0
    assert u_clamp.clamp_sides(three, (ident,), flat, [1.0, 0.0]) == u_clamp.LOWER | u_clamp.UPPER
