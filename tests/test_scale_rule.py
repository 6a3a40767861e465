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
    with pytest.raises(ConfigError, match="dynamic int8"):
        TensorSpec("int8", dynamic=True, scale_rule="half_span")
    with pytest.raises(ConfigError, match="scale_rule"):
        TensorSpec("int4", scale_rule="amax")


def test_default_rule_is_left_out_of_the_spec_dict_and_half_span_round_trips():
    assert "scale_rule" not in TensorSpec("int4", granularity="per_group", group_size=64).to_dict()
    spec = TensorSpec("int4", granularity="per_group", group_size=64, scale_rule="half_span")
    assert TensorSpec.from_dict(spec.to_dict()) == spec


def test_half_span_weight_matches_quark_fake_quant():
    """Quark's own per-group INT4 min_max quantizer gives the same dequantized weight: both compute the
    scale amax / 7.5 in float32, round half to even and clamp to [-8, 7]; Quark's kernel may divide in
    another order, so a value within one ulp of a rounding tie may land one step away."""
    pytest.importorskip("quark")
    from quark.torch.quantization.config.config import Int4PerGroupSpec
    from quark.torch.quantization.tensor_quantize import FakeQuantizeBase as FakeQuantize

    torch.manual_seed(0)
    w = torch.randn(16, 128)
    qspec = Int4PerGroupSpec(ch_axis=-1, group_size=64, symmetric=True,
                             scale_type="float", round_method="half_even", is_dynamic=False).to_quantization_spec()
    fq = FakeQuantize.get_fake_quantize(qspec)
    fq.enable_observer()
    fq.enable_fake_quant()
    theirs = fq(w)
    spec = TensorSpec("int4", granularity="per_group", group_size=64, scale_rule="half_span")
    ours = quantize_weight_with_observer(w, spec).dequantize(torch.float32)
    scale = w.reshape(16, 2, 64).abs().amax(-1, keepdim=True).expand(16, 2, 64).reshape(16, 128) / 7.5
    steps = ((ours - theirs) / scale).abs()
    assert int((steps > 1e-5).sum()) <= 2 and float(steps.max()) <= 1.0 + 1e-5
    assert not torch.equal(ours, quantize_weight_with_observer(w, TensorSpec("int4", granularity="per_group", group_size=64)).dequantize(torch.float32))


def test_half_span_lowers_int4_weight_error_on_gaussian_weights():
    torch.manual_seed(1)
    w = torch.randn(256, 512)
    errors = {}
    for rule in ("qmax", "half_span"):
        spec = TensorSpec("int4", granularity="per_group", group_size=64, scale_rule=rule)
        errors[rule] = float((quantize_weight_with_observer(w, spec).dequantize(torch.float32) - w).pow(2).mean())
    # the finer step (7 / 7.5) lowers the rounding noise by ~(7/7.5)^2 = 0.87; the one saturated code costs little
    assert errors["half_span"] < 0.93 * errors["qmax"]
