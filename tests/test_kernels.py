"""Native and dequant kernels against the exact path: documented error bounds, checkpoint bytes,
dispatch on every device (CUDA's tested through its rules, without a GPU), tracing, and whole-model
SQNR."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from diffquant.quant.formats.affine import quantize_affine
from diffquant.quant.kernels import (
    DEQUANT, EXACT, FP8_SCALED_MM, INT4_BY_TOKENS, INT4_WEIGHT_ONLY, INT8_MM, INT8_WEIGHT_ONLY, INT8_WEIGHT_ONLY_BY_TOKENS, KERNELS,
)  # fmt: skip
from diffquant.quant.kernels import gemm
from diffquant.quant.kernels.gemm import UNIT_ROUNDOFF, dynamic_int8_scale, int8_matmul, pad_rows, quantize_int8, scale_accumulator_
from diffquant.quant.kernels.int4_layout import cpu_blocks, cpu_pack, from_cpu_layout, nibble_sources, to_cpu_layout
from diffquant.quant.kernels.select import set_execution
from diffquant.quant.modules import QuantizedConv2d, QuantizedLinear
from diffquant.quant.spec import TensorSpec
from diffquant.quant.weights import fake_quantize_input, input_params, quantize_weight

U32 = UNIT_ROUNDOFF[torch.float32]
INT8 = TensorSpec("int8")
INT8_CHANNEL = TensorSpec("int8", "per_channel")
INT8_DYNAMIC = TensorSpec("int8", dynamic=True)
FP8 = TensorSpec("fp8_e4m3")
FP8_DYNAMIC = TensorSpec("fp8_e4m3", dynamic=True)
# int8_dynamic's inputs (torchao's per-token rule) and fp8_dynamic's bf16-rounded per-call scale.
INT8_TOKEN = TensorSpec("int8", "per_token", dynamic=True, scale_rule="half_span", rounding="half_even_reciprocal", scale_dtype="bfloat16")
FP8_DYNAMIC_BF16 = TensorSpec("fp8_e4m3", dynamic=True, scale_dtype="bfloat16")
# The same inputs with torchao's GEMM arithmetic (`matmul: torchao`, the recipes' setting).
INT8_TOKEN_TORCHAO = dataclasses.replace(INT8_TOKEN, matmul="torchao")
FP8_DYNAMIC_TORCHAO = dataclasses.replace(FP8_DYNAMIC_BF16, matmul="torchao")


def int4(group: int = 64, dtype: str = "int4", symmetric: bool = True) -> TensorSpec:
    return TensorSpec(dtype, "per_group", group_size=group, symmetric=symmetric)


# (case id, weight spec, input spec, native kernel, SVDQuant branch)
CASES = [
    ("w8a8_tensor", INT8, INT8, INT8_MM, False),
    ("w8a8_channel", INT8_CHANNEL, INT8, INT8_MM, False),
    ("w8a8_dynamic", INT8_CHANNEL, INT8_DYNAMIC, INT8_MM, False),
    ("w8a8_token", INT8_CHANNEL, INT8_TOKEN, INT8_MM, False),
    ("w8_channel", INT8_CHANNEL, None, INT8_WEIGHT_ONLY, False),
    ("w8_tensor", INT8, None, INT8_WEIGHT_ONLY, False),
    ("w4_g32", int4(32), None, INT4_WEIGHT_ONLY, False),
    ("w4_g64", int4(64), None, INT4_WEIGHT_ONLY, False),
    ("w4_g128", int4(128), None, INT4_WEIGHT_ONLY, False),
    ("uw4_asym_g64", int4(64, "uint4", False), None, INT4_WEIGHT_ONLY, False),
    ("w4_asym_g32", int4(32, "int4", False), None, INT4_WEIGHT_ONLY, False),
    ("svdquant_w4a16", int4(64), None, INT4_WEIGHT_ONLY, True),
    ("fp8_static", FP8, FP8, FP8_SCALED_MM, False),
    ("fp8_dynamic", FP8, FP8_DYNAMIC, FP8_SCALED_MM, False),
    ("fp8_dynamic_bf16_scale", FP8, FP8_DYNAMIC_BF16, FP8_SCALED_MM, False),
    ("w8a8_token_torchao", INT8_CHANNEL, INT8_TOKEN_TORCHAO, INT8_MM, False),
    ("fp8_dynamic_torchao", FP8, FP8_DYNAMIC_TORCHAO, FP8_SCALED_MM, False),
]


def make_layer(weight_spec: TensorSpec, input_spec: TensorSpec | None, dtype: torch.dtype = torch.float32, svd: bool = False,
               out_features: int = 96, in_features: int = 256, bias: bool = True, seed: int = 0) -> tuple[QuantizedLinear, torch.Tensor]:
    """A QuantizedLinear of random weights (static input ranges from its input) and an input [3, 7, K]."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    x = torch.randn(3, 7, in_features, generator=generator) * 2
    params = input_params(input_spec, x.min(), x.max()) if input_spec is not None and not input_spec.dynamic else None
    lowrank = None
    if svd:
        lowrank = {"smooth_factor": torch.rand(in_features, generator=generator) + 0.5,
                   "lora_down": (torch.randn(8, in_features, generator=generator) * 0.05).to(dtype),
                   "lora_up": (torch.randn(out_features, 8, generator=generator) * 0.05).to(dtype)}
    b = torch.randn(out_features, generator=generator).to(dtype) if bias else None
    layer = QuantizedLinear(quantize_weight(weight, weight_spec), b, dtype, input_spec, params, lowrank)
    return layer, x.to(dtype)


