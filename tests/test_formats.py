"""Number formats: notable-value tables, hand-computed rounding, saturation, scales and packing."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from diffquant.quant.formats.affine import (
    INT4_TABLE, INT8_TABLE, UINT4_TABLE, UINT8_TABLE, choose_qparams_affine, dequantize_affine, quantize_affine,
)
from diffquant.quant.formats.blocks import from_blocks, to_blocks
from diffquant.quant.formats.e2m1 import E2M1_TABLE, E2M1_VALUES, dequantize_e2m1, quantize_e2m1
from diffquant.quant.formats.fp8 import (
    FP8_E4M3_MAX, FP8_E4M3_TABLE, FP8_E5M2_MAX, FP8_E5M2_TABLE, FP8_MAX, choose_fp8_scale, dequantize_fp8, quantize_fp8,
)
from diffquant.quant.formats.mxfp4 import E8M0_TABLE, MXFP4_SCALE_MODE, e8m0_to_float, mxfp4_dequantize, mxfp4_quantize
from diffquant.quant.formats.nvfp4 import nvfp4_dequantize, nvfp4_global_scale, nvfp4_quantize
from diffquant.quant.formats.pack import int4_to_nibbles, nibbles_to_int4, pack_nibbles, unpack_nibbles
from diffquant.quant.qtypes import QTYPES, get_qtype, magnitude_grid
from tests.helpers.granularity import reduce_for_granularity

U8 = torch.uint8


def _u8(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=U8)


def _same_float(a: float, b: float) -> bool:
    """Equal as floats, NaN equal to NaN, and -0.0 distinguished from 0.0."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


# ---------------------------------------------------------------------------------------------
# Notable-value tables: encode value -> bits and decode bits -> value for every row.


@pytest.mark.parametrize(
    ("dtype", "row"),
    [(torch.float8_e4m3fn, r) for r in FP8_E4M3_TABLE]
    + [(torch.float8_e5m2, r) for r in FP8_E5M2_TABLE],
    ids=lambda p: p[0] if isinstance(p, tuple) else str(p).removeprefix("torch."),
)
def test_fp8_table_row_encodes_and_decodes(dtype: torch.dtype, row: tuple[str, int, float]) -> None:
    _, bits, value = row
    decoded = _u8([bits]).view(dtype).float().item()
    assert _same_float(decoded, value)
    encoded = torch.tensor([value], dtype=torch.float32).to(dtype)
    if math.isnan(value):
        assert math.isnan(encoded.float().item())
    else:
        assert encoded.view(U8).item() == bits


@pytest.mark.parametrize("row", E2M1_TABLE, ids=lambda r: r[0])
def test_e2m1_table_row_encodes_and_decodes(row: tuple[str, int, float]) -> None:
    _, code, value = row
    assert quantize_e2m1(torch.tensor([value])).item() == code
    assert _same_float(dequantize_e2m1(_u8([code])).item(), value)


def test_e2m1_table_covers_all_16_codes() -> None:
    assert sorted(code for _, code, _ in E2M1_TABLE) == list(range(16))


@pytest.mark.parametrize("row", E8M0_TABLE, ids=lambda r: r[0])
def test_e8m0_table_row_decodes(row: tuple[str, int, float]) -> None:
    _, bits, value = row
    assert _same_float(e8m0_to_float(_u8([bits])).item(), value)


@pytest.mark.skipif(not hasattr(torch, "float8_e8m0fnu"), reason="torch has no float8_e8m0fnu")
@pytest.mark.parametrize("row", E8M0_TABLE, ids=lambda r: r[0])
def test_e8m0_table_row_matches_torch_e8m0(row: tuple[str, int, float]) -> None:
    _, bits, value = row
    assert _same_float(_u8([bits]).view(torch.float8_e8m0fnu).float().item(), value)
    encoded = torch.tensor([value]).to(torch.float8_e8m0fnu).view(U8).item()
    assert encoded == bits


def test_e8m0_decodes_every_byte_to_its_power_of_two() -> None:
    decoded = e8m0_to_float(torch.arange(255, dtype=U8)).double()
    expected = torch.tensor([2.0 ** (b - 127) for b in range(255)], dtype=torch.float64)
    assert torch.equal(decoded, expected)


@pytest.mark.parametrize("row", INT8_TABLE, ids=lambda r: r[0])
def test_int8_table_row_is_two_complement_byte(row: tuple[str, int, float]) -> None:
    _, bits, value = row
    assert torch.tensor([int(value)], dtype=torch.int8).view(U8).item() == bits
    assert _u8([bits]).view(torch.int8).item() == value


