"""The Triton float32 scheme's segment index by binary search over slots (act_triton.search, the
generated g_search, impl_triton.search_tables) against the count of thresholds (g_y), and u's clamp
left out where invact.u_clamp proves it changes nothing (impl_triton.clamps), in Triton's interpreter.

The index is a choice, not an approximation: the slot found must hold the row the count selects for
every y (at and beside every threshold, zeros, subnormals, infinities) and code, and g_search must give
g_y's bits. Random tables as tests/test_segment_search.py's for the AVX-512 kernel's search, which
shares the layout (invact.common.slots).
"""

import contextlib
import random

import pytest
import torch

from invact import ops, registry
from invact.common import slots

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from invact import act_triton  # noqa: E402 - after triton: it defines kernels
from kernel_rows import POOL, random_classes, row_of, search_probes, table_edges
from tolerances import flushed_denormals
from triton_tolerances import needs_interpreter

pytestmark = needs_interpreter
NONZERO = [v for v in POOL if v != 0]
SEARCHED = [n for n in ops.names() if registry.triton_module(n).SEARCH_LEVELS]


@triton.jit
def _slot_of(Y, CODE, SOC, LT, OUT, n, LEVELS: tl.constexpr, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    """act_triton.search's slot of each y, from its class's first slot by code (the layout's
    slot_of_code: codes past 15 read entry 16)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    y = tl.load(Y + offs, mask=live, other=0.0)
    s = tl.load(SOC + tl.minimum(tl.load(CODE + offs, mask=live, other=0), 16), mask=live, other=0)
    tl.store(OUT + offs, act_triton.search(y, s, LT, LEVELS, WIDTH), mask=live)


@pytest.mark.parametrize("flushed", [False, True])
@pytest.mark.parametrize("shape", [(1, 32), (2, 16), (3, 8), (4, 8), (8, 4), (16, 2)])
def test_search_finds_the_counted_row(shape, flushed):
    """Every y but NaN (whose g the kernels replace by y) lands on the row the count selects; with
    denormals flushed too (the interpreter's numpy compares read a subnormal y as 0 then, as the
    count does: the layout declines the thresholds that would differ)."""
    if flushed and not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals (no SSE3)")
    n_classes, most = shape
    rng, searched = random.Random(f"triton{shape}{flushed}"), 0
    for trial in range(8):  # odd trials without zeros, which the layout declines where strict
        drawn, thresholds, strict, _ = random_classes(rng, n_classes, most, POOL if trial % 2 else NONZERO)
        y = search_probes(thresholds)
        for bits in (1, 4, 8):  # 8: codes past 15, which no class has
            classes = tuple((code % (1 << bits), *rest) for code, *rest in drawn)
            layout = slots.search_layout(classes, thresholds, strict)
            if layout is None:
                continue
            searched += 1
            codes = torch.randint(0, 1 << bits, y.shape, generator=torch.Generator().manual_seed(trial))
            codes[: len(classes)] = torch.tensor([code for code, *_ in classes])
            width = len(classes) << layout.levels
            lt = torch.tensor([v for level in layout.level_thr for v in level[:width]], dtype=torch.float32)
            got = torch.empty(y.shape, dtype=torch.int32)
            with flushed_denormals() if flushed else contextlib.nullcontext():
                _slot_of[(1,)](y, codes.to(torch.int32), torch.tensor(layout.slot_of_code, dtype=torch.int32), lt, got,
                             y.numel(), layout.levels, width, 1 << (y.numel() - 1).bit_length())
            rows = torch.tensor(layout.row_of_slot)[got.long()]
            want = row_of(classes, thresholds, strict, y, codes, flushed)
            bad = (rows != want) & ~y.isnan()
            assert not bad.any(), (trial, bits, y[bad], codes[bad], rows[bad], want[bad])
    assert searched >= 6  # layouts were found, not all declined


def _g(name: str, y: torch.Tensor, code: torch.Tensor, by_search: bool, clamp: int = 3) -> torch.Tensor:
    """g(y, code) by the table's Triton backward (grad 1), searching or counting, u clamped on the
    sides ``clamp`` (act_triton.row)."""
    from invact import bitpack, impl_triton
    mod, tmod = registry.module(name), registry.triton_module(name)
    k = ops.table_constants(name, torch.float32, "cpu")
    tables = impl_triton.search_tables(mod, tmod.SEARCH_LEVELS, torch.device("cpu"), ()) if by_search else None
    assert (tables is not None) == by_search, name
    out = torch.empty_like(y)
    packed = bitpack.pack(code, mod.CODE_BITS)
    ythr, poly = tables if by_search else (k.y_thresholds, k.poly)
    tmod.backward(torch.ones_like(y), y, packed, out, ythr, poly, [], by_search=by_search, clamp=clamp)
    return out


@pytest.mark.skipif(not SEARCHED, reason="no generated table searches")
@pytest.mark.parametrize("name", SEARCHED)
def test_g_search_is_g_y_bit_for_bit(name):
    """The generated g_search against g_y at and beside every y threshold, at zeros, subnormals,
    infinities, NaN and a spread of y, for every code."""
    y, bits = _probes(name), registry.module(name).CODE_BITS
    for code in range(1 << bits):
        codes = torch.full(y.shape, code, dtype=torch.int64)
        a, b = _g(name, y, codes, True), _g(name, y, codes, False)
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (name, code, y[a.view(torch.int32) != b.view(torch.int32)])


def _probes(name: str) -> torch.Tensor:
    """The table's edges (kernel_rows.table_edges) and a spread of y."""
    return torch.cat([table_edges(name), torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 4])


POLY_TABLES = [n for n in ops.names() if getattr(registry.module(n), "TRANSFORMS", ())]


@pytest.mark.parametrize("name", POLY_TABLES)
def test_the_clamp_keeps_the_sides_that_change_something(name):
    """impl_triton.clamps (invact.u_clamp's proof): with only the sides it keeps, g keeps its bits at
    the extremes of every row (the y at and beside each threshold, the largest floats and
    infinities) for every code, searching or counting; leaving out a side it keeps changes some g
    (the proof is not merely cautious: gelu_tanh's and quick_gelu's rows reach past [-1, 1])."""
    from invact import impl_triton
    y, bits = _probes(name), registry.module(name).CODE_BITS
    kept = impl_triton.clamps(registry.module(name), ())
    ways = (True, False) if name in SEARCHED else (False,)
    for side in (1, 2):
        changed = False
        for code in range(1 << bits):
            codes = torch.full(y.shape, code, dtype=torch.int64)
            for by_search in ways:
                both = _g(name, y, codes, by_search, 3).view(torch.int32)
                kept_only = _g(name, y, codes, by_search, kept).view(torch.int32)
                assert torch.equal(both, kept_only), (name, code, by_search, y[both != kept_only])
                changed |= not torch.equal(both, _g(name, y, codes, by_search, 3 & ~side).view(torch.int32))
        assert changed == bool(kept & side), (name, kept, side)


def test_a_declined_layout_counts(monkeypatch):
    """Thresholds the layout declines (here: all) leave the backward to g_y, which counts them: the
    eager backend's bits still."""
    from invact import impl_triton
    name = SEARCHED[0] if SEARCHED else pytest.skip("no generated table searches")
    mod, tmod = registry.module(name), registry.triton_module(name)
    launched = []
    backward = tmod.backward
    monkeypatch.setattr(tmod, "backward", lambda *a, **kw: launched.append(kw.get("by_search", False)) or backward(*a, **kw))
    x = torch.randn(3000, generator=torch.Generator().manual_seed(2)) * 3
    y, code = torch.ops.invact.forward(x, name, [], "eager")
    grad = torch.randn(3000, generator=torch.Generator().manual_seed(3))
    want = torch.ops.invact.backward(grad, y, code, name, [], "eager")
    for declined in (False, True):
        impl_triton.search_tables.cache_clear()
        if declined:
            monkeypatch.setattr(slots, "search_layout", lambda *a: None)
        assert (impl_triton.search_tables(mod, tmod.SEARCH_LEVELS, y.device, ()) is None) == declined
        got = torch.ops.invact.backward(grad, y, code, name, [], "triton")
        assert torch.equal(got, want), (name, declined)
    impl_triton.search_tables.cache_clear()
    assert launched == [True, False]


def test_search_only_where_it_is_cheaper():
    """g_search exists where every segment is a POLY row and the search's levels cost less than
    counting the thresholds (invact.fitting.fit.search_pays, also what fit.triton_instructions
    prices); tables with many thresholds get one."""
    from invact.fitting.fit import search_pays
    for name in ops.names():
        mod, tmod = registry.module(name), registry.triton_module(name)
        levels = tmod.SEARCH_LEVELS
        thresholds = sum(count - 1 for _, _, count, _ in mod.CLASSES)
        assert hasattr(tmod, "g_search") == (levels > 0), name
        if levels:
            assert search_pays(levels, thresholds), name
            assert levels == slots.levels([count for _, _, count, _ in mod.CLASSES]), name
            assert tmod.NSLOT == len(mod.CLASSES) << levels, name
        elif thresholds >= 8 and len(mod.POLY) == sum(count for _, _, count, _ in mod.CLASSES):
            pytest.fail(f"{name}: {thresholds} thresholds and every segment a POLY row, but no g_search")


def test_by_search_without_g_search_is_refused():
    unsearched = [n for n in ops.names() if n not in SEARCHED]
    if not unsearched:
        pytest.skip("every table searches")
    tmod = registry.triton_module(unsearched[0])
    y = torch.ones(4)
    with pytest.raises(ValueError, match="by_search"):
        tmod.backward(y, y, torch.zeros(1, dtype=torch.uint8), y, y, y, [], by_search=True)