def error_scales(layer: QuantizedLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S = |x̂| |ŵ|ᵀ + |b|, Z = |x̂| s̄ᵀ) in float64 over the kernel's input x̂ (smoothed, fake-quantized)."""
    if layer.has_lowrank:
        x = layer.smooth(x)
    x_hat = x.float()
    if layer.input_spec is not None:
        x_hat = fake_quantize_input(x_hat, layer.input_spec, layer.input_parameters())
    x_abs = x_hat.double().abs()
    w_hat = layer.quantized_weight().dequantize(torch.float64)
    s = x_abs @ w_hat.abs().T + (layer.bias.double().abs() if layer.bias is not None else 0.0)
    scale = layer.weight_scale.double()
    spec = layer.weight_spec
    expanded = scale.repeat_interleave(spec.group_size, dim=1) if spec.granularity == "per_group" else scale.reshape(-1, 1).expand_as(w_hat)
    return s, x_abs @ expanded.T


def documented_bound(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """The kernels' documented bound on |y_native - y_exact|: (6u + 2(K + 4)u₃₂) S, plus 80 u Z for
    int4 weights with a zero point (int4_weight_only); the low-rank branch is the same code on both
    paths, but its sum with the residual rounds once more in the compute dtype (u |y|)."""
    u, k = UNIT_ROUNDOFF[layer.compute_dtype], layer.in_features
    s, z = error_scales(layer, x)
    bound = (6 * u + 2 * (k + 4) * U32) * s
    if layer.weight_spec.dtype in ("int4", "uint4") and not layer.weight_spec.symmetric:
        bound = bound + 80 * u * z
    if layer.has_lowrank:
        bound = bound + 2 * u * (s + layer.lowrank_output(layer.smooth(x)).double().abs())
    return bound


def outputs(layer: QuantizedLinear, x: torch.Tensor, kernel) -> torch.Tensor:
    layer.set_kernel(kernel)
    with torch.inference_mode():
        return layer(x)


def stored(layer) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in layer.state_dict().items()}


def resident_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for _, t in [*module.named_parameters(), *module.named_buffers()])


# Numerics shared by the int8 kernel.
def test_int8_codes_are_fake_quants_codes_including_ties_and_saturation() -> None:
    scale = torch.tensor(0.25)
    ties = (torch.arange(-20, 20) + 0.5) * scale  # x / s exactly k + 0.5: half to even
    noise = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 40
    x = torch.cat([ties, noise, torch.tensor([1e9, -1e9, float("inf"), float("-inf"), float("nan"), 0.0])])
    codes = quantize_int8(x, scale)
    assert codes.dtype == torch.int8
    assert torch.equal(codes.to(torch.int32), quantize_affine(x, scale, None, -128, 127))
    assert codes[:4].tolist() == [-20, -18, -18, -16]  # -19.5, -18.5, -17.5, -16.5: half to even