@pytest.mark.parametrize("row", UINT8_TABLE, ids=lambda r: r[0])
def test_uint8_table_row_is_the_byte(row: tuple[str, int, float]) -> None:
    _, bits, value = row
    assert _u8([int(value)]).item() == bits


@pytest.mark.parametrize("row", INT4_TABLE, ids=lambda r: r[0])
def test_int4_table_row_is_two_complement_nibble(row: tuple[str, int, float]) -> None:
    _, bits, value = row
    assert int4_to_nibbles(torch.tensor([int(value)])).item() == bits
    assert nibbles_to_int4(_u8([bits])).item() == value


@pytest.mark.parametrize("row", UINT4_TABLE, ids=lambda r: r[0])
def test_uint4_table_row_packs_as_its_nibble(row: tuple[str, int, float]) -> None:
    _, bits, value = row
    assert torch.equal(pack_nibbles(_u8([int(value), 0])), _u8([bits]))


# ---------------------------------------------------------------------------------------------
# Affine INT8 / UINT8 / INT4 / UINT4


def test_affine_rounds_half_to_even() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5])
    q = quantize_affine(x, torch.tensor(1.0), None, -128, 127)
    assert q.dtype == torch.int32
    assert torch.equal(q, torch.tensor([0, 2, 2, 0, -2, -2, 4], dtype=torch.int32))


def test_int8_symmetric_scale_and_saturation() -> None:
    scale, zp = choose_qparams_affine(torch.tensor(-0.5), torch.tensor(1.27), -128, 127, True)
    assert torch.equal(scale, torch.tensor(1.27) / 127)
    assert torch.equal(zp, torch.tensor(0, dtype=torch.int32))
    x = torch.tensor([1.27, -1.27, 5.0, -5.0, float("inf"), float("-inf")])
    full = quantize_affine(x, scale, zp, -128, 127)
    assert torch.equal(full, torch.tensor([127, -127, 127, -128, 127, -128], dtype=torch.int32))
    restricted = quantize_affine(x, scale, zp, -127, 127)
    expected = torch.tensor([127, -127, 127, -127, 127, -127], dtype=torch.int32)
    assert torch.equal(restricted, expected)


def test_int4_symmetric_uses_qmax_7() -> None:
    scale, _ = choose_qparams_affine(torch.tensor(-7.0), torch.tensor(3.5), -8, 7, True)
    assert torch.equal(scale, torch.tensor(1.0))
    q = quantize_affine(torch.tensor([-9.0, -7.0, 3.5, 8.0]), scale, None, -8, 7)
    assert torch.equal(q, torch.tensor([-8, -7, 4, 7], dtype=torch.int32))


def test_uint8_asymmetric_scale_zero_point_and_saturation() -> None:
    scale, zp = choose_qparams_affine(torch.tensor(-1.0), torch.tensor(3.0), 0, 255, False)
    assert torch.equal(scale, torch.tensor(4.0) / 255)
    assert torch.equal(zp, torch.tensor(64, dtype=torch.int32))  # round(63.75)
    q = quantize_affine(torch.tensor([-1.0, 0.0, 3.0, -2.0, 10.0]), scale, zp, 0, 255)
    assert torch.equal(q, torch.tensor([0, 64, 255, 0, 255], dtype=torch.int32))
    assert dequantize_affine(q, scale, zp)[1].item() == 0.0  # zero is exact


def test_asymmetric_range_is_widened_to_hold_zero() -> None:
    scale, zp = choose_qparams_affine(torch.tensor(1.0), torch.tensor(2.55), 0, 255, False)
    assert torch.equal(scale, torch.tensor(2.55) / 255)
    assert zp.item() == 0
    scale, zp = choose_qparams_affine(torch.tensor(-2.55), torch.tensor(-1.0), 0, 255, False)
    assert zp.item() == 255


def test_int8_asymmetric_saturates_at_both_ends() -> None:
    scale, zp = choose_qparams_affine(torch.tensor(0.0), torch.tensor(2.55), -128, 127, False)
    assert zp.item() == -128
    q = quantize_affine(torch.tensor([-1.0, 0.0, 2.55, 100.0]), scale, zp, -128, 127)
    assert torch.equal(q, torch.tensor([-128, -128, 127, 127], dtype=torch.int32))


def test_affine_nan_input_maps_to_the_zero_point() -> None:
    q = quantize_affine(torch.tensor([float("nan")]), torch.tensor(0.1), torch.tensor(3), 0, 15)
    assert q.item() == 3


