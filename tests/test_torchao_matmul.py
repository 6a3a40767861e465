"""`matmul: torchao`: the GEMM of the codes scaled after, as torchao computes it, in diffquant's
exact path and its native int8 kernel (`diffquant/quant/kernels/torchao_matmul.py`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diffquant.quant.errors import ConfigError
from diffquant.quant.formats.fp8 import quantize_fp8
from diffquant.quant.kernels import DEQUANT, EXACT, FP8_SCALED_MM, INT8_MM
from diffquant.quant.kernels.fp8_scaled_mm import dynamic_fp8_scale
from diffquant.quant.modules import QuantizedConv2d, QuantizedLinear
from diffquant.quant.spec import LayerSpec, TensorSpec
from diffquant.quant.weights import fake_quantize_input, quantize_weight

INT8_TOKEN = TensorSpec("int8", "per_token", dynamic=True, scale_rule="half_span", rounding="half_even_reciprocal",
                        scale_dtype="bfloat16", matmul="torchao")
FP8_TENSOR = TensorSpec("fp8_e4m3", dynamic=True, scale_dtype="bfloat16", matmul="torchao")


def run(layer: torch.nn.Module, x: torch.Tensor, kernel) -> torch.Tensor:
    layer.set_kernel(kernel)
    with torch.inference_mode():
        return layer(x)


def test_int8_output_is_torchaos_rounding_of_the_exact_accumulator_worked_by_hand() -> None:
    # Weights [[1, 1], [3, -1]] per channel, amax / 127.5 rounded up to bf16: s_w = [129, 386] / 2^14,
    # codes [[127, 127], [127, -42]]. One token x = [127.5, -63.75]: s_x = 127.5 / 127.5 = 1,
    # codes round_half_even(x · 1) = [128 -> 127 (saturated), -64].
    wq = quantize_weight(torch.tensor([[1.0, 1.0], [3.0, -1.0]]), TensorSpec("int8", "per_channel", scale_rule="half_span", scale_dtype="bfloat16"))
    assert wq.tensors["weight"].tolist() == [[127, 127], [127, -42]]
    assert (wq.tensors["weight_scale"].flatten() * 2**14).tolist() == [129.0, 386.0]
    bias = torch.tensor([0.5, -0.25], dtype=torch.bfloat16)
    x = torch.tensor([[127.5, -63.75]], dtype=torch.bfloat16)
    # acc = [127·127 - 64·127, 127·127 + 64·42] = [8001, 18817]; bf16(acc · 1) = [8000, 18816]
    # (ulps 32 and 64); · s_w = [62.98828125, 443.296875]; + b = [63.48828125, 443.046875];
    # bf16 = [63.5, 444.0] (ulps 0.25 and 2).
    layer = QuantizedLinear(wq, bias, torch.bfloat16, INT8_TOKEN)
    assert run(layer, x, EXACT)[0].tolist() == [63.5, 444.0]
    assert run(layer, x, INT8_MM)[0].tolist() == [63.5, 444.0]
    # The dequantized GEMM rounds ŵ to bf16 first: row 1 is [2.984375, -0.990234375], and
    # 127 · 2.984375 + 64 · 0.990234375 - 0.25 = 442.140625 -> 442.
    plain = QuantizedLinear(wq, bias, torch.bfloat16, dataclasses.replace(INT8_TOKEN, matmul="dequantized"))
    assert run(plain, x, EXACT)[0].tolist() == [63.5, 442.0]


@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
def test_int8_exact_dequant_and_native_agree_bit_for_bit_and_differ_from_the_dequantized_gemm(granularity) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(160, 256, generator=generator) * 0.05
    x = (torch.randn(5, 9, 256, generator=generator) * 2).bfloat16()
    spec = dataclasses.replace(INT8_TOKEN, granularity=granularity)
    wq = quantize_weight(weight, TensorSpec("int8", "per_channel", scale_rule="half_span", scale_dtype="bfloat16"))
    bias = torch.randn(160, generator=generator).bfloat16()
    layer = QuantizedLinear(wq, bias, torch.bfloat16, spec)
    exact = run(layer, x, EXACT)
    assert torch.equal(run(layer, x, DEQUANT), exact)
    assert torch.equal(run(layer, x, INT8_MM), exact)
    plain = QuantizedLinear(wq, bias, torch.bfloat16, dataclasses.replace(spec, matmul="dequantized"))
    other = run(plain, x, EXACT)
    assert 0 < int((other != exact).sum()) < exact.numel()
    # The same codes: only roundings move. Each path rounds a few times by at most 2^-8 relative
    # (bf16) of S = |x̂| |ŵ|ᵀ + |b|: 8 u S bounds both.
    x_hat = fake_quantize_input(x.float(), spec, None).double()
    magnitude = x_hat.abs() @ wq.dequantize(torch.float64).abs().t() + bias.double().abs()
    assert torch.all((other.double() - exact.double()).abs() <= 8 * 2.0**-8 * magnitude)


def test_the_exact_path_caches_no_dequantized_weight_for_it() -> None:
    wq = quantize_weight(torch.randn(16, 32), TensorSpec("int8", "per_channel"))
    layer = QuantizedLinear(wq, None, torch.float32, dataclasses.replace(INT8_TOKEN, scale_dtype=None))
    layer.set_kernel(EXACT)
    assert "dequantized_weight" not in dict(layer.named_buffers())


@pytest.mark.parametrize("k", [64, 1024])
def test_fp8_output_is_torchaos_scaled_mm_within_its_float32_sums(k) -> None:
    """torchao's Float8Tensor linear is torch._scaled_mm(q_x, q_wᵀ, s_x, s_w, bias, out_dtype=bf16).
    The exact path computes the same products of the scaled operands; only the order of the K
    float32 sums may differ (torch emulates the op with a float32 GEMM on some CPUs, oneDNN runs it
    on others): within (K + 3) 2^-24 of S = Σ|x̂ ŵ| + |b| before each side's bf16 rounding."""
    generator = torch.Generator().manual_seed(1)
    wq = quantize_weight(torch.randn(96, k, generator=generator) * 0.05, TensorSpec("fp8_e4m3"))
    bias = torch.randn(96, generator=generator).bfloat16()
    layer = QuantizedLinear(wq, bias, torch.bfloat16, FP8_TENSOR)
    x = (torch.randn(21, k, generator=generator) * 2).bfloat16()
    s_x = dynamic_fp8_scale(x, FP8_TENSOR)
    q_x = quantize_fp8(x.float(), s_x, torch.float8_e4m3fn)
    theirs = torch._scaled_mm(q_x, wq.tensors["weight"].t(), scale_a=s_x, scale_b=wq.tensors["weight_scale"], bias=bias,
                              out_dtype=torch.bfloat16).double()
    magnitude = (q_x.double() * s_x.double()).abs() @ (wq.tensors["weight"].double() * wq.tensors["weight_scale"].double()).abs().t() + bias.double().abs()
    for got in (run(layer, x, EXACT).double(), run(layer, x, FP8_SCALED_MM).double()):
        assert torch.all((got - theirs).abs() <= (k + 3) * 2.0**-24 * magnitude + 2.0**-8 * (got.abs() + theirs.abs()))
    # The dequantized bf16 GEMM (x̂ and ŵ rounded to bf16 first) is further from torchao.
    ours = run(layer, x, EXACT).double()
    plain = QuantizedLinear(wq, bias, torch.bfloat16, dataclasses.replace(FP8_TENSOR, matmul="dequantized"))
    assert float((ours - theirs).abs().max()) < float((run(plain, x, EXACT).double() - theirs).abs().max())


