"""Shifted unsigned INT4 inputs (TensorSpec `shift`, nunchaku's int4 mlp_fc2): hand-computed
codes, the spec's validation and manifest form, the layer forward with its bias correction, and
the planner's resolution of `shift_from: proj_mlp`."""

from __future__ import annotations

import pytest
import torch

from diffquant.quant.errors import ConfigError
from diffquant.quant.modules import QuantizedLinear
from diffquant.quant.quantizer import plan_layers
from diffquant.quant.recipe import recipe_from_dict
from diffquant.quant.shifted_inputs import SHIFT_GELU, fake_quantize_shifted, shift_correction, shift_input, shifted_bias
from diffquant.quant.spec import TensorSpec
from diffquant.quant.weights import fake_quantize_input, quantize_weight

C = SHIFT_GELU  # 0.171875 = 11/64: every value below is a multiple of 1/64, exact in float32 and bfloat16


def shifted_spec(group: int = 4, start: int = 0) -> TensorSpec:
    return TensorSpec("int4", "per_group", group_size=group, dynamic=True, shift=C, shift_from=start)


def test_unsigned_shifted_codes_by_hand() -> None:
    # Group 1 (columns 0-3, not shifted): signed, s = amax / 7 = (7/16) / 7 = 1/16; x / s = 7, -3.5, 1, 0
    # -> codes 7, -4 (half to even), 1, 0.
    # Group 2 (columns 4-7, shifted): v = x + c = 15/16, 2.5/16, 3.5/16, -4/16; s = max|v| / 15 = 1/16;
    # v / s = 15, 2.5, 3.5, -4 -> codes 15, 2, 4 (half to even), 0 (clamped at the unsigned grid's 0).
    x = torch.tensor([[7 / 16, -7 / 32, 1 / 16, 0.0, 0.765625, -0.015625, 0.046875, -0.421875]])
    spec = shifted_spec(start=4)
    v = shift_input(x, spec)
    assert v.tolist() == [[7 / 16, -7 / 32, 1 / 16, 0.0, 15 / 16, 2.5 / 16, 3.5 / 16, -4 / 16]]
    expected = torch.tensor([[7, -4, 1, 0, 15, 2, 4, 0]]) / 16
    assert torch.equal(fake_quantize_shifted(v, spec), expected)
    assert torch.equal(fake_quantize_input(v, spec, None), expected)  # the affine format's dispatch
    # In bfloat16 (the compute dtype nunchaku runs): x + c is rounded once to bf16, here exactly.
    assert torch.equal(fake_quantize_input(shift_input(x.bfloat16(), spec), spec, None), expected.bfloat16())


def test_shift_spec_validation_and_manifest_form() -> None:
    spec = shifted_spec(group=64, start=128)
    assert spec.to_dict()["shift"] == C and spec.to_dict()["shift_from"] == 128
    assert TensorSpec.from_dict(spec.to_dict()) == spec
    plain = TensorSpec("int4", "per_group", group_size=64, dynamic=True)
    assert "shift" not in plain.to_dict() and "shift_from" not in plain.to_dict()  # existing manifests unchanged
    assert spec.describe() == "int4 g64 sym dynamic shift+0.171875 from 128"
    for bad, message in [
        ({"dtype": "nvfp4", "dynamic": True, "shift": C}, "dynamic symmetric per-group int4"),
        ({"dtype": "int4", "granularity": "per_group", "group_size": 64, "shift": C}, "dynamic symmetric per-group int4"),
        ({"dtype": "int4", "granularity": "per_group", "group_size": 64, "dynamic": True, "shift": -0.5}, "shift -0.5 is not allowed"),
        ({"dtype": "int4", "granularity": "per_group", "group_size": 64, "dynamic": True, "shift": C, "shift_from": 96}, "group boundary"),
        ({"dtype": "int4", "granularity": "per_group", "group_size": 64, "dynamic": True, "shift": C, "shift_from": "mlp"}, "proj_mlp"),
        ({"dtype": "int4", "granularity": "per_group", "group_size": 64, "dynamic": True, "shift_from": 64}, "without a shift"),
    ]:
        with pytest.raises(ConfigError, match=message):
            TensorSpec.from_dict(bad)