@pytest.mark.parametrize(
    ("qmin", "qmax", "symmetric"),
    [(-128, 127, True), (-128, 127, False), (0, 255, False), (-8, 7, True), (0, 15, False)],
)
def test_affine_all_zero_input_gives_scale_one_and_exact_zeros(
    qmin: int, qmax: int, symmetric: bool
) -> None:
    x = torch.zeros(3, 8)
    lo = reduce_for_granularity(x, "per_channel", reduce="min")
    hi = reduce_for_granularity(x, "per_channel", reduce="max")
    scale, zp = choose_qparams_affine(lo, hi, qmin, qmax, symmetric)
    assert torch.equal(scale, torch.ones(3, 1))
    x_hat = dequantize_affine(quantize_affine(x, scale, zp, qmin, qmax), scale, zp)
    assert torch.equal(x_hat, x)


def test_tiny_range_gets_a_finite_normal_scale() -> None:
    scale, _ = choose_qparams_affine(torch.tensor(0.0), torch.tensor(1e-40), -128, 127, True)
    assert scale.item() == torch.finfo(torch.float32).tiny
    q = quantize_affine(torch.tensor([1e-40]), scale, None, -128, 127)
    assert q.item() == 0


def test_affine_rejects_symmetric_unsigned_and_bad_ranges() -> None:
    with pytest.raises(ValueError, match="signed code range"):
        choose_qparams_affine(torch.tensor(-1.0), torch.tensor(1.0), 0, 255, True)
    with pytest.raises(ValueError, match="qmin must be below qmax"):
        quantize_affine(torch.ones(2), torch.tensor(1.0), None, 7, -8)
    with pytest.raises(ValueError, match="NaN or inf"):
        choose_qparams_affine(torch.tensor(float("nan")), torch.tensor(1.0), -8, 7, True)
    with pytest.raises(ValueError, match="same shape"):
        choose_qparams_affine(torch.zeros(2), torch.zeros(3), -8, 7, True)


# ---------------------------------------------------------------------------------------------
# Blocks and granularities


def test_granularity_shapes_for_a_linear_weight() -> None:
    w = torch.arange(4 * 64, dtype=torch.float32).reshape(4, 64) - 100
    assert reduce_for_granularity(w, "per_tensor").shape == torch.Size([])
    assert reduce_for_granularity(w, "per_channel").shape == torch.Size([4, 1])
    assert reduce_for_granularity(w, "per_group", 16).shape == torch.Size([4, 4, 1])
    assert reduce_for_granularity(w, "per_tensor").item() == 155.0
    assert torch.equal(
        reduce_for_granularity(w, "per_channel", reduce="min"),
        torch.tensor([[-100.0], [-36.0], [28.0], [92.0]]),
    )
    assert reduce_for_granularity(w, "per_group", 16, reduce="max")[0, :, 0].tolist() == [
        -85.0, -69.0, -53.0, -37.0,
    ]  # fmt: skip


def test_granularity_flattens_conv_weights_to_out_by_k() -> None:
    w = torch.randn(4, 2, 3, 3)
    assert reduce_for_granularity(w, "per_channel").shape == torch.Size([4, 1])
    assert reduce_for_granularity(w, "per_group", 6).shape == torch.Size([4, 3, 1])


def test_per_group_int4_round_trip_uses_broadcast_shapes() -> None:
    w = torch.linspace(-3.0, 5.0, 2 * 32).reshape(2, 32)
    amax = reduce_for_granularity(w, "per_group", 8)
    scale, zp = choose_qparams_affine(-amax, amax, -8, 7, True)
    assert scale.shape == zp.shape == torch.Size([2, 4, 1])
    q = quantize_affine(to_blocks(w, 8), scale, zp, -8, 7)
    w_hat = from_blocks(dequantize_affine(q, scale, zp))
    assert w_hat.shape == w.shape
    assert (w_hat - w).abs().max() <= scale.max() / 2 + 1e-6


def test_blocks_round_trip_and_reject_bad_sizes() -> None:
    x = torch.arange(24.0).reshape(2, 12)
    assert to_blocks(x, 4).shape == torch.Size([2, 3, 4])
    assert torch.equal(from_blocks(to_blocks(x, 4)), x)
    with pytest.raises(ValueError, match="K=12 is not a multiple of the block size 5"):
        to_blocks(x, 5)
    with pytest.raises(ValueError, match="positive int"):
        to_blocks(x, 0)
    with pytest.raises(ValueError, match="granularity 'per_row'"):
        reduce_for_granularity(x, "per_row")
    with pytest.raises(ValueError, match="needs a group_size"):
        reduce_for_granularity(x, "per_group")
    with pytest.raises(ValueError, match="only allowed with granularity 'per_group'"):
        reduce_for_granularity(x, "per_channel", 4)