def test_conv2d_layers_keep_the_dequantized_gemm() -> None:
    generator = torch.Generator().manual_seed(2)
    conv = torch.nn.Conv2d(8, 4, 3, padding=1)
    wq = quantize_weight(conv.weight.detach(), TensorSpec("int8", "per_channel"))
    x = torch.randn(1, 8, 5, 5, generator=generator)
    spec = dataclasses.replace(INT8_TOKEN, scale_dtype=None)
    geometry = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1, "padding_mode": "zeros", "reversed_padding": [1, 1, 1, 1]}
    made = [QuantizedConv2d(wq, conv.bias.detach(), torch.float32, s, conv=geometry) for s in (spec, dataclasses.replace(spec, matmul="dequantized"))]
    assert torch.equal(run(made[0], x, EXACT), run(made[1], x, EXACT))


@pytest.mark.parametrize(("weight", "inputs", "message"), [
    (dict(dtype="int8"), dict(dtype="int8", matmul="torchao"), "matmul torchao applies to dynamic int8 .* not int8 tensor sym static"),
    (dict(dtype="int8"), dict(dtype="int4", granularity="per_group", group_size=64, dynamic=True, matmul="torchao"), "matmul torchao applies"),
    (dict(dtype="fp8_e4m3", granularity="per_channel"), dict(dtype="fp8_e4m3", dynamic=True, matmul="torchao"),
     "takes symmetric fp8_e4m3 per-tensor weights"),
    (dict(dtype="int8", granularity="per_group", group_size=32), dict(dtype="int8", granularity="per_token", dynamic=True, matmul="torchao"),
     "per-tensor or per-channel weights"),
    (dict(dtype="int8"), dict(dtype="int8", matmul="gemm"), "matmul 'gemm' is not allowed"),
])
def test_matmul_torchao_is_refused_where_torchao_has_no_such_kernel(weight, inputs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        LayerSpec(TensorSpec(**weight), TensorSpec(**inputs))
