"""The equal-settings helpers of benchmarks/harness.py that set diffquant beside AMD Quark
(bench_vs_quark.py, bench_scale.py --quark): the same layers in both tools (Conv2d included), the
layer-by-layer weight comparison, the float layer with another weight, the recipe variants."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from harness import (check_same_layers, compare_int_weights, diffquant_recipe, layer_forward, quark_config,  # noqa: E402
                     quark_equal_variant, quark_exclude, quark_layer_names, quark_weight)

from diffquant.quant.formats.affine import choose_qparams_affine, quantize_affine  # noqa: E402
from diffquant.quant.recipe import recipe_from_dict  # noqa: E402

# Quark multiplies by fl(1 / s) (torch.fake_quantize_per_tensor_affine on the CPU), diffquant
# divides by s: the two quotients differ by at most |x / s| * 2^-23 (two float32 roundings of
# 2^-24 relative each) <= 128 * 2^-23, so a code can only differ where x / s lies that close to a
# rounding tie k + 0.5 (measured in float64; the bound is doubled for that measurement).
TIE_BOUND = 2 * 128 * 2.0**-23


def small_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("conv_in", torch.nn.Conv2d(4, 8, 3, padding=1))
    model.add_module("body", torch.nn.Conv2d(8, 8, 3, padding=1))
    model.add_module("proj", torch.nn.Linear(8, 16))
    model.add_module("out", torch.nn.Linear(16, 4))
    return model


def quark_quantized(model: torch.nn.Module, names: list[str], recipe: str = "int8_weight_only") -> torch.nn.Module:
    pytest.importorskip("quark")
    from quark.torch import ModelQuantizer

    return ModelQuantizer(quark_config(recipe, quark_exclude(model, names))).quantize_model(model, None)  # weight-only: no data


def test_quark_quantizes_exactly_the_layers_given_conv2d_included() -> None:
    model = small_model()
    biases = {name: dict(model.named_modules())[name].bias.detach().clone() for name in ("body", "proj")}
    assert quark_exclude(model, ["body", "proj"]) == ["conv_in", "out"]
    quantized = quark_quantized(model, ["body", "proj"])
    assert quark_layer_names(quantized) == ["body", "proj"]
    assert type(quantized.body).__name__ == "QuantConv2d" and type(quantized.conv_in) is torch.nn.Conv2d
    for name, bias in biases.items():  # no bias spec: Quark leaves biases float, as diffquant does
        layer = dict(quantized.named_modules())[name]
        assert layer.bias_quantizer is None and layer.input_quantizer is None and torch.equal(layer.bias, bias)
    assert check_same_layers(quark_layer_names(quantized), ["proj", "body"]) == 2


def test_check_same_layers_names_the_layers_only_one_tool_quantized() -> None:
    with pytest.raises(AssertionError, match=r"1 by Quark only \['a'\], 1 by diffquant only \['c'\]"):
        check_same_layers(["a", "b"], ["b", "c"])


def test_quark_config_refuses_a_recipe_it_has_no_configuration_for() -> None:
    pytest.importorskip("quark")
    with pytest.raises(ValueError, match="no Quark configuration for recipe 'svdquant_w4a4'"):
        quark_config("svdquant_w4a4", [])


@pytest.mark.parametrize("name", ["body", "proj"])
def test_quark_weights_equal_diffquant_half_span_up_to_ties(name: str) -> None:
    model = small_model()
    quantized = quark_quantized(model, ["body", "proj"])
    module = dict(quantized.named_modules())[name]
    weight = module.weight.detach()
    fake, quark_scale = quark_weight(module)
    # Quark's scale: amax / ((qmax - qmin) / 2) in float32, the same single division as diffquant's half_span.
    assert torch.equal(quark_scale, weight.abs().max() / 127.5)
    for rule in ("half_span", "qmax"):
        scale, _ = choose_qparams_affine(weight.min(), weight.max(), -128, 127, True, scale_rule=rule)
        codes = quantize_affine(weight, scale, None, -128, 127, torch.int8)
        result = compare_int_weights(weight, fake, quark_scale, codes, scale)
        assert result.numel == weight.numel()
        if rule == "half_span":
            assert result.same_scale and result.quark_scale == result.diffquant_scale
            assert result.max_code_difference <= 1 and result.differing_values == result.differing_codes
            assert result.tie_distance_max is None or result.tie_distance_max <= TIE_BOUND
            assert abs(result.quark_weight_sqnr_db - result.diffquant_weight_sqnr_db) < 0.01
        else:  # amax / 127 against amax / 127.5: two correctly rounded quotients of the same amax
            assert not result.same_scale
            assert result.diffquant_scale / result.quark_scale == pytest.approx(127.5 / 127, rel=2.0**-22)
            assert result.differing_codes > 0


def test_compare_int_weights_counts_hand_made_differences() -> None:
    weight = torch.tensor([[0.3, -0.704, 1.27, 0.0]])
    scale = torch.tensor(0.01)
    quark = torch.tensor([[30.0, -70.0, 127.0, 0.0]]) * scale
    result = compare_int_weights(weight, quark, scale, torch.tensor([[30, -71, 127, 0]], dtype=torch.int8), scale)
    assert (result.differing_codes, result.max_code_difference, result.differing_values) == (1, 1, 1)
    assert result.same_scale
    assert result.tie_distance_max == pytest.approx(abs(0.704 / 0.01 - 70.5), abs=1e-4)  # 70.4 is 0.1 from the tie 70.5
    with pytest.raises(ValueError, match="not code x scale"):
        compare_int_weights(weight, quark + 0.001, scale, torch.zeros(1, 4, dtype=torch.int8), scale)
    with pytest.raises(ValueError, match="per-tensor scales only"):
        compare_int_weights(weight, quark, torch.ones(2), torch.zeros(1, 4, dtype=torch.int8), scale)


def test_layer_forward_is_the_layer_with_another_weight() -> None:
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2)
    linear = torch.nn.Linear(5, 3)
    x, t = torch.randn(2, 4, 9, 9), torch.randn(7, 5)
    with torch.no_grad():
        assert torch.equal(layer_forward(conv, x, conv.weight), conv(x))
        assert torch.equal(layer_forward(linear, t, linear.weight), linear(t))
        doubled = layer_forward(linear, t, 2 * linear.weight)
        assert torch.allclose(doubled - linear.bias, 2 * (linear(t) - linear.bias), atol=1e-5)
    with pytest.raises(ValueError, match="neither a Linear nor a zero-padded Conv2d"):
        layer_forward(torch.nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), torch.randn(1, 2, 4, 4), torch.randn(2, 2, 3, 3))


def test_quark_equal_variants_set_half_span_where_quark_uses_it() -> None:
    assert quark_equal_variant("int8_weight_only") == "diffquant half_span"
    assert quark_equal_variant("int8_w8a8") == "diffquant half_span w+x"
    raw = diffquant_recipe("int8_w8a8", "diffquant half_span w+x")
    assert raw["global"]["weight"]["scale_rule"] == raw["global"]["input"]["scale_rule"] == "half_span"
    assert raw["exclude"] == [] and "exclude_mode" not in raw  # the preset's exclude patterns stay
    recipe = recipe_from_dict(raw)
    assert recipe.global_spec.weight.scale_rule == "half_span" and recipe.global_spec.input.scale_rule == "half_span"
    shipped = diffquant_recipe("int8_weight_only", "diffquant", exclude=["conv"])
    # The shipped INT8 recipes take Quark's rule themselves since issue 17.
    assert shipped["global"]["weight"]["scale_rule"] == "half_span" and shipped["exclude"] == ["conv"] and shipped["exclude_mode"] == "replace"