# ---------------------------------------------------------------------------------------------
# FP8


@pytest.mark.parametrize(
    ("dtype", "fp8_max", "overflow"),
    [(torch.float8_e4m3fn, 448.0, 1e4), (torch.float8_e5m2, 57344.0, 1e5)],
)
def test_fp8_saturates_overflow_and_inf_and_keeps_nan(
    dtype: torch.dtype, fp8_max: float, overflow: float
) -> None:
    x = torch.tensor([overflow, 1e6, float("inf"), -overflow, float("-inf")])
    q = quantize_fp8(x, torch.tensor(1.0), dtype).float()
    expected = torch.tensor([fp8_max, fp8_max, fp8_max, -fp8_max, -fp8_max])
    assert torch.equal(q, expected)
    nan = quantize_fp8(torch.tensor([float("nan")]), torch.tensor(1.0), dtype)
    assert torch.isnan(nan.float()).all()


@pytest.mark.parametrize(
    ("dtype", "fp8_max", "max_byte", "exponent_bias", "mantissa_bits"),
    [(torch.float8_e4m3fn, FP8_E4M3_MAX, 0x7E, 7, 3), (torch.float8_e5m2, FP8_E5M2_MAX, 0x7B, 15, 2)],
)
def test_fp8_max_constants_are_the_largest_finite_encodings(dtype, fp8_max, max_byte, exponent_bias, mantissa_bits) -> None:
    # The largest finite byte decoded by hand: E4M3FN 0_1111_110 = 2^(15-7) * (1 + 6/8) = 448,
    # E5M2 0_11110_11 = 2^(30-15) * (1 + 3/4) = 57344 (OCP FP8 spec, Table 1).
    exponent = (max_byte >> mantissa_bits) & ((1 << (7 - mantissa_bits)) - 1)
    mantissa = max_byte & ((1 << mantissa_bits) - 1)
    by_hand = 2.0 ** (exponent - exponent_bias) * (1 + mantissa / (1 << mantissa_bits))
    assert fp8_max == by_hand == torch.finfo(dtype).max
    assert FP8_MAX[dtype] == fp8_max
    decoded = torch.tensor([max_byte, max_byte + 1], dtype=torch.uint8).view(dtype).float()
    assert decoded[0].item() == fp8_max and not torch.isfinite(decoded[1])  # the next byte is NaN (E4M3FN) / inf (E5M2)


def test_fp8_e4m3_rounds_to_nearest_even_after_scaling() -> None:
    x = torch.tensor([2.125, 2.375, 2.625])  # / 2 -> ties 1.0625, 1.1875, 1.3125
    q = quantize_fp8(x, torch.tensor(2.0), torch.float8_e4m3fn)
    assert torch.equal(q.float(), torch.tensor([1.0, 1.25, 1.25]))
    assert torch.equal(dequantize_fp8(q, torch.tensor(2.0)), torch.tensor([2.0, 2.5, 2.5]))


def test_fp8_scale_maps_amax_to_max_per_channel() -> None:
    w = torch.tensor([[896.0, -1.0], [0.5, -44.8]])
    scale = choose_fp8_scale(reduce_for_granularity(w, "per_channel"), torch.float8_e4m3fn)
    assert torch.equal(scale, torch.tensor([[2.0], [44.8 / 448.0]]))
    q = quantize_fp8(w, scale, torch.float8_e4m3fn)
    assert q.float()[0, 0].item() == 448.0
    assert q.float()[1, 1].item() == -448.0


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_all_zero_gives_scale_one_and_exact_zeros(dtype: torch.dtype) -> None:
    x = torch.zeros(2, 4)
    scale = choose_fp8_scale(reduce_for_granularity(x, "per_tensor"), dtype)
    assert torch.equal(scale, torch.tensor(1.0))
    assert torch.equal(dequantize_fp8(quantize_fp8(x, scale, dtype), scale), x)


def test_fp8_rejects_other_dtypes_and_bad_amax() -> None:
    with pytest.raises(ValueError, match="float8_e4m3fn or torch.float8_e5m2"):
        quantize_fp8(torch.ones(2), torch.tensor(1.0), torch.float16)
    with pytest.raises(ValueError, match="finite and >= 0"):
        choose_fp8_scale(torch.tensor(float("inf")), torch.float8_e4m3fn)


# ---------------------------------------------------------------------------------------------
# E2M1


def test_e2m1_ties_go_to_the_even_code() -> None:
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    expected = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0])
    assert torch.equal(dequantize_e2m1(quantize_e2m1(ties)), expected)
    assert torch.equal(dequantize_e2m1(quantize_e2m1(-ties)), -expected)