def test_shifted_layer_forward_cancels_the_shift_in_its_bias() -> None:
    # y = Q((x + c) / s) deq(R)^T + (x / s) L^T + b' with b' = b - c sum_j deq(R)_ij / s_j: the output
    # differs from the unquantized-input layer (x / s)(deq(R) + L)^T + b only by the input's
    # quantization error, |(Q(v) - v) deq(R)^T| <= sum_k |deq(R)_nk| s_g / 2 (v >= 0 on the shifted columns: no clamping).
    gen = torch.Generator().manual_seed(0)
    k, n, r, m = 128, 16, 4, 64
    weight = quantize_weight(torch.randn(n, k, generator=gen), TensorSpec("int4", "per_group", group_size=64))
    deq = weight.dequantize()
    smooth = 2.0 ** torch.randint(-1, 2, (k,), generator=gen).float()  # 1/2, 1, 2: x / s exact in float32
    lowrank = {"smooth_factor": smooth, "lora_down": torch.randn(r, k, generator=gen) * 0.1, "lora_up": torch.randn(n, r, generator=gen) * 0.1}
    spec = shifted_spec(group=64, start=64)
    bias = torch.randn(n, generator=gen)
    corrected = shifted_bias(bias, deq, smooth, spec, torch.float32)
    assert torch.allclose(corrected.double(), bias.double() - C * (deq.double()[:, 64:] / smooth.double()[64:]).sum(1), rtol=0, atol=1e-6)
    layer = QuantizedLinear(weight, corrected, torch.float32, spec, None, lowrank)
    uncorrected = QuantizedLinear(weight, bias, torch.float32, spec, None, lowrank)

    def unquantized_input(x: torch.Tensor) -> torch.Tensor:
        return (x / smooth) @ (deq + lowrank["lora_up"] @ lowrank["lora_down"]).T + bias

    x = torch.nn.functional.gelu(torch.randn(m, k, generator=gen), approximate="tanh")  # >= -0.1700 > -c
    v = shift_input(x, spec) / smooth
    group_scale = v.reshape(m, 2, 64).abs().amax(-1) / torch.tensor([7.0, 15.0])  # signed head, unsigned tail
    bound = (group_scale.repeat_interleave(64, dim=1) / 2) @ deq.abs().T + 1e-4  # + float32 sums of ~10^2 terms
    assert torch.all((layer(x) - unquantized_input(x)).abs() <= bound)
    correction = shift_correction(deq, smooth, spec).float()
    assert torch.allclose(uncorrected(x) - layer(x), correction.expand(m, n), atol=1e-4)

    # On the grid (v = q / 16, one full-scale code per group, so s = 1/16 and Q(v) = v) the shift
    # cancels to float32 rounding; without the correction every token is off by c sum_j deq(R)_nj / s_j.
    codes = torch.cat([torch.randint(-7, 8, (m, 64), generator=gen), torch.randint(0, 16, (m, 64), generator=gen)], dim=1).float()
    codes[:, 0], codes[:, 64] = 7, 15
    x = (codes / 16) * smooth - torch.cat([torch.zeros(64), torch.full((64,), C)])  # multiples of 1/64: exact
    assert torch.equal(layer.fake_quantize_input(layer.smooth(shift_input(x, spec))), codes / 16)
    assert torch.allclose(layer(x), unquantized_input(x), rtol=0, atol=1e-4)
    assert (uncorrected(x) - unquantized_input(x) - correction).abs().max() < 1e-4 < correction.abs().min()


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj_mlp = torch.nn.Linear(16, 48)
        self.proj_out = torch.nn.Linear(16 + 48, 16)
        self.other = torch.nn.Linear(64, 16)


def test_plan_resolves_shift_from_proj_mlp() -> None:
    recipe = recipe_from_dict({
        "name": "shifted", "global": {"weight": {"dtype": "int4", "granularity": "per_group", "group_size": 16},
                                      "input": {"dtype": "int4", "granularity": "per_group", "group_size": 16, "dynamic": True}},
        "names": {"*proj_out": {"input": {"shift": C, "shift_from": "proj_mlp"}}}})  # fmt: skip
    model = torch.nn.Module()
    model.block = _Block()
    plans, _ = plan_layers(model, recipe, (), ())
    specs = {plan.name: plan.spec.input for plan in plans}
    assert specs["block.proj_out"].shift_from == 16  # 64 inputs - proj_mlp's 48 outputs
    assert specs["block.proj_mlp"].shift is None and specs["block.other"].shift is None
    recipe_bad = recipe_from_dict({**recipe.source, "names": {"*other": {"input": {"shift": C, "shift_from": "proj_mlp"}}}})
    model.block.proj_mlp = torch.nn.Identity()
    with pytest.raises(ConfigError, match="block.other: shift_from proj_mlp needs a sibling proj_mlp Linear"):
        plan_layers(model, recipe_bad, (), ())
