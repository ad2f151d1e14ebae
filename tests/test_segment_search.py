"""The polynomial kernels' segment index by binary search (invact.cpu_kernel.search_layout) against the
count of thresholds passed, computed in torch.

Hand-made tables of constant segments (scale 0: g is the segment's c0_hi, here its number + 1), with
random classes, codes, thresholds (duplicates, signed zeros, both kinds of compare) and y at every
threshold and its float32 neighbours, at signed zeros, subnormals and the largest floats. Both
layouts of the same table (search and count) must give the segment that `y >= t` / `y > t` select,
exactly: the index is a choice, not an approximation, so there is no tolerance.
"""

import contextlib
import math
import random

import pytest
import torch

from invact import bitpack, cpu_kernel, fastmath, u_clamp
from kernel_rows import POLY_ISAS, around, random_classes, row_of, search_probes
from tolerances import flushed_denormals

def _want(classes, thresholds, strict, y: torch.Tensor, codes: torch.Tensor, flushed: bool) -> torch.Tensor:
    """The segment's number + 1 (kernel_rows.row_of), NaN for NaN y."""
    row = row_of(classes, thresholds, strict, y, codes, flushed)
    return torch.where(y.isnan(), y, (row + 1).to(y.dtype))


def _run(table, y: torch.Tensor, codes: torch.Tensor, bits: int, isa: str) -> torch.Tensor:
    out = torch.empty_like(y)
    assert cpu_kernel.run(table, out, torch.ones_like(y), y, bitpack.pack(codes, bits), bits, isa=isa)
    return out


@pytest.mark.parametrize("isa", POLY_ISAS)
@pytest.mark.parametrize("flushed", [False, True])
@pytest.mark.parametrize("shape", [(1, 32), (2, 16), (3, 8), (4, 8), (5, 4), (8, 4), (16, 2), (2, 2)])
def test_search_selects_the_counted_segment(shape, flushed, isa):
    n_classes, most = shape
    if flushed and not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals (no SSE3)")
    rng = random.Random(f"{shape}{flushed}")
    searched, widths = 0, set()
    for trial in range(12):
        drawn, thresholds, strict, rows = random_classes(rng, n_classes, most)
        transforms = (("identity", 1.0, ()),)
        y = search_probes(thresholds)
        for bits in (1, 2, 4, 8):  # 1: codes as masks; 8: codes past 15, which no class has
            classes = tuple((code % (1 << bits), *rest) for code, *rest in drawn)
            codes = torch.randint(0, 1 << bits, y.shape, generator=torch.Generator().manual_seed(trial))
            codes[: len(classes)] = torch.tensor([code for code, *_ in classes])
            want = _want(classes, thresholds, strict, y, codes, flushed)
            for search in (True, False):
                table = cpu_kernel.table_of(classes, transforms, rows, thresholds, strict, search=search)
                searched += table.search_levels > 0
                indices = (max(table.slot_of_code) + (1 << table.search_levels) if table.search_levels
                           else len(rows))
                widths.add(indices > 16)  # the kernel's permutes: one register up to 16, two past it
                with flushed_denormals() if flushed else contextlib.nullcontext():
                    got = _run(table, y, codes, bits, isa)
                assert torch.equal(got.isnan(), want.isnan()), (trial, search)
                bad = (got != want) & ~want.isnan()
                assert not bad.any(), (trial, bits, search, y[bad], codes[bad], got[bad], want[bad])
    assert searched >= 8  # the search layout was taken, not only the count
    assert (n_classes * most > 16) in widths, widths  # wide shapes ran the two-register permute, (2, 2) the other

