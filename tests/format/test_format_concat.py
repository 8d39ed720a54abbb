"""concat_rows: stacking packed weights row-wise is exact (dequantized parts, codes, zero-point bit streams that
start mid-byte), valid, and refuses parts that cannot share rows."""

import pytest
import torch

from gqsa.format import PackedWeight, concat_rows

K, GROUP_SIZE = 64, 16


def _packed(rows: int, bits: int = 4, symmetric: bool = False, keep: float = 0.5, seed: int = 0,
            in_features: int = K, group_size: int = GROUP_SIZE) -> PackedWeight:
    gen = torch.Generator().manual_seed(seed)
    g = in_features // group_size
    codes = torch.randint(0, 2**bits, (rows, g, group_size), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(rows, g, generator=gen) * 2 + 1e-2).half().float()
    zero = None if symmetric else torch.randint(0, 2**bits, (rows, g), generator=gen).float()
    mask = torch.rand(rows, g, generator=gen) < keep
    return PackedWeight.pack(codes, scale, zero, mask, bits)


def _odd_nnz(rows: int, bits: int, symmetric: bool, seed: int) -> PackedWeight:
    for s in range(seed, seed + 100):
        p = _packed(rows, bits, symmetric, seed=s)
        if p.nnz % 2 == 1:
            return p
    raise AssertionError("no odd nnz found")


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_concatenation_dequantizes_to_the_stacked_parts(bits, symmetric):
    # the first part has an odd nnz: the next part's zero points start mid-byte (every width but 8 bits)
    parts = [_odd_nnz(5, bits, symmetric, seed=1), _packed(3, bits, symmetric, seed=2),
             _packed(7, bits, symmetric, keep=0.0, seed=3), _packed(4, bits, symmetric, keep=1.0, seed=4)]
    assert parts[0].nnz % 2 == 1 and parts[2].nnz == 0
    fused = concat_rows(parts)
    fused.validate()
    assert (fused.out_features, fused.in_features, fused.bits, fused.symmetric) == (19, K, bits, symmetric)
    assert fused.nnz == sum(p.nnz for p in parts)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    unpacked = fused.unpack()
    for name in ("codes", "scale", "zero_point", "mask"):
        pieces = [getattr(p.unpack(), name) for p in parts]
        if pieces[0] is None:
            assert getattr(unpacked, name) is None
        else:
            assert torch.equal(getattr(unpacked, name), torch.cat(pieces)), name


def test_zero_points_after_an_odd_part_are_repacked_known_answer():
    # 4-bit zero points, groups of 8: part 0 keeps one group (z = 3), part 1 two (z = 10, 1); the stream of the
    # concatenation is 3, 10, 1 -> bytes 0xA3, 0x01 (part 1 alone would start at a byte: 0x1A)
    codes = torch.zeros(1, 2, 8, dtype=torch.uint8)
    a = PackedWeight.pack(codes, torch.ones(1, 2), torch.tensor([[3.0, 0.0]]), torch.tensor([[True, False]]), 4)
    b = PackedWeight.pack(codes, torch.ones(1, 2), torch.tensor([[10.0, 1.0]]), torch.tensor([[True, True]]), 4)
    assert a.zero_point.tolist() == [0x03] and b.zero_point.tolist() == [0x1A]
    fused = concat_rows([a, b])
    fused.validate()
    assert fused.zero_point.tolist() == [0xA3, 0x01]
    assert fused.crow_indices.tolist() == [0, 1, 3] and fused.col_indices.tolist() == [0, 0, 1]


def test_single_part_is_an_equal_copy():
    p = _packed(6, seed=5)
    q = concat_rows([p])
    for name, t in p.tensors().items():
        assert torch.equal(getattr(q, name), t) and getattr(q, name).dtype == t.dtype, name


@pytest.mark.parametrize("other,message", [
    ({"in_features": 2 * K}, "in_features"),
    ({"group_size": 8}, "group_size"),
    ({"bits": 8}, "bits"),
    ({"symmetric": True}, "symmetric"),
])
def test_parts_that_cannot_share_rows_are_named(other, message):
    with pytest.raises(ValueError, match=message):
        concat_rows([_packed(3), _packed(3, seed=1, **other)])


def test_no_part_is_an_error():
    with pytest.raises(ValueError, match="at least one"):
        concat_rows([])