def test_e2m1_rounds_off_tie_values_to_nearest() -> None:
    x = torch.tensor([0.2500001, 0.7499999, 1.3, 2.49, 2.51, 4.9, 5.01, 0.1, -0.1])
    expected = torch.tensor([0.5, 0.5, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.0])
    assert torch.equal(dequantize_e2m1(quantize_e2m1(x)), expected)
    assert quantize_e2m1(torch.tensor([-0.1])).item() == 8  # sign kept: -0


def test_e2m1_matches_brute_force_nearest_with_even_ties() -> None:
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    midpoints = (grid[1:] + grid[:-1]) / 2
    mag = torch.cat([torch.linspace(0.0, 7.0, 28001, dtype=torch.float64), midpoints])
    dist = (mag[:, None] - grid[None, :]).abs()
    # Among equally near codes, prefer the even one, then the lower one.
    odd = (torch.arange(8) % 2).to(torch.float64)
    expected = torch.argmin(torch.where(dist == dist.min(1, keepdim=True).values, odd, 9.0), dim=1)
    assert torch.equal(quantize_e2m1(mag).long(), expected)
    assert torch.equal(quantize_e2m1(-mag).long(), expected + 8)


def test_e2m1_saturates_and_maps_nan_to_code_7() -> None:
    x = torch.tensor([6.0, 6.5, 100.0, float("inf"), -7.0, float("-inf"), float("nan")])
    assert torch.equal(quantize_e2m1(x), _u8([7, 7, 7, 7, 15, 15, 7]))


def test_e2m1_is_exact_in_float64_and_bfloat16() -> None:
    x64 = torch.tensor([0.25 + 1e-12, 0.25], dtype=torch.float64)  # float32 would round to 0.25
    assert torch.equal(quantize_e2m1(x64), _u8([1, 0]))
    xbf = torch.tensor([1.75, -3.5, 5.0], dtype=torch.bfloat16)
    assert torch.equal(quantize_e2m1(xbf), _u8([4, 14, 6]))