def test_dynamic_int8_scale_is_fake_quants_rule() -> None:
    from diffquant.quant.formats.affine import choose_qparams_affine

    for x in (torch.randn(5, 64) * 3, torch.zeros(4, 8), torch.full((2, 2), 1e-40), torch.tensor([[-7.0, 2.0]])):
        expected, _ = choose_qparams_affine(x.amin(), x.amax(), -128, 127, symmetric=True)
        assert torch.equal(dynamic_int8_scale(x), expected)
    assert dynamic_int8_scale(torch.zeros(3)).item() == 1.0
    assert dynamic_int8_scale(torch.tensor([-127.0, 5.0])).item() == 1.0
    # per token, half_span, rounded to the nearest bf16: one scale per row, fake quant's values
    x = torch.cat([torch.randn(5, 64) * 3, torch.zeros(1, 64), torch.full((1, 64), 1e-40)])
    expected, _ = choose_qparams_affine(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), -128, 127, True, "half_span")
    assert torch.equal(dynamic_int8_scale(x, INT8_TOKEN), expected.to(torch.bfloat16).float())
    codes = quantize_int8(x, dynamic_int8_scale(x, INT8_TOKEN), reciprocal=True)
    assert torch.equal(codes * dynamic_int8_scale(x, INT8_TOKEN), fake_quantize_input(x, INT8_TOKEN, None))


def test_dynamic_fp8_scale_is_fake_quants_rule() -> None:
    from diffquant.quant.formats.fp8 import choose_fp8_scale
    from diffquant.quant.kernels.fp8_scaled_mm import dynamic_fp8_scale

    for x in (torch.randn(5, 64) * 3, torch.zeros(4, 8), torch.full((2, 2), 1e-42), torch.tensor([[-896.0, 2.0]])):
        assert torch.equal(dynamic_fp8_scale(x), choose_fp8_scale(x.abs().amax(), torch.float8_e4m3fn))
    assert dynamic_fp8_scale(torch.tensor([-896.0, 2.0])).item() == 2.0
    x = torch.tensor([[-1.0, 0.5]])  # 1 / 448 = 0.00223214 -> bf16 0.00222778 (nearest, 146 / 65536), not the float32 value
    assert dynamic_fp8_scale(x, FP8_DYNAMIC_BF16).item() == torch.tensor(1 / 448).to(torch.bfloat16).item() != dynamic_fp8_scale(x).item()


@pytest.mark.parametrize(("rows", "inner", "cols"), [(32, 128, 64), (1, 7, 3), (5, 64, 48)])
def test_int32_accumulation_is_exact_on_any_cpu_shape(rows: int, inner: int, cols: int) -> None:
    generator = torch.Generator().manual_seed(rows * inner)
    codes = torch.randint(-128, 128, (rows, inner), dtype=torch.int8, generator=generator)
    weight = torch.randint(-127, 128, (cols, inner), dtype=torch.int8, generator=generator)
    acc = int8_matmul(codes, weight.t())
    assert acc.dtype == torch.int32 and torch.equal(acc.long(), codes.long() @ weight.long().T)
    input_scale, weight_scale = torch.tensor(0.0123), torch.rand(cols, generator=generator) * 1e-3 + 1e-4
    y = scale_accumulator_(acc.clone(), input_scale * weight_scale, None)
    reference = (codes.double() * input_scale.double()) @ (weight.double() * weight_scale.double()[:, None]).T
    assert torch.all((y.double() - reference).abs() <= 3 * U32 * reference.abs())


def test_cuda_short_inputs_are_padded_to_17_rows() -> None:
    x = torch.ones(3, 8, dtype=torch.int8)
    padded = pad_rows(x, 17)
    assert padded.shape == (17, 8) and torch.equal(padded[:3], x) and not padded[3:].any()
    assert pad_rows(torch.ones(20, 8), 17).shape == (20, 8)


