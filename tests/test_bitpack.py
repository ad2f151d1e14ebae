"""Bit packing of branch codes and break thresholds per dtype (invact.bitpack)."""

import math

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
    """x >= threshold(b) equals the real test (x > b or x >= b) for the values around the threshold."""
    values = [-0.7517915246935645, -1.2784645427610738, 0.0, 1 / 3, 20.0, -3.0, 1e-30, 2.5e5]
    for b in values:
        t = bitpack.threshold(b, side, dtype)
        assert torch.tensor(t, dtype=dtype).item() == t  # representable
        if math.isinf(t):
            continue
        for x in _neighbours(t, dtype):
            real = x > b if side == "left" else x >= b
            assert (x >= t) == real, (b, side, x, t)