def test_e2m1_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="floating tensor"):
        quantize_e2m1(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        dequantize_e2m1(_u8([16]))


# ---------------------------------------------------------------------------------------------
# MXFP4


def _mx_block(amax: float) -> torch.Tensor:
    block = torch.zeros(32)
    block[3] = amax
    return block


@pytest.mark.parametrize(
    ("amax", "shared_exp"),
    [
        (4.0, 0), (8.0, 1), (6.0, 0), (7.99, 0), (3.99, -1), (1.0, -2),
        (2.0**-20, -22), (2.0**100, 98), (1e-40, -127),
    ],  # fmt: skip
)
def test_mxfp4_shared_exponent_is_floor_log2_minus_2(amax: float, shared_exp: int) -> None:
    _, scale = mxfp4_quantize(_mx_block(amax))
    assert scale.tolist() == [shared_exp + 127]


def test_mxfp4_element_above_6_times_scale_saturates() -> None:
    codes, scale = mxfp4_quantize(_mx_block(7.99))
    assert scale.item() == 127 and codes[3].item() == 7
    assert mxfp4_dequantize(codes, scale)[3].item() == 6.0


def test_mxfp4_hand_computed_block() -> None:
    x = torch.zeros(2, 32)
    x[0, :4] = torch.tensor([12.0, -5.0, 1.0, 3.0])  # amax 12 -> floor(log2) 3 -> exp 1, X = 2
    x[1, :3] = torch.tensor([0.75, -0.3, 0.1])  # amax 0.75 -> floor(log2) -1 -> exp -3, X = 1/8
    codes, scale = mxfp4_quantize(x)
    assert torch.equal(scale, _u8([[128], [124]]))
    # 12/2 = 6, -5/2 = -2.5 -> -2 (tie), 1/2 = 0.5, 3/2 = 1.5; 6, -2.4 -> -2, 0.8 -> 1
    assert codes[0, :4].tolist() == [7, 12, 1, 3]
    assert codes[1, :3].tolist() == [7, 12, 2]
    x_hat = mxfp4_dequantize(codes, scale)
    assert x_hat[0, :4].tolist() == [12.0, -4.0, 1.0, 3.0]
    assert x_hat[1, :3].tolist() == [0.75, -0.25, 0.125]


def test_mxfp4_all_zero_block_gets_byte_0_and_exact_zeros() -> None:
    x = torch.zeros(3, 64)
    codes, scale = mxfp4_quantize(x)
    assert torch.equal(scale, torch.zeros(3, 2, dtype=U8))
    assert torch.equal(codes, torch.zeros(3, 64, dtype=U8))
    assert torch.equal(mxfp4_dequantize(codes, scale), x)


def test_mxfp4_non_finite_block_gets_nan_scale() -> None:
    x = torch.ones(2, 32)
    x[1, 5] = float("nan")
    codes, scale = mxfp4_quantize(x)
    assert scale.tolist() == [[125], [255]]
    x_hat = mxfp4_dequantize(codes, scale)
    assert torch.isnan(x_hat[1]).all() and torch.equal(x_hat[0], torch.ones(32))


def test_mxfp4_tiny_block_clamps_exponent_to_minus_127() -> None:
    x = _mx_block(2.0**-140)
    codes, scale = mxfp4_quantize(x)
    assert scale.item() == 0
    assert torch.equal(mxfp4_dequantize(codes, scale), torch.zeros(32))  # 2^-13 of the scale -> 0


def test_mxfp4_records_scale_mode_and_rejects_bad_shapes() -> None:
    assert MXFP4_SCALE_MODE == "floor"
    with pytest.raises(ValueError, match="K=48 is not a multiple of the block size 32"):
        mxfp4_quantize(torch.ones(48))
    with pytest.raises(ValueError, match="do not match"):
        mxfp4_dequantize(torch.zeros(64, dtype=U8), torch.zeros(1, dtype=U8))


# ---------------------------------------------------------------------------------------------
# NVFP4


def test_affine_asymmetric_span_wider_than_float32_max_stays_finite() -> None:
    # (3e38 - -3e38) overflows float32; the scale is 3e38/255 - -3e38/255 = 2 * (3e38/255).
    scale, zero_point = choose_qparams_affine(torch.tensor(-3e38), torch.tensor(3e38), -128, 127, False)
    assert torch.equal(scale, torch.tensor(3e38) / 255 * 2)
    assert abs(scale.item() - 6e38 / 255) <= 6e38 / 255 * 2.0**-22
    assert zero_point.item() == 0  # -128 - round(-3e38 / s) = -128 - round(-127.5) = 0
    x = torch.tensor([-3e38, 0.0, 3e38])
    x_hat = dequantize_affine(quantize_affine(x, scale, zero_point, -128, 127), scale, zero_point)
    assert torch.isfinite(x_hat).all() and x_hat[1].item() == 0.0
    # half a step, plus one float32 ulp at 2^127 (2^104) from rounding q * s
    assert (x_hat.double() - x.double()).abs().max().item() <= scale.item() / 2 + 2.0**104


def test_nvfp4_global_scale_is_amax_over_2688() -> None:
    assert torch.equal(nvfp4_global_scale(torch.tensor(5376.0)), torch.tensor(2.0))
    assert torch.equal(nvfp4_global_scale(torch.tensor(0.0)), torch.tensor(1.0))
    with pytest.raises(ValueError, match="finite and >= 0"):
        nvfp4_global_scale(torch.tensor(-1.0))


def test_nvfp4_two_level_scales_match_hand_computation() -> None:
    x = torch.zeros(3, 16)
    x[0, :2] = torch.tensor([5376.0, -1000.0])  # tensor amax -> global 2.0; block 5376/12 = 448
    x[1, :3] = torch.tensor([30.0, 12.5, -7.5])  # 30/12 = 2.5 (exact in E4M3); step 5
    x[2, :2] = torch.tensor([31.0, -3.0])  # 31/12 = 2.583 -> E4M3 2.5; 31/5 = 6.2 saturates
    global_scale = nvfp4_global_scale(reduce_for_granularity(x, "per_tensor"))
    assert global_scale.item() == 2.0
    codes, block_scale = nvfp4_quantize(x, global_scale)
    assert block_scale.dtype == torch.float8_e4m3fn
    assert torch.equal(block_scale.float(), torch.tensor([[448.0], [2.5], [2.5]]))
    # row 0: step 896: 6 -> 7, -1000/896 = -1.116 -> -1 (code 10)
    # row 1: 6 -> 7, 2.5 -> 2 (tie, code 4), -1.5 -> code 11; row 2: 6.2 -> 7, -0.6 -> -0.5 (9)
    assert codes[0, :2].tolist() == [7, 10]
    assert codes[1, :3].tolist() == [7, 4, 11]
    assert codes[2, :2].tolist() == [7, 9]
    x_hat = nvfp4_dequantize(codes, block_scale, global_scale)
    assert x_hat[0, :2].tolist() == [5376.0, -896.0]
    assert x_hat[1, :3].tolist() == [30.0, 10.0, -7.5]
    assert x_hat[2, :2].tolist() == [30.0, -2.5]


def test_nvfp4_all_zero_gives_block_scale_one_and_exact_zeros() -> None:
    x = torch.zeros(2, 32)
    global_scale = nvfp4_global_scale(reduce_for_granularity(x, "per_tensor"))
    codes, block_scale = nvfp4_quantize(x, global_scale)
    assert torch.equal(global_scale, torch.tensor(1.0))
    assert torch.equal(block_scale.float(), torch.ones(2, 2))
    assert torch.equal(codes, torch.zeros(2, 32, dtype=U8))
    assert torch.equal(nvfp4_dequantize(codes, block_scale, global_scale), x)


def test_nvfp4_underflowing_block_scale_clamps_to_2_pow_minus_9_like_modelopt() -> None:
    # global scale 2688 / 2688 = 1; row 1's ratio 6 * 2^-10 / 6 = 2^-10 rounds (ties-to-even) to
    # 0 in E4M3; ModelOpt clamps it to 2^-9, so 6 * 2^-10 / 2^-9 = 3.0 is code 5.
    x = torch.zeros(2, 16)
    x[0, 0] = 2688.0
    x[1, 0] = 6 * 2.0**-10
    global_scale = nvfp4_global_scale(x.abs().amax())
    codes, block_scale = nvfp4_quantize(x, global_scale)
    assert block_scale.float().flatten().tolist() == [448.0, 2.0**-9]
    assert codes[:, 0].tolist() == [7, 5]
    assert nvfp4_dequantize(codes, block_scale, global_scale)[1, 0].item() == 6 * 2.0**-10
    # far below the floor: still 2^-9, the value rounds to code 0 (1e-4 / 2^-9 = 0.0512 < 0.25)
    x[1, 0] = 1e-4
    codes, block_scale = nvfp4_quantize(x, global_scale)
    assert block_scale.float()[1].item() == 2.0**-9 and codes[1, 0].item() == 0


def test_nvfp4_negative_zero_is_code_0_and_small_negatives_keep_the_sign() -> None:
    x = torch.zeros(1, 16)
    x[0, 0] = 2688.0
    x[0, 1] = -0.0
    x[0, 2] = -1.0  # -1 / 448 rounds to zero in E2M1: code 8, as ModelOpt's sign = (x < 0)
    codes, _ = nvfp4_quantize(x, nvfp4_global_scale(torch.tensor(2688.0)))
    assert codes[0, :3].tolist() == [7, 0, 8]
    assert pack_nibbles(codes)[0, 0].item() == 0x07


def test_nvfp4_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="do not match"):
        nvfp4_dequantize(
            torch.zeros(32, dtype=U8), torch.ones(1).to(torch.float8_e4m3fn), torch.tensor(1.0)
        )


