"""Bit packing: the documented little-endian bit order (known answers), exact round trips, and errors."""

import pytest
import torch

from gqsa.format.bitpack import pack_bits, pack_bits_padded, packed_nbytes, unpack_bits, unpack_bits_padded

BITS = (2, 3, 4, 8)


def _u8(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


# Hand-computed from docs/FORMAT.md section 3: code i occupies stream bits [i*bits, (i+1)*bits), stream bit t is
# bit t % 8 of byte t // 8.
KNOWN_ANSWERS = [
    # 4 bits: code 2i in the low nibble of byte i, code 2i+1 in the high nibble.
    (4, [1, 2, 3, 4, 5, 6, 7, 8], [0x21, 0x43, 0x65, 0x87]),
    (4, [15, 0, 0, 15, 10, 5, 0, 0], [0x0F, 0xF0, 0x5A, 0x00]),
    # 2 bits: byte 0 = 0 | 1<<2 | 2<<4 | 3<<6 = 0xE4, byte 1 = 3 | 2<<2 | 1<<4 | 0<<6 = 0x1B.
    (2, [0, 1, 2, 3, 3, 2, 1, 0], [0xE4, 0x1B]),
    (2, [3, 0, 0, 0, 0, 0, 0, 2], [0x03, 0x80]),
    # 3 bits: sum(code_i << 3i) = 1 + 2<<3 + 3<<6 + 4<<9 + 5<<12 + 6<<15 + 7<<18 = 0x1F58D1 -> D1 58 1F.
    (3, [1, 2, 3, 4, 5, 6, 7, 0], [0xD1, 0x58, 0x1F]),
    # 3 bits: code 2 straddles bytes 0 and 1 (bits 6-7 of byte 0, bit 0 of byte 1); 7 << 6 = 0x1C0.
    (3, [0, 0, 7, 0, 0, 0, 0, 0], [0xC0, 0x01, 0x00]),
    # 3 bits: code 5 straddles bytes 1 and 2 (bits 7 of byte 1, bits 0-1 of byte 2); 5 << 15 = 0x28000.
    (3, [0, 0, 0, 0, 0, 5, 0, 0], [0x00, 0x80, 0x02]),
    (8, [0, 1, 127, 128, 200, 255, 3, 9], [0, 1, 127, 128, 200, 255, 3, 9]),
]


@pytest.mark.parametrize(("bits", "codes", "packed"), KNOWN_ANSWERS)
def test_pack_known_answers(bits, codes, packed):
    out = pack_bits(_u8(codes), bits)
    assert out.dtype == torch.uint8
    assert out.tolist() == packed
    assert unpack_bits(_u8(packed), bits, 8).tolist() == codes


def test_pack_second_chunk_follows_the_first():
    codes = _u8([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0])
    assert pack_bits(codes, 4).tolist() == [0x21, 0x43, 0x65, 0x87, 0xA9, 0xCB, 0xED, 0x0F]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(8,), (3, 16), (2, 5, 64), (0, 8), (4, 0)])
def test_round_trip_random(bits, shape):
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, shape, generator=gen, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (*shape[:-1], shape[-1] * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, shape[-1]), codes)


@pytest.mark.parametrize("bits", BITS)
def test_every_byte_value_unpacks_and_repacks(bits):
    # All 256 byte values in every position: unpack is a bijection onto valid codes.
    packed = torch.arange(256, dtype=torch.uint8).repeat_interleave(bits).reshape(256, bits)
    codes = unpack_bits(packed, bits, 8)
    assert int(codes.max()) < 2**bits
    assert torch.equal(pack_bits(codes, bits), packed)