def test_search_layout_declines_what_it_cannot_order():
    """Subnormal thresholds (read as 0 with denormals flushed), strict ones at zero (`y >= ` the float
    after 0, a subnormal, would read it as 0), a strict threshold followed by an equal `>=` one (out of
    order), more than 32 slots and class codes past 15: the count instead."""
    one = ((0, 0, 3, 0),)
    assert cpu_kernel.search_layout(one, (0.0, 1.0), (False, True)) is not None
    assert cpu_kernel.search_layout(one, (0.0, 1.0), (True, True)) is None
    assert cpu_kernel.search_layout(one, (-0.0, 1.0), (True, True)) is None
    assert cpu_kernel.search_layout(one, (1e-40, 1.0), (False, False)) is None
    assert cpu_kernel.search_layout(one, (1.0, 1.0), (True, False)) is None
    assert cpu_kernel.search_layout(one, (1.0, 1.0), (False, True)) is not None
    three = tuple((c, 9 * c, 9, 8 * c) for c in range(3))   # 3 classes x 16 slots
    assert cpu_kernel.search_layout(three, tuple(float(j) for j in range(8)) * 3, (False,) * 24) is None
    assert cpu_kernel.search_layout(((16, 0, 2, 0),), (0.0,), (False,)) is None
    assert cpu_kernel.search_layout((), (), ()) is None
    # NaN thresholds, and a strict +inf (passed by no y) before another, would let the search skip
    # thresholds the count passes
    inf = math.inf
    assert cpu_kernel.search_layout(((0, 0, 4, 0),), (1.0, math.nan, 3.0), (False,) * 3) is None
    assert cpu_kernel.search_layout(((0, 0, 3, 0),), (inf, inf), (True, False)) is None
    assert cpu_kernel.search_layout(((0, 0, 4, 0),), (1.0, 3.0, inf), (False, False, True)) is not None


@pytest.mark.parametrize("isa", POLY_ISAS)
@pytest.mark.parametrize("kind, sign", [("identity", 1.0), ("sqrt", 1.0), ("sqrt", -1.0), ("log", 1.0), ("log", -1.0)])
def test_nan_y_gives_nan_through_every_transform(kind, sign, isa):
    """NaN y: g is NaN through every transform. The kernel sets g = y only where a step could lose the
    NaN (the log transform's exponent arithmetic makes it finite) or flip its sign (a negative sign);
    elsewhere every step returns its NaN operand. Finite y in the same vectors stay finite."""
    classes = ((0, 0, 2, 0), (1, 2, 2, 1))
    transforms = (("identity", 1.0, ()), (kind, sign, (0.5, 1e-9)))
    rows = [[1.0, 0.25, 0.5, 1.0, 0.0, 0.75] for s in range(4)]  # g = 0.75 u + 1, u in [-1, 1]; every row
    # transform 1: a NaN y's row is a choice of the kernel (the AVX2 one's compares put it first)
    nan_bits = torch.tensor([0x7FC00000, -0x400000, 0x7FC00001, 0x7F800001], dtype=torch.int32)
    nan = nan_bits.view(torch.float32)  # quiet, negative, payload, signalling
    y = torch.cat([nan, torch.tensor([-2.0, 0.1, 0.7, 3.0])]).repeat(9)
    for bits in (1, 2):
        codes = torch.arange(y.numel()) % 2
        for search in (True, False):
            table = cpu_kernel.table_of(classes, transforms, rows, (0.5, 1.5), (False, True), search=search)
            got = _run(table, y, codes, bits, isa)
            assert torch.equal(got.isnan(), y.isnan()), (bits, search, got)
            signs = got[y.isnan()].view(torch.int32) < 0
            assert torch.equal(signs, y[y.isnan()].view(torch.int32) < 0)  # g * 1 keeps y's sign