# ---------------------------------------------------------------------------------------------
# Packing


def test_pack_puts_the_even_index_in_the_low_nibble() -> None:
    assert torch.equal(pack_nibbles(_u8([1, 2, 3, 4])), _u8([0x21, 0x43]))
    assert torch.equal(unpack_nibbles(_u8([0x21, 0x43])), _u8([1, 2, 3, 4]))


def test_pack_unpack_round_trip_keeps_leading_dims() -> None:
    codes = torch.randint(0, 16, (3, 2, 10), dtype=U8, generator=torch.Generator().manual_seed(0))
    packed = pack_nibbles(codes)
    assert packed.shape == torch.Size([3, 2, 5])
    assert torch.equal(unpack_nibbles(packed), codes)


def test_int4_two_complement_round_trip() -> None:
    q = torch.arange(-8, 8, dtype=torch.int32)
    nibbles = int4_to_nibbles(q)
    assert nibbles.tolist() == [8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7]
    assert torch.equal(nibbles_to_int4(unpack_nibbles(pack_nibbles(nibbles))), q.to(torch.int8))


def test_e2m1_codes_survive_packing() -> None:
    x = torch.tensor([[0.5, -6.0, 3.0, -0.0, 1.5, 4.0]])
    codes = quantize_e2m1(x)
    assert torch.equal(dequantize_e2m1(unpack_nibbles(pack_nibbles(codes))), x)