@pytest.mark.parametrize("bits", BITS)
def test_pack_does_not_alias_input(bits):
    codes = torch.zeros(8, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    packed.fill_(255 if bits == 8 else 0xFF)
    assert int(codes.max()) == 0


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 8, 9, 13, 16, 17])
def test_padded_round_trip(bits, n):
    codes = torch.arange(n, dtype=torch.int64).remainder(2**bits).to(torch.uint8)
    packed = pack_bits_padded(codes, bits)
    assert packed.shape == (packed_nbytes(n, bits),)
    assert packed_nbytes(n, bits) == (n * bits + 7) // 8
    assert torch.equal(unpack_bits_padded(packed, bits, n), codes)
    # The padding is zero: repacking the codes padded with zeros to a multiple of 8 gives the same bytes.
    full = torch.zeros(((n + 7) // 8) * 8, dtype=torch.uint8)
    full[:n] = codes
    assert torch.equal(packed, pack_bits(full, bits)[: packed.numel()])


def test_padded_known_answer():
    # Three 4-bit zero points 0x5, 0xA, 0x3 -> bytes 0xA5, 0x03 (high nibble of the last byte is padding).
    assert pack_bits_padded(_u8([5, 10, 3]), 4).tolist() == [0xA5, 0x03]
    # Three 3-bit codes 7, 7, 7 -> 9 bits = 0x1FF -> 0xFF, 0x01.
    assert pack_bits_padded(_u8([7, 7, 7]), 3).tolist() == [0xFF, 0x01]


@pytest.mark.parametrize("bits", [1, 5, 6, 7, 16])
def test_unsupported_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(8, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="bits"):
        unpack_bits(torch.zeros(8, dtype=torch.uint8), bits, 8)
    with pytest.raises(ValueError, match="bits"):
        packed_nbytes(8, bits)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_rejects_out_of_range_codes(bits):
    codes = torch.zeros(8, dtype=torch.uint8)
    codes[5] = 2**bits
    with pytest.raises(ValueError, match=f"{bits} bits"):
        pack_bits(codes, bits)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int8, torch.float32])
def test_pack_rejects_non_uint8(dtype):
    with pytest.raises(ValueError, match="uint8"):
        pack_bits(torch.zeros(8, dtype=dtype), 4)
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(torch.zeros(4, dtype=dtype), 4, 8)


@pytest.mark.parametrize("n", [1, 4, 12])
def test_pack_rejects_partial_runs(n):
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_bits(torch.zeros(n, dtype=torch.uint8), 4)


def test_unpack_rejects_wrong_length():
    with pytest.raises(ValueError, match="does not hold"):
        unpack_bits(torch.zeros(5, dtype=torch.uint8), 4, 8)
    with pytest.raises(ValueError, match="does not hold"):
        unpack_bits(torch.zeros(6, dtype=torch.uint8), 3, 12)
    with pytest.raises(ValueError, match="expected 2 bytes"):
        unpack_bits_padded(torch.zeros(3, dtype=torch.uint8), 4, 3)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_packing_in_steps_is_packing_at_once(bits, monkeypatch):
    """Runs are packed a bounded number at a time (peak memory); the steps' seams must not show: the same bytes
    as one step over every run, and back."""
    import gqsa.format.bitpack as bitpack

    codes = torch.randint(0, 1 << bits, (5, 7, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    whole = pack_bits(codes, bits)  # 105 runs of 8 codes: one step
    monkeypatch.setattr(bitpack, "_RUNS_PER_STEP", 4)  # 27 steps, the last one short
    assert torch.equal(pack_bits(codes, bits), whole)
    assert torch.equal(unpack_bits(whole, bits, 24), codes)


@pytest.mark.parametrize("bits", [2, 4])
def test_packing_holds_a_bounded_number_of_wide_words(bits):
    """The int64 words of one step at a time, not of every code (a 7B layer: 0.7 GiB otherwise)."""
    from live_bytes import LiveBytes

    import gqsa.format.bitpack as bitpack

    codes = torch.randint(0, 1 << bits, (8 * bitpack._RUNS_PER_STEP * 4,), dtype=torch.uint8)
    with LiveBytes() as mem:
        packed = pack_bits(codes, bits)
    step_words = bitpack._RUNS_PER_STEP * 8 * 8  # a step's runs widened to int64
    assert mem.peak <= packed.numel() + 3 * step_words, mem.peak / codes.numel()
    with LiveBytes() as mem:
        unpack_bits(packed, bits, codes.numel())
    assert mem.peak <= codes.numel() + 3 * step_words, mem.peak / codes.numel()