@pytest.mark.parametrize("isa", POLY_ISAS)
@pytest.mark.parametrize("origin", [(0.5, 1e-9), ()])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_log_transform_is_fastmath_log(sign, origin, isa):
    """The log transform's t: invact.fastmath.log (the generated torch code's, operation for operation)
    of max(sign * ((y - o0) - o1), tiny), through a row g = u = t / 128 (a power of two: exact), at y
    across the exponent range of both signs, near the origin (the floor tiny), at the mantissa
    where fastmath.log halves it (sqrt(2)) and NaN."""
    rows = [[0.0, 0.0, 2.0 ** -7, 0.0, 0.0, 1.0]] * 2
    table = cpu_kernel.table_of(((0, 0, 2, 0),), (("log", sign, origin),), rows, (1e30,), (False,))
    g = torch.Generator().manual_seed(int(sign))
    y = torch.cat([torch.exp2(torch.rand(4000, generator=g) * 250 - 125) * (torch.randint(0, 2, (4000,), generator=g) * 2 - 1),
                   around([0.5, 0.5 + 1e-9, 0.0, 1.0] + [sign * fastmath.SQRT2_F32 * 2.0 ** k for k in range(-3, 4)],
                          [math.nan, math.inf, -math.inf, 3e38, -3e38])])
    d = y
    for part in origin:
        d = d - torch.tensor(part, dtype=torch.float32)
    d = (d if sign > 0 else -d).clamp_min(torch.finfo(torch.float32).tiny)
    want = torch.where(y.isnan(), y, fastmath.log(d) * 2.0 ** -7)  # fastmath.log leaves NaN to its callers
    got = _run(table, y, torch.zeros(y.shape, dtype=torch.int64), 1, isa)
    assert torch.equal(got.isnan(), want.isnan()), (y[got.isnan() != want.isnan()], got[got.isnan() != want.isnan()])
    bad = (got != want) & ~want.isnan()
    assert not bad.any(), (y[bad], got[bad], want[bad])


@pytest.mark.parametrize("isa", POLY_ISAS)
@pytest.mark.parametrize("flushed", [False, True])
@pytest.mark.parametrize("transforms", [
    (("identity", 1.0, ()), ("sqrt", 1.0, (0.5, 0.0, 1e-9))),             # the straight-line pair
    (("sqrt", -1.0, (0.0, -0.0, 1e-40)), ("identity", 1.0, ())),          # its other order, a -0 part
    (("identity", 1.0, ()), ("sqrt", 1.0, (0.5, 1e-9)), ("sqrt", -1.0, (-0.0,))),  # the general loop
], ids=["pair", "pair reversed", "three"])
def test_transforms_step_for_step(transforms, flushed, isa):
    """t of each row's transform as the scheme computes it (invact.u_clamp's exact float32 steps):
    origin parts subtracted in order, zero parts (+0 or -0) and the sign included, then sqrt of at
    least 0; every part is subtracted, where the kernel used to skip zero ones, so a zero part must
    change no value, subnormal parts and y with denormals flushed included. Rows g = u = t / 128,
    clamped to [-1, 1] as every row's u is (t up to 128 is seen whole)."""
    if flushed and not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals (no SSE3)")
    n = len(transforms)
    thresholds = (-1.0, 0.25, 2.0)
    classes = ((0, 0, 4, 0),)
    rows = [[float(r % n), 0.0, 2.0 ** -7, 0.0, 0.0, 1.0] for r in range(4)]  # g = 1 * u + 0 + 0
    y = around([-1.0, -1e-40, -0.0, 0.0, 1e-40, 1e-9, 0.25, 0.5, 2.0, 3.0],
               [math.inf, -math.inf, math.nan, 1e30, -1e30, 0.49999997, 0.50000006])
    codes = torch.zeros(y.shape, dtype=torch.int64)
    row = row_of(classes, thresholds, (False,) * 3, y, codes, flushed)
    want = torch.tensor([u_clamp._u(float(v), rows[r], transforms[int(rows[r][0])], flushed)
                         for v, r in zip(y.tolist(), row.tolist())], dtype=torch.float32).clamp(-1.0, 1.0)
    if flushed:  # g = u + 0: a subnormal u reads as 0
        want = torch.where(want.abs() < torch.finfo(torch.float32).tiny, torch.zeros_like(want), want)
    for search in (True, False):
        table = cpu_kernel.table_of(classes, transforms, rows, thresholds, (False,) * 3, search=search)
        with flushed_denormals() if flushed else contextlib.nullcontext():
            got = _run(table, y, codes, 1, isa)
        assert torch.equal(got.isnan(), want.isnan()), (search, y[got.isnan() != want.isnan()])
        bad = (got != want) & ~want.isnan()
        assert not bad.any(), (search, y[bad], got[bad], want[bad])