# Every kernel against exact.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("case", "weight_spec", "input_spec", "native", "svd"), CASES, ids=[case[0] for case in CASES])
def test_native_and_dequant_match_exact_within_the_documented_bound(case, weight_spec, input_spec, native, svd, dtype) -> None:
    layer, x = make_layer(weight_spec, input_spec, dtype, svd)
    assert native.unsupported(layer) is None
    expected = outputs(layer, x, EXACT)
    bound = documented_bound(layer, x)
    for kernel in (native, DEQUANT):
        got = outputs(layer, x, kernel)
        assert got.dtype == dtype and got.shape == expected.shape
        diff = (got.double() - expected.double()).abs()
        assert torch.all(diff <= bound), f"{kernel.name}: max excess {float((diff - bound).max())}"
    if dtype == torch.float32:  # the worst-case bound is loose: measured <= ~10 u₃₂ S
        s, _ = error_scales(layer, x)
        assert float(((outputs(layer, x, native).double() - expected.double()).abs() / s).max()) <= 3e-6


def test_dequant_equals_exact_bit_for_bit() -> None:
    for _, weight_spec, input_spec, _, svd in CASES:
        layer, x = make_layer(weight_spec, input_spec, torch.bfloat16, svd)
        assert torch.equal(outputs(layer, x, DEQUANT), outputs(layer, x, EXACT))


def test_int8_weight_only_and_int4_run_float16() -> None:
    for spec, kernel in ((INT8_CHANNEL, INT8_WEIGHT_ONLY), (int4(64), INT4_WEIGHT_ONLY)):
        layer, x = make_layer(spec, None, torch.float16)
        expected = outputs(layer, x, EXACT)
        assert torch.all((outputs(layer, x, kernel).double() - expected.double()).abs() <= documented_bound(layer, x))


def test_native_int8_on_a_transposed_input_without_bias() -> None:
    layer, x = make_layer(INT8, INT8, bias=False)
    x_t = x.transpose(0, 1)
    expected = outputs(layer, x_t, EXACT)
    assert torch.all((outputs(layer, x_t, INT8_MM).double() - expected.double()).abs() <= documented_bound(layer, x_t))


# Checkpoint bytes.
@pytest.mark.parametrize(("case", "weight_spec", "input_spec", "native", "svd"), CASES, ids=[case[0] for case in CASES])
def test_state_dict_gives_the_checkpoint_back_bit_for_bit_and_resident_bytes_equal_it(case, weight_spec, input_spec, native, svd) -> None:
    layer, _ = make_layer(weight_spec, input_spec, torch.bfloat16, svd)
    layer.set_kernel(DEQUANT)
    checkpoint = stored(layer)
    checkpoint_bytes = sum(t.numel() * t.element_size() for t in checkpoint.values())
    assert resident_bytes(layer) == checkpoint_bytes
    for kernel in (native, DEQUANT, native):
        layer.set_kernel(kernel)
        got = layer.state_dict()
        assert list(got) == list(checkpoint)
        assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in checkpoint.items()), kernel.name
        assert all(torch.equal(t, checkpoint[k]) for k, t in layer.kernel.stored_tensors(layer).items())
        assert resident_bytes(layer) == checkpoint_bytes, kernel.name
    moved = layer.to(torch.float32)  # detach, keep stored dtypes, attach again
    assert moved.compute_dtype == torch.float32
    # Stored tensors keep their dtypes and bytes; the bias, an ordinary float parameter, follows
    # the compute dtype.
    assert all(torch.equal(t, checkpoint[k]) and (k.endswith("bias") or t.dtype == checkpoint[k].dtype) for k, t in moved.state_dict().items())
    assert moved.bias is None or moved.bias.dtype == torch.float32
    moved_bytes = sum(t.numel() * t.element_size() for t in moved.state_dict().values())
    layer.set_kernel(EXACT)  # the reference caches one float copy of the weight, by design
    if input_spec is not None and input_spec.matmul == "torchao":  # except where it multiplies the codes
        assert resident_bytes(layer) == moved_bytes and not hasattr(layer, "dequantized_weight")
    else:
        assert resident_bytes(layer) == moved_bytes + layer.dequantized_weight.numel() * 4


def test_int4_kernel_keeps_its_own_layout_while_attached() -> None:
    layer, _ = make_layer(int4(64), None, torch.bfloat16, out_features=128)
    checkpoint = layer.weight_packed.clone()
    layer.set_kernel(INT4_WEIGHT_ONLY)
    assert layer.weight_packed.shape == checkpoint.shape and not torch.equal(layer.weight_packed, checkpoint)
    layer.set_kernel(DEQUANT)
    assert torch.equal(layer.weight_packed, checkpoint)


