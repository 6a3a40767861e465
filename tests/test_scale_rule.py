"""scale_rule: half_span (AMD Quark's symmetric integer scale, amax / ((qmax - qmin) / 2)), opt-in."""

from __future__ import annotations

import pytest
import torch

from diffquant.quant.errors import ConfigError
from diffquant.quant.formats.affine import choose_qparams_affine, dequantize_affine, quantize_affine
from diffquant.quant.spec import TensorSpec
from diffquant.quant.weights import quantize_weight_in_range
from diffquant.quant.quantizer import quantize_weight_with_observer


def test_half_span_scale_is_amax_over_7_5_for_int4_and_127_5_for_int8():
    lo, hi = torch.tensor([-3.0, -1.0]), torch.tensor([1.0, 7.5])
    s4, zp4 = choose_qparams_affine(lo, hi, -8, 7, True, "half_span")
    assert s4.tolist() == [torch.tensor(3.0 / 7.5).item(), 1.0] and zp4.tolist() == [0, 0]  # 3 / 7.5, 7.5 / 7.5
    s8, _ = choose_qparams_affine(lo, hi, -128, 127, True, "half_span")
    assert s8.tolist() == [torch.tensor(3.0 / 127.5).item(), torch.tensor(7.5 / 127.5).item()]
    default, _ = choose_qparams_affine(lo, hi, -8, 7, True)
    assert default.tolist() == [torch.tensor(3.0 / 7).item(), torch.tensor(7.5 / 7).item()]


def test_half_span_codes_use_minus_8_and_saturate_plus_amax_to_7():
    x = torch.tensor([-7.5, -7.0, -0.5, 0.5, 1.5, 7.0, 7.5])
    scale, _ = choose_qparams_affine(x.amin(), x.amax(), -8, 7, True, "half_span")
    assert float(scale) == 1.0
    codes = quantize_affine(x, scale, None, -8, 7)
    assert codes.tolist() == [-8, -7, 0, 0, 2, 7, 7]  # half to even; +7.5 -> 8 saturates to 7
    assert dequantize_affine(codes, scale, None).tolist() == [-8.0, -7.0, 0.0, 0.0, 2.0, 7.0, 7.0]


def test_unknown_rule_and_bad_specs_are_refused():
    with pytest.raises(ValueError, match="scale_rule"):
        choose_qparams_affine(torch.tensor(-1.0), torch.tensor(1.0), -8, 7, True, "half")
    with pytest.raises(ConfigError, match="symmetric integer"):
        TensorSpec("fp8_e4m3", scale_rule="half_span")
    with pytest.raises(ConfigError, match="symmetric integer"):
        TensorSpec("uint8", symmetric=False, scale_rule="half_span")
    with pytest.raises(ConfigError, match="per_token.*needs dynamic scales"):
        TensorSpec("int8", "per_token", scale_rule="half_span")
    with pytest.raises(ConfigError, match="per_channel is a weight's.*use granularity: per_token"):
        TensorSpec("int8", "per_channel", dynamic=True)  # it used to mean per tensor, silently
    with pytest.raises(ConfigError, match="half_even_reciprocal applies to dynamic integer inputs, not int8 static"):
        TensorSpec("int8", rounding="half_even_reciprocal")
    with pytest.raises(ConfigError, match="half_even_reciprocal applies to dynamic integer inputs, not fp8_e4m3 dynamic"):
        TensorSpec("fp8_e4m3", dynamic=True, rounding="half_even_reciprocal")
    with pytest.raises(ConfigError, match="scale_rule"):
        TensorSpec("int4", scale_rule="amax")


def test_default_rule_is_left_out_of_the_spec_dict_and_half_span_round_trips():
    assert "scale_rule" not in TensorSpec("int4", granularity="per_group", group_size=64).to_dict()
    spec = TensorSpec("int4", granularity="per_group", group_size=64, scale_rule="half_span")
    assert TensorSpec.from_dict(spec.to_dict()) == spec


def test_half_span_minus_amax_code_follows_the_rounded_quotient():
    """x = -amax lands within an ulp of -7.5: s = fl(amax / 7.5) is rounded, so the code is -8 or -7
    by the float32 quotient (module docstring). By hand: amax = fl(0.3) = 0.30000001192, amax / 7.5 =
    0.04000000159 rounds up to s = 0x3D23D70B = 0.04000000283; amax / s = 7.49999977 is within half
    an ulp (2^-22) of 7.5 -> 7.5 -> code -8 (half to even). amax = 1.0: s = 0x3E088889 = 0.13333334,
    1 / s = 7.49999961 rounds to 7.5 - 2^-21 = 7.4999995 -> code -7."""
    for amax, s_bits, quotient, code in ((0.3, 0x3D23D70B, -7.5, -8), (1.0, 0x3E088889, -7.499999523162842, -7)):
        x = torch.tensor([-amax, amax / 2, amax / 7.5], dtype=torch.float32)
        scale, _ = choose_qparams_affine(x.amin(), x.amax().clamp_min(0), -8, 7, True, "half_span")
        assert scale.view(torch.int32).item() == s_bits  # fl(amax / 7.5), checked by hand
        assert float(x[0] / scale) == quotient
        codes = quantize_affine(x, scale, None, -8, 7)
        assert codes[0].item() == code and codes[2].item() == 1
        # code * s is exact in float64 (3 x 24 bits), so one rounding to float32 is the float32 product
        assert dequantize_affine(codes, scale, None)[0].item() == torch.tensor(code * scale.item(), dtype=torch.float32).item()


