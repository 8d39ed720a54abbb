"""PackedWeight.validate rejects every broken rule of docs/FORMAT.md, naming the tensor; pack() rejects bad input."""

import dataclasses
import re

import pytest
import torch

from gqsa.format import FormatError, PackedWeight, quantize_to_packed

# 4 x 32 weight, group_size 8 (G = 4), 4 bits, asymmetric. Row 1 is empty; columns decrease across rows.
MASK = torch.tensor(
    [[True, True, False, True], [False, False, False, False], [True, False, True, False], [False, True, True, True]]
)
CROW = [0, 3, 3, 5, 8]
COLS = [0, 1, 3, 0, 2, 1, 2, 3]
NNZ = 8


def _packed(symmetric: bool = False) -> PackedWeight:
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (4, 4, 8), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(4, 4, generator=gen) + 0.1).half().float()
    zero = None if symmetric else torch.randint(0, 16, (4, 4), generator=gen).float()
    return PackedWeight.pack(codes, scale, zero, MASK, bits=4)


def _with(p: PackedWeight, **changes) -> PackedWeight:
    return dataclasses.replace(p, **changes)


def test_base_case_is_valid_and_as_described():
    p = _packed()
    assert p.crow_indices.tolist() == CROW
    assert p.col_indices.tolist() == COLS
    p.validate()
    _packed(symmetric=True).validate()


def test_format_error_is_a_value_error():
    assert issubclass(FormatError, ValueError)


def _crow(values):
    return torch.tensor(values, dtype=torch.int32)


def _cols(values):
    return torch.tensor(values, dtype=torch.int16)


# (id, field -> replacement built from the valid weight, tensor named in the message)
CORRUPTIONS = [
    ("crow_starts_at_1", lambda p: {"crow_indices": _crow([1, 3, 3, 5, 8])}, "crow_indices"),
    ("crow_shifted", lambda p: {"crow_indices": _crow([1, 4, 4, 6, 9])}, "crow_indices"),
    ("crow_decreasing", lambda p: {"crow_indices": _crow([0, 3, 2, 5, 8])}, "crow_indices"),
    ("crow_negative_step", lambda p: {"crow_indices": _crow([0, 3, 3, 9, 8])}, "crow_indices"),
    ("crow_end_below_nnz", lambda p: {"crow_indices": _crow([0, 3, 3, 5, 7])}, "crow_indices"),
    ("crow_end_above_nnz", lambda p: {"crow_indices": _crow([0, 3, 3, 5, 9])}, "crow_indices"),
    ("crow_row_longer_than_G", lambda p: {"crow_indices": _crow([0, 5, 5, 5, 8])}, "crow_indices"),
    ("col_equal_to_G", lambda p: {"col_indices": _cols([0, 1, 4, 0, 2, 1, 2, 3])}, "col_indices"),
    ("col_far_out_of_range", lambda p: {"col_indices": _cols([0, 1, 3, 0, 2, 1, 2, 300])}, "col_indices"),
    ("col_negative", lambda p: {"col_indices": _cols([-1, 1, 3, 0, 2, 1, 2, 3])}, "col_indices"),
    ("cols_decreasing_in_first_row", lambda p: {"col_indices": _cols([1, 0, 3, 0, 2, 1, 2, 3])}, "col_indices"),
    ("cols_repeated_in_a_row", lambda p: {"col_indices": _cols([0, 3, 3, 0, 2, 1, 2, 3])}, "col_indices"),
    ("cols_decreasing_in_last_row", lambda p: {"col_indices": _cols([0, 1, 3, 0, 2, 1, 3, 2])}, "col_indices"),
    ("cols_decreasing_in_middle_row", lambda p: {"col_indices": _cols([0, 1, 3, 2, 0, 1, 2, 3])}, "col_indices"),
    # dtypes
    ("crow_int64", lambda p: {"crow_indices": p.crow_indices.long()}, "crow_indices"),
    ("crow_int16", lambda p: {"crow_indices": p.crow_indices.short()}, "crow_indices"),
    ("col_int32_for_small_G", lambda p: {"col_indices": p.col_indices.int()}, "col_indices"),
    ("col_int64", lambda p: {"col_indices": p.col_indices.long()}, "col_indices"),
    ("values_int8", lambda p: {"values": p.values.to(torch.int8)}, "values"),
    ("scale_float32", lambda p: {"scale": p.scale.float()}, "scale"),
    ("scale_bfloat16", lambda p: {"scale": p.scale.bfloat16()}, "scale"),
    ("zero_point_int8", lambda p: {"zero_point": p.zero_point.to(torch.int8)}, "zero_point"),
    # shapes
    ("crow_too_short", lambda p: {"crow_indices": p.crow_indices[:-1]}, "crow_indices"),
    ("crow_too_long", lambda p: {"crow_indices": _crow([0, 3, 3, 5, 8, 8])}, "crow_indices"),
    ("col_2d", lambda p: {"col_indices": p.col_indices.reshape(NNZ, 1)}, "col_indices"),
    ("values_too_narrow", lambda p: {"values": p.values[:, :3]}, "values"),
    ("values_missing_a_row", lambda p: {"values": p.values[:-1]}, "values"),
    ("values_flat", lambda p: {"values": p.values.reshape(-1)}, "values"),
    ("scale_too_short", lambda p: {"scale": p.scale[:-1]}, "scale"),
    ("scale_2d", lambda p: {"scale": p.scale.reshape(NNZ, 1)}, "scale"),
    ("zero_point_too_long", lambda p: {"zero_point": torch.zeros(5, dtype=torch.uint8)}, "zero_point"),
    ("zero_point_unpacked", lambda p: {"zero_point": torch.zeros(NNZ, dtype=torch.uint8)}, "zero_point"),
    # scale values
    ("scale_zero", lambda p: {"scale": torch.cat([p.scale[:-1], torch.zeros(1, dtype=torch.float16)])}, "scale"),
    ("scale_negative", lambda p: {"scale": -p.scale}, "scale"),
    ("scale_nan", lambda p: {"scale": torch.where(torch.arange(NNZ) == 4, float("nan"), p.scale.float()).half()},
     "scale"),
    ("scale_inf", lambda p: {"scale": torch.where(torch.arange(NNZ) == 0, float("inf"), p.scale.float()).half()},
     "scale"),
]


