"""PackedWeight: exact pack/unpack round trips, the normative BSR layout, dequantization, size accounting."""

import pytest
import torch

from gqsa.format import PackedWeight, dequantize_bsr, quantize_to_packed
from gqsa.format.bitpack import pack_bits, pack_bits_padded
from gqsa.format.packed import INT16_MAX_GROUPS, col_indices_dtype
from gqsa.quant import fake_quantize, from_groups, group_l2_norms, group_qparams, select_groups, to_groups

BITS = (2, 3, 4, 8)
GROUP_SIZES = (8, 16, 64, 128, 256)
N, G = 6, 5


def _mask(kind: str) -> torch.Tensor:
    if kind == "all_kept":
        return torch.ones(N, G, dtype=torch.bool)
    if kind == "none_kept":
        return torch.zeros(N, G, dtype=torch.bool)
    if kind == "one_kept":
        mask = torch.zeros(N, G, dtype=torch.bool)
        mask[N - 1, G - 1] = True
        return mask
    # "mixed": first, middle and last rows fully pruned, one row fully kept, the rest random.
    mask = torch.rand(N, G, generator=torch.Generator().manual_seed(0)) < 0.5
    mask[0] = False
    mask[2] = False
    mask[N - 1] = False
    mask[3] = True
    mask[1, 0] = mask[1, 4] = True
    mask[4, 1] = False
    return mask


MASKS = ("mixed", "all_kept", "none_kept", "one_kept")