def test_pack_rejects_odd_k_out_of_range_and_wrong_dtype() -> None:
    with pytest.raises(ValueError, match="even last dim"):
        pack_nibbles(_u8([1, 2, 3]))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_nibbles(_u8([1, 16]))
    with pytest.raises(ValueError, match="uint8"):
        pack_nibbles(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        int4_to_nibbles(torch.tensor([8]))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        nibbles_to_int4(_u8([16]))


# ---------------------------------------------------------------------------------------------
# QTypes


def test_registry_holds_the_eight_types_under_their_names() -> None:
    assert set(QTYPES) == {
        "int8", "uint8", "int4", "uint4", "fp8_e4m3", "fp8_e5m2", "mxfp4", "nvfp4",
    }  # fmt: skip
    assert all(qt.name == name for name, qt in QTYPES.items())


@pytest.mark.parametrize(
    ("name", "qmin", "qmax", "storage", "block", "packed"),
    [
        ("int8", -128, 127, torch.int8, None, False),
        ("uint8", 0, 255, torch.uint8, None, False),
        ("int4", -8, 7, torch.uint8, None, True),
        ("uint4", 0, 15, torch.uint8, None, True),
        ("fp8_e4m3", -448.0, 448.0, torch.float8_e4m3fn, None, False),
        ("fp8_e5m2", -57344.0, 57344.0, torch.float8_e5m2, None, False),
        ("mxfp4", -6.0, 6.0, torch.uint8, 32, True),
        ("nvfp4", -6.0, 6.0, torch.uint8, 16, True),
    ],
)
def test_qtype_fields(
    name: str, qmin: float, qmax: float, storage: torch.dtype, block: int | None, packed: bool
) -> None:
    qt = get_qtype(name)
    assert (qt.qmin, qt.qmax, qt.storage_dtype, qt.block_size, qt.packed) == (
        qmin, qmax, storage, block, packed,
    )  # fmt: skip
    assert qt.bits == (4 if packed else 8) and qt.packed == (qt.bits == 4)
    assert qt.signed == (qmin < 0)
    if qt.is_floating_point:
        # The range is the element format's largest finite value, and every magnitude fits in it.
        grid = magnitude_grid(qt)
        assert -qt.qmin == qt.qmax == grid.max().item()
        element_max = torch.finfo(storage).max if not packed else max(E2M1_VALUES)
        assert qt.qmax == element_max
    else:
        # Two's complement (signed) or plain binary (unsigned) codes of `bits` bits.
        assert (qt.qmin, qt.qmax) == ((-(2 ** (qt.bits - 1)), 2 ** (qt.bits - 1) - 1) if qt.signed else (0, 2**qt.bits - 1))
        if not packed:  # the codes are stored as they are
            assert (torch.iinfo(storage).min, torch.iinfo(storage).max) == (qt.qmin, qt.qmax)
    if packed:
        # Two codes per byte: every code of the range survives a pack / unpack round trip.
        codes = torch.arange(int(qt.qmin), int(qt.qmax) + 1) if not qt.is_floating_point else torch.arange(16)
        nibbles = int4_to_nibbles(codes) if qt.signed and not qt.is_floating_point else codes.to(torch.uint8)
        row = nibbles.reshape(1, -1)
        assert pack_nibbles(row).dtype == storage and pack_nibbles(row).shape == (1, 8)
        assert torch.equal(unpack_nibbles(pack_nibbles(row)), row)


def test_qtype_scale_dtypes_and_is_frozen() -> None:
    assert get_qtype("mxfp4").scale_dtype == torch.uint8
    assert get_qtype("nvfp4").scale_dtype == torch.float8_e4m3fn
    assert get_qtype("nvfp4").has_global_scale and not get_qtype("mxfp4").has_global_scale
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_qtype("int8").bits = 7  # type: ignore[misc]


def test_get_qtype_lists_allowed_names() -> None:
    with pytest.raises(ValueError, match="unknown qtype 'int3'; allowed: int8, uint8"):
        get_qtype("int3")


def test_magnitude_grids() -> None:
    assert torch.equal(magnitude_grid(get_qtype("int8")), torch.arange(128, dtype=torch.float32))
    assert torch.equal(magnitude_grid(get_qtype("int4")), torch.arange(8, dtype=torch.float32))
    assert torch.equal(magnitude_grid(get_qtype("uint4")), torch.arange(16, dtype=torch.float32))
    e2m1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    assert torch.equal(magnitude_grid(get_qtype("mxfp4")), e2m1)
    assert torch.equal(magnitude_grid(get_qtype("nvfp4")), e2m1)
    fp8_cases = [("fp8_e4m3", 127, 448.0, 2.0**-9), ("fp8_e5m2", 124, 57344.0, 2.0**-16)]
    for name, count, top, bottom in fp8_cases:
        grid = magnitude_grid(get_qtype(name))
        assert grid.dtype == torch.float32 and grid.numel() == count
        assert grid[0].item() == 0.0 and grid[1].item() == bottom and grid[-1].item() == top
        assert bool((grid[1:] > grid[:-1]).all())
