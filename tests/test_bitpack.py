"""Bit packing of branch codes and break thresholds per dtype (invact.bitpack)."""

import math

import numpy as np
import pytest
import torch

from invact import bitpack

SIZES = [0, 1, 7, 8, 9, 63, 1001]


@pytest.mark.parametrize("bits", bitpack.BITS)
@pytest.mark.parametrize("n", SIZES)
def test_round_trip(bits, n):
    g = torch.Generator().manual_seed(n * 10 + bits)
    codes = torch.randint(0, 2 ** bits, (n,), dtype=torch.uint8, generator=g)
    packed = bitpack.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(n * bits / 8),)
    assert torch.equal(bitpack.unpack(packed, bits, n), codes.to(torch.int32))


@pytest.mark.parametrize("bits", bitpack.BITS)
@pytest.mark.parametrize("n", [1, 9, 19, 64])
def test_layout_matches_bit_position(bits, n):
    """Each element alone lands in the byte and bit that bit_position names (bit planes)."""
    for i in range(n):
        codes = torch.zeros(n, dtype=torch.uint8)
        codes[i] = 2 ** bits - 1
        packed = bitpack.pack(codes, bits)
        byte, shift = bitpack.bit_position(i, bits, n)
        expected = torch.zeros_like(packed)
        expected[byte] = (2 ** bits - 1) << shift
        assert torch.equal(packed, expected), (i, packed, expected)


def test_pack_reads_any_shape_in_row_major_order():
    codes = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.uint8)
    assert torch.equal(bitpack.pack(codes.t().contiguous().t(), 1), bitpack.pack(codes.reshape(-1), 1))


@pytest.mark.parametrize("bits", bitpack.BITS)
@pytest.mark.parametrize("n", [1, 8, 1001])
def test_plane_chunks_cover_every_element_once(bits, n):
    g = torch.Generator().manual_seed(n)
    codes = torch.randint(0, 2 ** bits, (n,), dtype=torch.uint8, generator=g)
    packed = bitpack.pack(codes, bits)
    seen = torch.zeros(n, dtype=torch.int64)
    for start, stop, first, shift in bitpack.plane_chunks(n, bits, 100):
        seen[start:stop] += 1
        got = (packed[first:first + stop - start] >> shift) & (2 ** bits - 1)
        assert torch.equal(got, codes[start:stop])
    assert torch.equal(seen, torch.ones_like(seen))