@pytest.mark.parametrize(("case", "change", "tensor"), CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_validate_names_the_broken_tensor(case, change, tensor):
    bad = _with(_packed(), **change(_packed()))
    with pytest.raises(FormatError, match=re.escape(f"model.layers.3.mlp.up_proj.{tensor}")):
        bad.validate("model.layers.3.mlp.up_proj")


@pytest.mark.parametrize(
    ("changes", "word"),
    [
        ({"bits": 5}, "bits"),
        ({"bits": 1}, "bits"),
        ({"group_size": 12}, "group_size"),
        ({"group_size": 512}, "group_size"),
        ({"in_features": 36}, "in_features"),
        ({"out_features": 0}, "out_features"),
    ],
)
def test_validate_rejects_bad_metadata(changes, word):
    with pytest.raises(FormatError, match=word) as exc:
        _with(_packed(), **changes).validate("lm.q")
    assert "lm.q" in str(exc.value)


def test_validate_accepts_empty_first_and_last_rows_and_nnz_zero():
    p = _packed()
    # Rows 0 and 3 empty, rows 1-2 hold the entries.
    _with(p, crow_indices=_crow([0, 0, 4, 8, 8]), col_indices=_cols([0, 1, 2, 3, 0, 1, 2, 3])).validate()
    # A weight with no kept group at all.
    empty = _with(
        p,
        crow_indices=_crow([0, 0, 0, 0, 0]),
        col_indices=_cols([]),
        values=torch.zeros(0, 4, dtype=torch.uint8),
        scale=torch.zeros(0, dtype=torch.float16),
        zero_point=torch.zeros(0, dtype=torch.uint8),
    )
    empty.validate()
    assert not bool(empty.dequantize().any())


def test_validate_accepts_a_full_row():
    p = _packed()
    _with(p, crow_indices=_crow([0, 4, 4, 4, 8]), col_indices=_cols([0, 1, 2, 3, 0, 1, 2, 3])).validate()


def test_validate_default_name():
    with pytest.raises(FormatError, match=r"^weight\.scale"):
        _with(_packed(), scale=-_packed().scale).validate()


# ---- pack() -------------------------------------------------------------------------------------------


def _pack_inputs(bits=4):
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 2**bits, (3, 4, 8), generator=gen, dtype=torch.uint8)
    scale = torch.full((3, 4), 0.5)
    zero = torch.full((3, 4), float(2 ** (bits - 1) - 1))
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, 2] = False
    return codes, scale, zero, mask