def _half_span_g64(x: torch.Tensor, reciprocal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent per-group-64 amax / 7.5 fake-quant: (dequantized, codes), x / s or Quark's x * (1 / s)."""
    groups = x.float().reshape(-1, 64)
    amax = groups.abs().amax(1, keepdim=True)
    s = amax / 7.5
    q = torch.clamp(torch.round(groups * (1.0 / s) if reciprocal else groups / s), -8, 7)
    return (q * s).reshape(x.shape), q.reshape(x.shape)


def test_half_span_weight_differs_from_quark_only_by_x_times_reciprocal():
    """Quark 0.13's per-group INT4 min_max fake quantizer computes the same scale, amax / 7.5, but
    round(x * (1 / s)) (hw_emulation_interface.py, `fake_quantize_per_channel_affine`) where diffquant
    rounds x / s. Each tool equals its formula bit for bit; every differing code is a group's -amax
    element, -8 against -7 or the reverse."""
    pytest.importorskip("quark")
    from quark.torch.quantization.config.config import Int4PerGroupSpec
    from quark.torch.quantization.tensor_quantize import FakeQuantizeBase as FakeQuantize

    torch.manual_seed(0)
    w = torch.randn(64, 128)
    qspec = Int4PerGroupSpec(ch_axis=-1, group_size=64, symmetric=True,
                             scale_type="float", round_method="half_even", is_dynamic=False).to_quantization_spec()
    fq = FakeQuantize.get_fake_quantize(qspec)
    fq.enable_observer()
    fq.enable_fake_quant()
    theirs = fq(w)
    spec = TensorSpec("int4", granularity="per_group", group_size=64, scale_rule="half_span")
    ours = quantize_weight_with_observer(w, spec).dequantize(torch.float32)
    by_division, codes_division = _half_span_g64(w, reciprocal=False)
    by_reciprocal, codes_reciprocal = _half_span_g64(w, reciprocal=True)
    assert torch.equal(ours, by_division) and torch.equal(theirs, by_reciprocal)
    differ = codes_division != codes_reciprocal
    assert 0 < int(differ.sum()) < w.numel() // 64  # some groups, and (next line) only their -amax element
    assert torch.equal(w.reshape(-1, 64)[differ.reshape(-1, 64)], -w.reshape(-1, 64).abs().amax(1)[differ.reshape(-1, 64).any(1)])
    assert set(zip(codes_division[differ].tolist(), codes_reciprocal[differ].tolist())) <= {(-8.0, -7.0), (-7.0, -8.0)}


def test_half_span_lowers_int4_weight_error_on_gaussian_weights():
    torch.manual_seed(1)
    w = torch.randn(256, 512)
    errors = {}
    for rule in ("qmax", "half_span"):
        spec = TensorSpec("int4", granularity="per_group", group_size=64, scale_rule=rule)
        errors[rule] = float((quantize_weight_with_observer(w, spec).dequantize(torch.float32) - w).pow(2).mean())
    # the finer step (7 / 7.5) lowers the rounding noise by ~(7/7.5)^2 = 0.87; the one saturated code costs little
    assert errors["half_span"] < 0.93 * errors["qmax"]


def test_torchao_dynamic_int8_rule_by_hand():
    """int8_dynamic's inputs (torchao's per-token rule): s = bf16-nearest(amax / 127.5), codes
    round_half_even(x · fl(1 / s)). amax = 1.8671875: 1.8671875 / 127.5 = 0.014644608 rounds to the
    bf16 value 15 / 1024 = 0.0146484375; x = 0.03662109375 = 2.5 s exactly, so x / s = 2.5 -> code 2
    (half to even) while fl(1 / s) = fl(1024 / 15) = 68.26667 rounds up and x · fl(1 / s) =
    2.5000002 -> code 3, torchao's code; amax / s = 127.47 -> 127."""
    from diffquant.quant.kernels.gemm import dynamic_int8_scale, quantize_int8
    from diffquant.quant.weights import fake_quantize_input

    spec = TensorSpec("int8", "per_token", dynamic=True, scale_rule="half_span", rounding="half_even_reciprocal", scale_dtype="bfloat16")
    x = torch.tensor([[1.8671875, 0.03662109375, -0.03662109375], [0.0, 0.0, 0.0]], dtype=torch.bfloat16)
    scale = dynamic_int8_scale(x, spec)
    assert scale.flatten().tolist() == [15 / 1024, 1.0]  # an all-zero token: codes 0 whatever its scale
    assert quantize_int8(x, scale, reciprocal=True).tolist() == [[127, 3, -3], [0, 0, 0]]
    assert quantize_int8(x, scale).tolist() == [[127, 2, -2], [0, 0, 0]]
    expected = torch.tensor([[127 * 15 / 1024, 3 * 15 / 1024, -3 * 15 / 1024], [0, 0, 0]]).to(torch.bfloat16)
    assert torch.equal(fake_quantize_input(x, spec, None), expected)
    # float32 scales and division: the half_span rule the static INT8 recipes use, no bf16 rounding
    plain = TensorSpec("int8", "per_token", dynamic=True, scale_rule="half_span")
    assert dynamic_int8_scale(x.float(), plain)[0].item() == torch.tensor(1.8671875 / 127.5).item()