def _parts(group_size: int, bits: int, symmetric: bool, seed: int = 0):
    """Random codes, fp16-exact positive scales and integer zero points for every group (kept or not)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (N, G, group_size), generator=gen, dtype=torch.uint8)
    codes[0, 0] = 2**bits - 1  # the extreme codes appear
    codes[0, 1] = 0
    scale = (torch.rand(N, G, generator=gen) * 3 + 1e-3).half().float()
    zero = None if symmetric else torch.randint(0, 2**bits, (N, G), generator=gen).float()
    return codes, scale, zero


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_round_trip_is_exact(bits, group_size, symmetric, kind):
    codes, scale, zero = _parts(group_size, bits, symmetric, seed=bits * 1000 + group_size)
    mask = _mask(kind)
    p = PackedWeight.pack(codes, scale, zero, mask, bits)
    p.validate()
    nnz = int(mask.sum())
    assert (p.out_features, p.in_features, p.group_size, p.bits, p.nnz) == (N, G * group_size, group_size, bits, nnz)
    assert p.symmetric is symmetric

    # The normative layout (docs/FORMAT.md section 2): row-major entries, increasing column within a row.
    rows, cols = mask.nonzero(as_tuple=True)
    assert p.crow_indices.dtype == torch.int32
    assert p.crow_indices.tolist() == [0, *torch.cumsum(mask.sum(1), 0).tolist()]
    assert p.col_indices.dtype == torch.int16
    assert p.col_indices.tolist() == cols.tolist()
    assert p.values.dtype == torch.uint8 and p.values.shape == (nnz, group_size * bits // 8)
    assert torch.equal(p.values, pack_bits(codes[rows, cols], bits))
    assert p.scale.dtype == torch.float16 and torch.equal(p.scale, scale[rows, cols].half())
    if symmetric:
        assert p.zero_point is None
    else:
        assert p.zero_point.dtype == torch.uint8 and p.zero_point.shape == ((nnz * bits + 7) // 8,)
        assert torch.equal(p.zero_point, pack_bits_padded(zero[rows, cols].to(torch.uint8), bits))

    u = p.unpack()
    assert torch.equal(u.mask, mask)
    assert u.codes.dtype == torch.uint8 and u.codes.shape == codes.shape
    assert torch.equal(u.codes[mask], codes[mask])
    assert not bool(u.codes[~mask].any())
    assert u.scale.dtype == torch.float16
    assert torch.equal(u.scale[mask].float(), scale[mask])
    assert not bool(u.scale[~mask].any())
    if symmetric:
        assert u.zero_point is None
    else:
        assert u.zero_point.dtype == torch.uint8
        assert torch.equal(u.zero_point[mask].float(), zero[mask])

    # pack(unpack(p)) reproduces identical bytes.
    again = PackedWeight.pack(u.codes, u.scale, u.zero_point, u.mask, bits)
    for name, t in p.tensors_with_none().items():
        t2 = getattr(again, name)
        if t is None:
            assert t2 is None
        else:
            assert t2.dtype == t.dtype and t2.shape == t.shape
            assert torch.equal(t2.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name
    assert again.metadata() == p.metadata()


@pytest.mark.parametrize("symmetric", [False, True])
def test_no_kept_group(symmetric):
    codes, scale, zero = _parts(16, 4, symmetric)
    p = PackedWeight.pack(codes, scale, zero, _mask("none_kept"), 4)
    p.validate()
    assert p.nnz == 0 and p.sparsity == 1.0
    assert p.crow_indices.tolist() == [0] * (N + 1)
    assert p.values.shape == (0, 8)
    assert p.scale.shape == (0,)
    if not symmetric:
        assert p.zero_point.shape == (0,)
    w = p.dequantize()
    assert w.shape == (N, G * 16) and not bool(w.any())


def test_layout_known_answer():
    # 2 x 16 weight, group_size 8, 4 bits, asymmetric; group (0, 0) pruned. Values of the pruned group
    # (including an invalid scale and zero point) must be ignored.
    codes = torch.zeros(2, 2, 8, dtype=torch.uint8)
    codes[0, 0] = 9
    codes[0, 1] = torch.arange(1, 9, dtype=torch.uint8)
    codes[1, 0] = 15
    codes[1, 1] = torch.tensor([0, 15] * 4, dtype=torch.uint8)
    scale = torch.tensor([[0.1, 0.5], [0.25, 2.0]])
    zero = torch.tensor([[99.0, 3.0], [10.0, 1.0]])
    mask = torch.tensor([[False, True], [True, True]])
    p = PackedWeight.pack(codes, scale, zero, mask, bits=4)
    assert p.crow_indices.tolist() == [0, 1, 3]
    assert p.col_indices.tolist() == [1, 0, 1]
    assert p.values.tolist() == [[0x21, 0x43, 0x65, 0x87], [0xFF] * 4, [0xF0] * 4]
    assert p.scale.tolist() == [0.5, 0.25, 2.0]
    assert p.zero_point.tolist() == [0xA3, 0x01]  # 3 | 10 << 4, then 1 and 4 zero padding bits
    assert p.dequantize().tolist() == [
        [0.0] * 8 + [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5],
        [1.25] * 8 + [-2.0, 28.0] * 4,
    ]
    # 12 (crow) + 6 (col) + 12 (values) + 6 (scale) + 2 (zero points) = 38 bytes for 32 weights.
    assert p.nbytes() == 38
    assert p.bits_per_weight() == 8 * 38 / 32


def test_symmetric_layout_known_answer():
    codes = torch.tensor([[[0, 1, 2, 3, 3, 2, 1, 0]]], dtype=torch.uint8)
    p = PackedWeight.pack(codes, torch.tensor([[0.5]]), None, torch.tensor([[True]]), bits=2)
    assert p.values.tolist() == [[0xE4, 0x1B]]
    assert p.dequantize().tolist() == [[-1.0, -0.5, 0.0, 0.5, 0.5, 0.0, -0.5, -1.0]]  # zero point 2**(2-1)
    assert "zero_point" not in p.tensors()
    # 8 (crow) + 2 (col) + 2 (values) + 2 (scale) = 14 bytes for 8 weights.
    assert p.bits_per_weight() == 14.0


def test_bits_per_weight_of_the_format_spec_example():
    # docs/FORMAT.md section 4: W4, group 16, asymmetric, 50% kept, N = K = 4096 (meta tensors: no memory).
    n = k = 4096
    nnz = n * (k // 16) // 2
    meta = {"out_features": n, "in_features": k, "group_size": 16, "bits": 4, "symmetric": False, "nnz": nnz}
    tensors = {name: torch.empty(shape, dtype=dtype, device="meta")
               for name, (shape, dtype) in PackedWeight.expected_shapes(meta).items()}
    p = PackedWeight(**tensors, out_features=n, in_features=k, group_size=16, bits=4)
    expected_bytes = (n + 1) * 4 + nnz * 2 + nnz * 8 + nnz * 2 + nnz * 4 // 8
    assert p.nbytes() == expected_bytes
    assert p.bits_per_weight() == pytest.approx(2.0 + 0.5 + 0.125 + 0.5 + 32 * (n + 1) / (n * k), rel=1e-12)
    assert round(p.bits_per_weight(), 2) == 3.13


@pytest.mark.parametrize("symmetric", [False, True])
def test_int32_col_indices_when_more_than_32768_groups(symmetric):
    k = 8 * 40000  # G = 40000 > 32768
    w = torch.randn(1, k, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 40000, dtype=torch.bool)
    kept = torch.tensor([0, 1, 777, 32767, 32768, 39999] + list(range(100, 3500, 100)))
    mask[0, kept] = True
    nnz = kept.numel()
    assert nnz == 40
    p = quantize_to_packed(w, mask, bits=2, group_size=8, symmetric=symmetric)
    p.validate()
    assert p.col_indices.dtype == torch.int32
    assert p.col_indices.tolist() == sorted(kept.tolist())
    # crow 2 * 4 + col 40 * 4 + values 40 * 2 + scale 40 * 2 (+ zero points ceil(40 * 2 / 8) = 10).
    expected = 8 + 160 + 80 + 80 + (0 if symmetric else 10)
    assert p.nbytes() == expected
    assert p.bits_per_weight() == 8 * expected / k
    dense = p.dequantize()
    assert not bool(dense.reshape(40000, 8)[~mask[0]].any())
    assert torch.equal(p.unpack().mask, mask)


def test_col_indices_dtype_rule():
    assert INT16_MAX_GROUPS == 32768
    assert col_indices_dtype(1) == torch.int16
    assert col_indices_dtype(32768) == torch.int16
    assert col_indices_dtype(32769) == torch.int32


def test_largest_int16_column_index_round_trips():
    g_count = 32768  # the largest G stored with int16 columns; index 32767 is int16's maximum
    codes = torch.full((1, g_count, 8), 3, dtype=torch.uint8)
    scale = torch.ones(1, g_count)
    mask = torch.zeros(1, g_count, dtype=torch.bool)
    mask[0, [0, g_count - 1]] = True
    p = PackedWeight.pack(codes, scale, None, mask, bits=2)
    p.validate()
    assert p.col_indices.dtype == torch.int16
    assert p.col_indices.tolist() == [0, g_count - 1]
    assert torch.equal(p.unpack().mask, mask)
    dense = p.dequantize()
    assert dense[0, -8:].tolist() == [1.0] * 8 and dense[0, :8].tolist() == [1.0] * 8
    assert not bool(dense[0, 8:-8].any())


@pytest.mark.parametrize("method", ["minmax", "mse"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_dequantize_equals_masked_fake_quantized_weight(bits, symmetric, method):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(7, 64, generator=gen) * 0.1
    w[1, 3] = 0.0  # a zero weight inside a kept group stays exactly zero
    mask = select_groups(group_l2_norms(w, 16), 0.5, "row")
    mask[1] = True
    mask[4] = False  # a row with every group pruned
    p = quantize_to_packed(w, mask, bits, 16, symmetric=symmetric, qparam_method=method)
    p.validate()
    groups = to_groups(w, 16)  # (7, 4, 16)
    scale, zero = group_qparams(groups, bits, symmetric, method)
    want = from_groups(fake_quantize(groups, scale, zero, bits) * mask.unsqueeze(-1))
    got = p.dequantize()
    assert got.dtype == torch.float32 and got.shape == w.shape
    assert torch.equal(got, want)
    assert not bool(got.reshape(7, 4, 16)[~mask].any())
    assert float(got[1, 3]) == 0.0
    if method == "minmax":  # kept weights are within half a step (MSE clips on purpose)
        err = (got - w).abs().reshape(7, 4, 16)[mask]  # (nnz, 16)
        assert bool((err <= scale[mask].unsqueeze(-1) / 2 * (1 + 1e-5)).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dequantize_dtype_is_float32_math_then_cast(dtype):
    codes, scale, zero = _parts(16, 4, False)
    p = PackedWeight.pack(codes, scale, zero, _mask("mixed"), 4)
    got = p.dequantize(dtype)
    assert got.dtype == dtype
    assert torch.equal(got, p.dequantize().to(dtype))


def test_dequantize_bsr_is_the_definition():
    codes, scale, zero = _parts(8, 3, False)
    mask = _mask("mixed")
    p = PackedWeight.pack(codes, scale, zero, mask, 3)
    got = dequantize_bsr(p.crow_indices, p.col_indices, p.values, p.scale, p.zero_point, N, G * 8, 8, 3)
    # Independent float64 evaluation of W[r, j*g + c] = s * (q_c - z), pruned groups 0.
    want = ((codes.double() - zero.double().unsqueeze(-1)) * scale.double().unsqueeze(-1)) * mask.unsqueeze(-1)
    torch.testing.assert_close(got.double(), want.reshape(N, G * 8), rtol=1e-6, atol=0)


def test_quantize_to_packed_rejects_bad_mask_shape():
    from gqsa.format import FormatError

    with pytest.raises(FormatError, match="mask"):
        quantize_to_packed(torch.randn(4, 32), torch.ones(4, 3, dtype=torch.bool), 4, 16)


def test_derived_properties_and_metadata():
    codes, scale, zero = _parts(16, 4, False)
    mask = _mask("mixed")
    p = PackedWeight.pack(codes, scale, zero, mask, 4)
    assert p.num_groups == G
    assert p.sparsity == pytest.approx(1 - int(mask.sum()) / (N * G))
    meta = p.metadata()
    assert meta == {"out_features": N, "in_features": G * 16, "group_size": 16, "bits": 4, "symmetric": False,
                    "nnz": int(mask.sum())}
    shapes = PackedWeight.expected_shapes(meta)
    assert set(shapes) == set(p.tensors())
    for name, (shape, dtype) in shapes.items():
        t = getattr(p, name)
        assert tuple(t.shape) == shape and t.dtype == dtype
    assert p.nbytes() == sum(t.numel() * t.element_size() for t in p.tensors().values())
    moved = p.to("cpu")
    assert moved.metadata() == meta
    assert all(torch.equal(getattr(moved, k), v) for k, v in p.tensors().items())
    sym = PackedWeight.pack(codes, scale, None, mask, 4)
    assert "zero_point" not in PackedWeight.expected_shapes(sym.metadata())
    assert sym.to("cpu").zero_point is None