@pytest.mark.parametrize("rows", [16, 48, 64, 96, 640, 1280])
def test_int4_cpu_layout_model_is_the_packers_permutation(rows: int) -> None:
    """The compact block model derived from an [N, 2] probe equals the full permutation derived by
    packing the nibble indices at the real shape, and inverts torch's packing of random codes."""
    cols = 64
    codes = torch.randint(0, 16, (rows, cols), dtype=torch.int32, generator=torch.Generator().manual_seed(rows))
    packed = cpu_pack(codes)
    assert torch.equal(to_cpu_layout(codes), packed)
    assert torch.equal(from_cpu_layout(packed, rows, cols).to(torch.int32), codes)
    sources = nibble_sources(cpu_pack, rows, cols, torch.device("cpu"))
    flat = packed.reshape(-1)
    nibbles = torch.stack([flat & 15, flat >> 4], dim=-1).reshape(-1)
    assert torch.equal(codes.reshape(-1)[sources].to(torch.uint8), nibbles)
    assert sum(len(block.rows) for block in cpu_blocks(rows)) == rows


# Dispatch, including the CUDA rules, decided without a GPU.
CUDA = torch.device("cuda")


def test_cuda_dispatch_rules_without_a_gpu() -> None:
    w8a8, _ = make_layer(INT8, INT8, out_features=96, in_features=256)
    odd, _ = make_layer(INT8, INT8, out_features=20, in_features=36)
    assert INT8_MM.reason_on(w8a8, CUDA, (8, 0)) is None
    assert INT8_MM.reason_on(odd, CUDA, (8, 0)) == "torch._int_mm on CUDA needs in and out features that are multiples of 8, not 36 -> 20"
    assert INT8_MM.reason_on(odd, torch.device("cpu"), None) is None
    assert INT8_MM.reason_on(w8a8, torch.device("mps"), None) == "torch._int_mm runs on cpu and cuda, not mps"

    fp8, _ = make_layer(FP8, FP8, out_features=96, in_features=256)
    fp8_odd, _ = make_layer(FP8, FP8, out_features=24, in_features=40)
    assert FP8_SCALED_MM.reason_on(fp8, CUDA, (9, 0)) is None and FP8_SCALED_MM.reason_on(fp8, CUDA, (8, 9)) is None
    assert FP8_SCALED_MM.reason_on(fp8, CUDA, (8, 0)) == "torch._scaled_mm needs a CUDA GPU of compute capability >= 8.9, not (8, 0)"
    assert FP8_SCALED_MM.reason_on(fp8_odd, CUDA, (9, 0)).endswith("multiples of 16, not 40 -> 24")

    w4, _ = make_layer(int4(32), None, torch.bfloat16, out_features=40, in_features=96)
    assert INT4_WEIGHT_ONLY.reason_on(w4, CUDA, (9, 0)) is None  # inner_k_tiles 2 (K = 96 = 3 * 32)
    assert INT4_WEIGHT_ONLY.reason_on(w4, torch.device("cpu"), None) == "torch._weight_int4pack_mm on the CPU needs out features that are a multiple of 16, not 40"
    w4_fp32, _ = make_layer(int4(32), None, torch.float32, out_features=48, in_features=64)
    assert INT4_WEIGHT_ONLY.reason_on(w4_fp32, CUDA, (9, 0)) == "torch._weight_int4pack_mm on CUDA needs a bfloat16 compute dtype, not torch.float32"
    w4_odd, _ = make_layer(int4(32), None, torch.bfloat16, out_features=20, in_features=64)
    assert "out features a multiple of 8" in INT4_WEIGHT_ONLY.reason_on(w4_odd, CUDA, (9, 0))

    w8, _ = make_layer(INT8_CHANNEL, None, torch.bfloat16)
    assert INT8_WEIGHT_ONLY.reason_on(w8, CUDA, (8, 0)) is None


def test_cuda_int4_packing_input_is_torchs_uint8_convention() -> None:
    from diffquant.quant.kernels.int4_layout import cuda_inner_k_tiles

    assert [cuda_inner_k_tiles(k) for k in (256, 192, 96, 64, 48)] == [8, 4, 2, 4, None]