@pytest.mark.parametrize("bits", bitpack.BITS)
@pytest.mark.parametrize("numel", [2**31 + 3, 2**33 + 5, 3 * 2**40 + 7])
def test_index_arithmetic_past_2_31(bits, numel):
    """Positions in huge tensors (no allocation): exact integers, a bijection onto (byte, field)."""
    per = 8 // bits
    nbytes = bitpack.packed_bytes(numel, bits)
    assert nbytes == -(-numel // per) and nbytes * per >= numel > (nbytes - 1) * per
    for index in (0, 2**31 - 1, 2**31, numel // 2, numel - 1):
        byte, shift = bitpack.bit_position(index, bits, numel)
        assert 0 <= byte < nbytes and 0 <= shift < 8 and shift % bits == 0
        assert (shift // bits) * nbytes + byte == index


def test_bad_bits():
    with pytest.raises(ValueError, match="bits"):
        bitpack.pack(torch.zeros(3, dtype=torch.uint8), 3)


def _neighbours(t: float, dtype: torch.dtype) -> list[float]:
    v = torch.tensor(t, dtype=dtype)
    return [torch.nextafter(v, torch.tensor(d, dtype=dtype)).item() for d in (-math.inf, math.inf)] + [t]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("side", ["left", "right"])
def test_threshold_is_exact(dtype, side):
    """x > threshold(b) (side left) or x >= threshold(b) (right) equals the real test (x > b or x >= b)
    for the values around the threshold, which is never a subnormal number (with denormals flushed a
    comparison reads one as 0: ReLU's break at 0 was once the threshold 1.4e-45, read as `y >= 0`)."""
    values = [-0.7517915246935645, -1.2784645427610738, 0.0, -0.0, 1 / 3, 20.0, -3.0, 1e-30, -1e-30, 2.5e5, -2.5e5]
    tiny = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny
    for b in values:
        t = bitpack.threshold(b, side, dtype)
        assert torch.tensor(t, dtype=dtype).item() == t  # representable
        assert t == 0 or abs(t) >= tiny, (b, side, t)
        assert math.copysign(1, t) == 1 or t != 0  # +0.0, never -0.0
        for x in _neighbours(t, dtype) + [math.inf, -math.inf]:
            real = x > b if side == "left" else x >= b
            assert ((x > t) if side == "left" else (x >= t)) == real, (b, side, x, t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_threshold_refuses_a_subnormal_break(dtype):
    """A break inside the subnormal range would need a subnormal threshold (or move): a clear error."""
    sub = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny / 4
    for side in ("left", "right"):
        with pytest.raises(ValueError, match="subnormal"):
            bitpack.threshold(sub, side, dtype)


def test_denormals_flushed_follows_torch():
    """bitpack.denormals_flushed() reads the thread's setting (the lookup tables are built per setting)."""
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals (torch.set_flush_denormal returned False)")
    try:
        assert bitpack.denormals_flushed()
    finally:
        torch.set_flush_denormal(False)
    assert not bitpack.denormals_flushed()


# ------------------------------------------------------------------------------------------------
# empty tensors, ragged counts and huge counts (no allocation)

@pytest.mark.parametrize("bits", (0, *bitpack.BITS))
def test_plane_chunks_of_nothing(bits):
    """No elements: no chunks, whatever the chunk size (the compiled backward asks for chunks of
    numel elements, 0 here: range(0, 0, 0) used to raise)."""
    assert list(bitpack.plane_chunks(0, bits, 0)) == []
    assert list(bitpack.plane_chunks(0, bits, 100)) == []
    with pytest.raises(ValueError, match="size must be a positive"):
        list(bitpack.plane_chunks(5, bits, 0))


@pytest.mark.parametrize("bits", bitpack.BITS)
@pytest.mark.parametrize("n", [1, 2, 7, 9, 15, 17, 1001])
def test_ragged_counts_leave_zero_padding(bits, n):
    """Counts not divisible by 8 // bits: all-ones codes fill exactly the first n fields; the unused
    tail of the last plane is zero (docs: bitpack module docstring)."""
    packed = bitpack.pack(torch.full((n,), 2 ** bits - 1, dtype=torch.uint8), bits)
    fields = bitpack.unpack(packed, bits, len(packed) * (8 // bits))
    assert int(fields[:n].min()) == 2 ** bits - 1 and int(fields[n:].abs().sum()) == 0


def _check_chunks(numel: int, bits: int, size: int) -> int:
    """Chunks tile [0, numel) in order, each inside one plane, and agree with bit_position (no code,
    bits == 0: first byte and shift 0)."""
    nbytes = bitpack.packed_bytes(numel, bits) if bits else numel
    expected_start, count = 0, 0
    for start, stop, first, shift in bitpack.plane_chunks(numel, bits, size):
        assert all(type(v) is int for v in (start, stop, first, shift))      # exact, never float
        assert start == expected_start and start < stop <= min(start + size, numel)
        if bits:
            assert bitpack.bit_position(start, bits, numel) == (first, shift)
            assert bitpack.bit_position(stop - 1, bits, numel) == (first + stop - start - 1, shift)
            assert first + (stop - start) <= nbytes
        else:
            assert first == shift == 0
        expected_start, count = stop, count + 1
    assert expected_start == numel
    return count


@pytest.mark.parametrize("bits", (0, *bitpack.BITS))
@pytest.mark.parametrize("numel", [2**31 - 1, 2**31, 2**31 + 3, 2**32 + 1, 2**33 + 5, 3 * 2**40 + 7])
def test_plane_chunks_past_2_31(bits, numel):
    """Chunk arithmetic for counts past int32 (what the eager and compiled backward slice by), without
    allocating: whole planes (size = numel, the compiled backend) and 2**30-element chunks."""
    planes = 1 if bits == 0 else -(-numel // bitpack.packed_bytes(numel, bits))
    assert _check_chunks(numel, bits, numel) == planes
    if numel < 2**34:
        assert _check_chunks(numel, bits, 2**30) >= planes


@pytest.mark.parametrize("bits", bitpack.BITS)
@pytest.mark.parametrize("numel", [2**31 + 3, 2**33 + 5])
def test_triton_index_formulas_past_2_31(bits, numel):
    """The generated Triton kernels' index arithmetic (generated/triton_*.py), emulated in int64 at the
    last program: with a code, forward and backward program pid covers bytes b = pid * BLOCK + arange
    and reads element nbytes * j + b of plane j (at shift j * BITS). Equal to bit_position; in int32
    the offsets would wrap."""
    block, per = 1024, 8 // bits
    nbytes = bitpack.packed_bytes(numel, bits)
    seen = []
    for pid in (np.int64(-(-nbytes // block) - 1), np.int64((numel - 1) % nbytes // block)):  # the last
        b = pid * block + np.arange(block, dtype=np.int64)                 # program, the last element's
        for j in range(per):
            offs = np.int64(nbytes) * j + b
            live = (b < nbytes) & (offs < numel)
            for i in offs[live][[0, -1]] if live.any() else []:
                assert bitpack.bit_position(int(i), bits, numel) == (int(i) % nbytes, j * bits)
                seen.append(int(i))
    assert max(seen) == numel - 1 > np.iinfo(np.int32).max


def test_triton_kernels_compute_offsets_in_int64():
    """Every generated Triton kernel widens its program id to int64 before forming offsets (a
    program id is int32; pid * BLOCK wraps past 2**31 elements). Read-only check of generated code."""
    import ast
    from pathlib import Path

    import invact.generated as pkg
    files = sorted(Path(pkg.__file__).parent.glob("triton_*.py"))
    if not files:
        pytest.skip("no generated Triton kernels")
    for path in files:
        tree = ast.parse(path.read_text())
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.endswith("_kernel")):
            calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call) and ast.unparse(n.func) == "tl.program_id"]
            assert calls, f"{path.name}:{fn.name} has no program id"
            widened = [n for n in ast.walk(fn) if isinstance(n, ast.Call) and ast.unparse(n) ==
                       "tl.program_id(0).to(tl.int64)"]
            assert len(widened) == len(calls), f"{path.name}:{fn.name}: a program id is used as int32"


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("n", [5, 64, 1000, 1003, 8 * 125 + 1])
def test_pack_compiled_and_eager_bytes_agree(bits, n):
    """pack's eager path (bytes, planes or-ed one at a time) gives the compiled path's int32 arithmetic's bytes."""
    codes = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.int32)
    compiled = torch.compile(lambda c: bitpack.pack(c, bits), backend="eager", fullgraph=True)
    assert torch.equal(bitpack.pack(codes, bits), compiled(codes))


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("n", [1, 999, 1000, 1001, 4 * 1000 + 17, 8 * 1000 - 1])
def test_eager_code_in_chunks_is_code_packed(monkeypatch, bits, n):
    """invact.impl_eager's forward code, computed a chunk of bytes at a time from the elements of each plane
    (bounded temporaries: an eager forward of 2^26 bf16 elements grew 0.69 GB, now y and the code alone),
    is code_packed's bytes, for every code width and chunk boundary."""
    from types import SimpleNamespace
    from invact import impl_eager, registry
    thresholds = torch.linspace(-1, 1, (1 << bits) - 1)

    def code_kernel(x, thr):
        return sum((x > t).to(torch.int32) for t in thr)

    mod = SimpleNamespace(CODE_BITS=bits, code_kernel=code_kernel,
                          code_packed=lambda x, thr: bitpack.pack(code_kernel(x, thr), bits), grad_kernel=None)
    monkeypatch.setattr(registry, "module", lambda name: mod)
    monkeypatch.setattr(impl_eager, "chunk_size", lambda t: 100)        # many chunks, ragged last ones
    x = torch.randn(n, generator=torch.Generator().manual_seed(bits))
    k = SimpleNamespace(x_thresholds=thresholds)
    assert torch.equal(impl_eager.EAGER.code(x, "fake", k), mod.code_packed(x, thresholds))