@pytest.mark.parametrize("value", [0.1, 1e-9, 70000.0, 1.0 + 2.0**-12])
def test_pack_rejects_scales_not_representable_in_fp16(value):
    codes, scale, zero, mask = _pack_inputs()
    scale[2, 3] = value
    with pytest.raises(FormatError, match="scale"):
        PackedWeight.pack(codes, scale, zero, mask, 4)


def test_pack_rejects_float64_scale_not_representable_in_fp16():
    codes, scale, zero, mask = _pack_inputs()
    scale = scale.double()
    scale[0, 0] = 0.1
    with pytest.raises(FormatError, match="scale"):
        PackedWeight.pack(codes, scale, zero, mask, 4)


@pytest.mark.parametrize("value", [0.0, -0.5, float("nan"), float("inf"), -float("inf")])
def test_pack_rejects_non_positive_or_non_finite_scales(value):
    codes, scale, zero, mask = _pack_inputs()
    scale[0, 1] = value
    with pytest.raises(FormatError, match="scale"):
        PackedWeight.pack(codes, scale, zero, mask, 4)


@pytest.mark.parametrize(("bits", "value"), [(4, 2.5), (4, -1.0), (4, 16.0), (2, 4.0), (3, 8.0), (8, 256.0),
                                             (4, float("nan"))])
def test_pack_rejects_bad_zero_points(bits, value):
    codes, scale, zero, mask = _pack_inputs(bits)
    zero[2, 0] = value
    with pytest.raises(FormatError, match="zero_point"):
        PackedWeight.pack(codes, scale, zero, mask, bits)


def test_pack_ignores_parameters_of_pruned_groups():
    codes, scale, zero, mask = _pack_inputs()
    scale[1, 2] = float("nan")
    zero[1, 2] = -7.5
    p = PackedWeight.pack(codes, scale, zero, mask, 4)
    p.validate()
    assert p.nnz == 11


def test_pack_rejects_bad_shapes():
    codes, scale, zero, mask = _pack_inputs()
    with pytest.raises(FormatError, match="codes"):
        PackedWeight.pack(codes.reshape(3, 32), scale, zero, mask, 4)
    with pytest.raises(FormatError, match="mask"):
        PackedWeight.pack(codes, scale, zero, mask[:, :3], 4)
    with pytest.raises(FormatError, match="scale"):
        PackedWeight.pack(codes, scale[:2], zero, mask, 4)
    with pytest.raises(FormatError, match="zero_point"):
        PackedWeight.pack(codes, scale, zero[:, :3], mask, 4)


def test_pack_rejects_codes_out_of_range():
    codes, scale, zero, mask = _pack_inputs(bits=3)
    codes[0, 0, 0] = 8
    with pytest.raises(ValueError, match="3 bits"):
        PackedWeight.pack(codes, scale, zero, mask, 3)


@pytest.mark.parametrize(
    ("dtype", "value", "bits"), [(torch.int64, 259, 4), (torch.int64, -1, 8), (torch.float32, 2.7, 4)]
)
def test_pack_rejects_codes_that_are_not_uint8(dtype, value, bits):
    codes, scale, zero, mask = _pack_inputs(bits)
    codes = codes.to(dtype)
    codes[0, 0, 0] = value
    with pytest.raises(ValueError, match="codes"):
        PackedWeight.pack(codes, scale, zero, mask, bits)


def test_validate_rejects_nonzero_zero_point_padding():
    torch.manual_seed(0)
    w = torch.randn(3, 16)
    mask = torch.tensor([[True], [False], [True]])  # nnz = 2: 2 zero points of 3 bits use 6 of 8 bits
    packed = quantize_to_packed(w, mask, bits=3, group_size=16)
    packed.validate()
    packed.zero_point[-1] |= 0b1000000
    with pytest.raises(FormatError, match="zero_point: padding bits"):
        packed.validate()