def test_formats_without_a_kernel_report_one_reason() -> None:
    nvfp4 = QuantizedLinear(quantize_weight(torch.randn(32, 64), TensorSpec("nvfp4")), None, torch.float32, TensorSpec("nvfp4", dynamic=True))
    mxfp4 = QuantizedLinear(quantize_weight(torch.randn(32, 64), TensorSpec("mxfp4")), None, torch.float32)
    w4a4 = QuantizedLinear(quantize_weight(torch.randn(32, 64), int4(64)), None, torch.float32, TensorSpec("int4", "per_group", group_size=64, dynamic=True))
    conv = QuantizedConv2d(quantize_weight(torch.randn(8, 4, 1, 1), INT8), None, torch.float32, INT8, {"input_scale": torch.tensor(0.1)},
                           conv={"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1, "padding_mode": "zeros",
                                 "reversed_padding": [0, 0, 0, 0]})
    w4_odd, _ = make_layer(int4(32), None, out_features=40, in_features=64)
    fp8_weight_only, _ = make_layer(FP8, None)
    holder = torch.nn.ModuleDict({"nvfp4": nvfp4, "mxfp4": mxfp4, "w4a4": w4a4, "conv": conv, "w4_odd": w4_odd, "fp8_wo": fp8_weight_only})
    report = set_execution(holder, "native")
    reasons = {layer.name: (layer.kernel, layer.reason) for layer in report.layers}
    assert reasons == {
        "nvfp4": ("dequant", "no native kernel for nvfp4 group-16 weights with dynamic nvfp4 group-16 inputs on cpu"),
        "mxfp4": ("dequant", "no native kernel for mxfp4 group-32 weights with 16-bit inputs on cpu"),
        "w4a4": ("dequant", "no native kernel for int4 group-64 weights with dynamic int4 group-64 inputs on cpu"),
        "conv": ("dequant", "no native Conv2d kernel on cpu (no im2col path: it runs dequantized)"),
        "w4_odd": ("dequant", "torch._weight_int4pack_mm on the CPU needs out features that are a multiple of 16, not 40"),
        "fp8_wo": ("dequant", "no native kernel for fp8_e4m3 per-tensor weights with 16-bit inputs on cpu"),
    }
    with torch.inference_mode():
        assert holder["nvfp4"](torch.randn(2, 64)).shape == (2, 32)


def test_auto_takes_the_measured_rule_and_says_why(monkeypatch) -> None:
    layers = {name: make_layer(w, i, torch.bfloat16)[0] for name, w, i, _, _ in
              [("w8a8", INT8, INT8, None, None), ("w8", INT8_CHANNEL, None, None, None), ("w4", int4(64), None, None, None),
               ("fp8", FP8, FP8, None, None)]}
    holder = torch.nn.ModuleDict(layers)
    native = {layer.name: layer.kernel for layer in set_execution(holder, "native").layers}
    assert native == {"w8a8": INT8_MM.name, "w8": INT8_WEIGHT_ONLY.name, "w4": INT4_WEIGHT_ONLY.name, "fp8": FP8_SCALED_MM.name}
    monkeypatch.setattr(gemm, "_cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    auto = {layer.name: (layer.kernel, layer.reason) for layer in set_execution(holder, "auto").layers}
    assert auto["w8a8"] == (INT8_MM.name, "")
    assert auto["w8"] == (INT8_WEIGHT_ONLY_BY_TOKENS.name, "") and auto["w4"] == (INT4_BY_TOKENS.name, "")
    assert auto["fp8"][0] == "dequant"
    assert auto["fp8"][1].startswith("torch._scaled_mm measured no faster than dequant on the CPU")
    monkeypatch.setattr(gemm, "_cpu_flags", lambda: frozenset({"avx2", "fma"}))  # an AVX2 CPU without VNNI
    report = set_execution(holder, "auto")
    assert report.layers[0].kernel == "dequant"
    assert report.layers[0].reason == "torch._int_mm measured slower than dequant on a CPU without int8 dot-product instructions (no VNNI)"
    assert str(set_execution(holder, "exact")) == "exact: 4 layers (4 exact)"


def test_every_registered_kernel_is_named_by_its_key() -> None:
    assert list(KERNELS) == ["torch._int_mm", "torch._weight_int8pack_mm", "torch._weight_int8pack_mm (<= 128 tokens, else dequant)",
                             "torch._weight_int4pack_mm", "torch._weight_int4pack_mm (<= 256 tokens, else dequant)", "torch._scaled_mm",
                             "exact", "dequant"]
    assert [kernel.path for kernel in KERNELS.values()] == ["native"] * 6 + ["exact", "dequant"]
    assert all(KERNELS[name] is kernel for name, kernel in KERNELS.items())


@pytest.mark.parametrize(("weight_spec", "kernel", "plain"), [(INT8_CHANNEL, INT8_WEIGHT_ONLY_BY_TOKENS, INT8_WEIGHT_ONLY),
                                                              (int4(64), INT4_BY_TOKENS, INT4_WEIGHT_ONLY),
                                                              (int4(32, "uint4", False), INT4_BY_TOKENS, INT4_WEIGHT_ONLY)],
                         ids=["int8", "int4", "uint4_asym"])
def test_by_tokens_kernels_run_the_op_up_to_their_limit_and_dequant_above(monkeypatch, weight_spec, kernel, plain) -> None:
    layer, x = make_layer(weight_spec, None, torch.bfloat16)  # 21 tokens
    expected = outputs(layer, x, EXACT)
    assert torch.equal(outputs(layer, x, kernel), outputs(layer, x, plain))  # at or below the limit: the op
    monkeypatch.setattr(kernel, "max_native_tokens", 20)
    assert torch.equal(outputs(layer, x, kernel), expected)  # above: dequant's numbers, bit for bit
    monkeypatch.setattr(kernel, "max_native_tokens", 21)
    assert torch.equal(outputs(layer, x, kernel), outputs(layer, x, plain))


# Tracing.
@pytest.mark.parametrize(("case", "weight_spec", "input_spec", "native", "svd"),
                         [c for c in CASES if c[0] in ("w8a8_tensor", "w8a8_dynamic", "w8_channel", "w4_g64", "uw4_asym_g64", "svdquant_w4a16", "fp8_static", "fp8_dynamic")],
                         ids=lambda value: value if isinstance(value, str) else "")
def test_native_forward_traces_without_graph_breaks(case, weight_spec, input_spec, native, svd) -> None:
    layer, x = make_layer(weight_spec, input_spec, torch.bfloat16, svd)
    variants = {INT8_WEIGHT_ONLY: INT8_WEIGHT_ONLY_BY_TOKENS, INT4_WEIGHT_ONLY: INT4_BY_TOKENS}
    for kernel in [native] + ([variants[native]] if native in variants else []):
        for rows in (x, x.repeat(14, 1, 1)):  # 21 tokens, and 294 (above the by-tokens limits)
            layer.set_kernel(kernel)
            torch._dynamo.reset()
            with torch.inference_mode():
                explanation = torch._dynamo.explain(layer)(rows)
            assert explanation.graph_break_count == 0, (kernel.name, explanation.break_reasons)
            assert explanation.graph_count == 1


# Whole models: SQNR against the unquantized model, per execution mode.
@pytest.mark.parametrize(("model", "recipe"), [("tiny-sdxl", "int8_w8a8"), ("tiny-flux", "w4a16")])
def test_whole_model_sqnr_stays_within_half_a_db_of_exact(quantize_factory, private_calib, model, recipe) -> None:
    from diffquant.artifacts.calibration_reader import CalibrationArtifact
    from diffquant.artifacts.checkpoint import load_checkpoint_tensors
    from diffquant.eval.metrics import sqnr_db
    from diffquant.models.presets import resolve_model
    from diffquant.models.quantized import load_quantized_submodule, module_tensor_bytes
    from diffquant.models.submodule import load_submodule
    from diffquant.eval.measure import submodule_output

    result = quantize_factory(model, recipe)
    artifact = CalibrationArtifact(private_calib(model))
    samples = [artifact.sample(i) for i in range(min(len(artifact), 3))]
    reference_model = load_submodule(resolve_model(model), torch_dtype=result.manifest["model"]["torch_dtype"]).eval()
    with torch.inference_mode():
        reference = [submodule_output(reference_model(**sample)).float() for sample in samples]
    sqnr: dict[str, float] = {}
    kernels: dict[str, set[str]] = {}
    checkpoint_bytes = sum(t.numel() * t.element_size() for t in load_checkpoint_tensors(result.out, "cpu").values())
    for mode in ("exact", "auto", "native", "dequant"):
        module, _ = load_quantized_submodule(result.out, mode=mode)
        if mode != "exact":  # exact caches a float copy of each weight, by design
            assert module_tensor_bytes(module) == checkpoint_bytes, mode
        kernels[mode] = {layer.kernel.name for layer in module.modules() if hasattr(layer, "kernel") and hasattr(layer, "weight_spec")}
        with torch.inference_mode():
            got = [submodule_output(module(**sample)).float() for sample in samples]
        sqnr[mode] = sqnr_db(torch.cat([r.flatten() for r in reference]), torch.cat([g.flatten() for g in got]))
    assert math.isfinite(sqnr["exact"]) and sqnr["exact"] > 5
    for mode in ("auto", "native", "dequant"):
        assert abs(sqnr[mode] - sqnr["exact"]) <= 0.5, (mode, sqnr)
    native_kernel = INT8_MM.name if recipe == "int8_w8a8" else INT4_WEIGHT_ONLY.name
    assert native_kernel in kernels["native"]


# On a CUDA device (benchmarks/gpu_check.sh runs these: `pytest -k cuda`); skipped elsewhere.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def strict_cuda_matmuls():
    """cuBLAS reductions in full float32 (no bf16 partial sums, no TF32), as the bounds assume."""
    saved = (torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction, torch.backends.cuda.matmul.allow_tf32 = saved


@needs_cuda
@pytest.mark.parametrize(("case", "weight_spec", "input_spec", "native", "svd"), CASES, ids=[case[0] for case in CASES])
def test_on_cuda_native_matches_exact_and_keeps_the_checkpoint(strict_cuda_matmuls, case, weight_spec, input_spec, native, svd) -> None:
    layer, x = make_layer(weight_spec, input_spec, torch.bfloat16, svd)
    layer.set_kernel(DEQUANT)
    checkpoint = stored(layer)
    layer = layer.to("cuda")
    x = x.to("cuda")
    assert native.unsupported(layer) is None
    expected = outputs(layer, x, EXACT)
    for rows in (x, x[:1]):  # 21 tokens, and 7 (padded to 17 rows by the int8 kernel)
        got = outputs(layer, rows, native)
        want = expected if rows is x else outputs(layer, rows, EXACT)
        layer.set_kernel(native)
        assert torch.all((got.double() - want.double()).abs() <= documented_bound(layer, rows)), native.name
    got_state = {k: v.cpu() for k, v in layer.state_dict().items()}
    assert all(torch.equal(got_state[k], v) for k, v in checkpoint.items())
    assert resident_bytes(layer) == sum(t.numel() * t.element_size() for t in checkpoint.values())
    back = layer.cpu()
    assert all(torch.equal(t, checkpoint[k]) for k, t in back.state_dict().items())


@needs_cuda
def test_on_cuda_auto_takes_every_native_kernel() -> None:
    holder = torch.nn.ModuleDict({name: make_layer(w, i, torch.bfloat16, svd)[0] for name, w, i, _, svd in CASES}).to("cuda")
    chosen = {layer.name: layer.kernel for layer in set_execution(holder, "auto").layers}
    assert chosen == {name: kernel.name for name, _, _, kernel, _ in CASES}


def test_cuda_layout_inverse_undoes_any_nibble_permutation(monkeypatch) -> None:
    """from_cuda_layout derives its permutation by packing index bit planes; checked here with a
    stand-in tiled packer (the real one needs a GPU): 8 x 32 tiles, each stored transposed, as int32."""
    from diffquant.quant.kernels import int4_layout

    def tiled_pack(codes: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
        n, k = codes.shape
        tiles = codes.to(torch.uint8).reshape(n // 8, 8, k // 32, 32).permute(2, 0, 3, 1).reshape(-1)
        return (tiles[1::2] << 4 | tiles[0::2]).contiguous().view(torch.int32).reshape(k // 32, n // 8, -1)

    monkeypatch.setattr(int4_layout, "cuda_pack", tiled_pack)
    codes = torch.randint(0, 16, (24, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    packed = tiled_pack(codes, 2)
    assert packed.numel() * 4 == codes.numel() // 2  # same bytes as the checkpoint
    assert torch.equal(int4_layout.from_cuda_layout(packed, 24, 96, 2), codes)
