"""Native int8 / fp8 inference: exact int32 GEMMs, the documented tolerance, conversion, CLI."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from diffquant.artifacts.calibration_reader import CalibrationArtifact
from diffquant.cli import main
from diffquant.quant.activation_stats import RANGE_OBSERVER, LayerActivationStats
from diffquant.quant.codecs import dequantize_weight
from diffquant.quant.formats.affine import quantize_affine
from diffquant.quant.modules import QuantizedConv2d, QuantizedLinear
from diffquant.quant.native import (
    FP8_DEVICE_REASON,
    NativeFp8Linear,
    NativeInt8Linear,
    NativeReport,
    convert_to_native,
    int8_matmul,
    quantize_int8,
    scale_accumulator_,
)
from diffquant.quant.observers import make_observer
from diffquant.quant.quantizer import LayerPlan, build_quantized_layer
from diffquant.quant.spec import LayerSpec, TensorSpec
from diffquant.stages.generate import load_quantized_submodule
from diffquant.eval.measure import submodule_output
from diffquant.stages.quantize import QuantizeSettings, quantize

U = 2.0**-24  # float32 unit roundoff
BF16_BOUND = 2.0**-6  # 2 bf16 roundings of the inputs + 2 of the outputs, u_bf16 = 2^-8
INT8 = TensorSpec("int8")
INT8_CHANNEL = TensorSpec("int8", granularity="per_channel")
INT8_DYNAMIC = TensorSpec("int8", dynamic=True)


def quantized_linear(weight_spec: TensorSpec, input_spec: TensorSpec | None, out_features: int = 64, in_features: int = 128,
                     dtype: torch.dtype = torch.float32, bias: bool = True, seed: int = 0) -> tuple[QuantizedLinear, torch.Tensor]:
    """A QuantizedLinear built the way stage two builds one, and 32 calibration tokens [4, 8, K]."""
    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator) * 0.05)
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=generator))
    linear = linear.to(dtype)
    x = (torch.randn(4, 8, in_features, generator=generator) * 3).to(dtype)
    observer = make_observer(RANGE_OBSERVER, rows=1)
    observer.update(x.float().reshape(1, -1))
    plan = LayerPlan("layer", "Linear", LayerSpec(weight_spec, input_spec), svd=False)
    layer, _ = build_quantized_layer(linear, plan, LayerActivationStats(range_state=observer.state_dict()), None)
    return layer, x


def error_scale(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """S + |b| = Σ_k |x̂_k| |ŵ_k| + |b| in float64, [..., N]: what the documented bounds scale with."""
    x_hat = layer.prepare_input(x.to(layer.compute_dtype).float())[0].double()
    w_hat = dequantize_weight(layer.stored_tensors(), layer.weight_spec, layer.weight_shape, torch.float64)
    bias = layer.bias.double().abs() if layer.bias is not None else 0.0
    return x_hat.abs() @ w_hat.abs().T + bias


def relative_error(got: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """|got - expected| / (S + |b|), elementwise; where S + |b| = 0 (a zero token, no bias) the diff itself."""
    diff = (got.double() - expected.double()).abs()
    return torch.where(scale > 0, diff / scale.clamp_min(torch.finfo(torch.float64).tiny), diff)


def bound(layer: QuantizedLinear) -> float:
    """The module docstring's bound on |y_native - y_fake| / (S + |b|)."""
    k = layer.weight_shape[1]
    return (k + 5) * U if layer.compute_dtype == torch.float32 else BF16_BOUND + k * U


class Holder(torch.nn.Module):
    """A container, since convert_to_native replaces submodules, never its root."""

    def __init__(self, **layers: torch.nn.Module) -> None:
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)


def test_int8_codes_are_fake_quants_codes_including_ties_and_saturation() -> None:
    scale = torch.tensor(0.25)
    ties = (torch.arange(-20, 20) + 0.5) * scale  # x / s exactly k + 0.5: half to even
    noise = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 40
    x = torch.cat([ties, noise, torch.tensor([1e9, -1e9, float("inf"), float("-inf"), float("nan"), 0.0])])
    expected = quantize_affine(x, scale, None, -128, 127)
    codes = quantize_int8(x, scale)
    assert codes.dtype == torch.int8
    assert torch.equal(codes.to(torch.int32), expected)
    assert codes[:4].tolist() == [-20, -18, -18, -16]  # x / s = -19.5, -18.5, -17.5, -16.5: half to even
    assert quantize_int8(torch.tensor([0.5, 1.5, 2.5, -0.5]), torch.tensor(1.0)).tolist() == [0, 2, 2, 0]


@pytest.mark.parametrize(("rows", "inner", "cols"), [(32, 128, 64), (1, 7, 3), (5, 64, 48)])
def test_int32_path_is_exact_on_any_cpu_shape(rows: int, inner: int, cols: int) -> None:
    """torch._int_mm on the CPU takes any M, K, N; the int32 sum is exact, the scaling ~3 roundings."""
    generator = torch.Generator().manual_seed(rows * inner)
    codes = torch.randint(-128, 128, (rows, inner), dtype=torch.int8, generator=generator)
    weight = torch.randint(-127, 128, (cols, inner), dtype=torch.int8, generator=generator)
    acc = int8_matmul(codes, weight.t().contiguous())
    assert acc.dtype == torch.int32
    assert torch.equal(acc.long(), codes.long() @ weight.long().T)
    input_scale, weight_scale = torch.tensor(0.0123), torch.rand(cols, generator=generator) * 1e-3 + 1e-4
    y = scale_accumulator_(acc.clone(), input_scale * weight_scale, None)
    reference = (codes.double() * input_scale.double()) @ (weight.double() * weight_scale.double()[:, None]).T
    assert y.dtype == torch.float32
    assert torch.all((y.double() - reference).abs() <= 3 * U * reference.abs())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_spec", [INT8, INT8_CHANNEL], ids=["w_tensor", "w_channel"])
@pytest.mark.parametrize("input_spec", [INT8, INT8_DYNAMIC], ids=["x_static", "x_dynamic"])
def test_native_int8_matches_fake_quant_within_the_documented_bound(dtype, weight_spec, input_spec) -> None:
    layer, x = quantized_linear(weight_spec, input_spec, dtype=dtype)
    native = NativeInt8Linear.from_quantized(layer)
    with torch.inference_mode():
        fake, out = layer(x), native(x)
    assert out.dtype == dtype and out.shape == (4, 8, 64)
    relative = relative_error(out, fake, error_scale(layer, x))
    assert relative.max() <= bound(layer)
    if dtype == torch.float32:
        assert relative.max() <= 1e-6  # measured 2.5e-7: the worst-case bound is loose
        assert relative.max() > 0  # the two really are different computations


def test_native_int8_without_bias_on_a_transposed_input() -> None:
    layer, x = quantized_linear(INT8, INT8, bias=False)
    native = NativeInt8Linear.from_quantized(layer)
    x_t = x.transpose(0, 1)  # non-contiguous [8, 4, K]
    with torch.inference_mode():
        relative = relative_error(native(x_t), layer(x_t), error_scale(layer, x_t))
    assert relative.max() <= 1e-6


def test_conversion_keeps_the_state_dict_and_frees_the_float_weight() -> None:
    layer, _ = quantized_linear(INT8_CHANNEL, INT8)
    before = {name: t.clone() for name, t in layer.state_dict().items()}
    holder = Holder(proj=layer)
    convert_to_native(holder)
    after = holder.proj.state_dict()
    assert isinstance(holder.proj, NativeInt8Linear)
    assert list(after) == list(before) and set(before) == {"weight", "weight_scale", "input_scale", "bias"}
    assert all(torch.equal(after[name], before[name]) and after[name].dtype == before[name].dtype for name in before)
    assert holder.proj.dequantized_weight is None
    assert {name for name, _ in holder.proj.named_buffers(remove_duplicate=False)} == set(before) | {"output_scale", "kernel_bias"}


def test_summary_counts_each_kind_and_reason() -> None:
    int4_group = TensorSpec("int4", granularity="per_group", group_size=32)
    conv = QuantizedConv2d(
        torch.Size((8, 4, 1, 1)), INT8, {"weight": torch.ones(8, 4, 1, 1, dtype=torch.int8), "weight_scale": torch.tensor(1.0)},
        None, torch.float32, conv={"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1, "padding_mode": "zeros", "reversed_padding": [0, 0, 0, 0]},
    )
    holder = Holder(
        a=quantized_linear(INT8, INT8)[0],
        b=quantized_linear(INT8_CHANNEL, INT8_DYNAMIC)[0],
        weight_only=quantized_linear(INT8, None)[0],
        w4=quantized_linear(int4_group, None)[0],
        conv=conv,
        plain=torch.nn.Linear(4, 4),
    )
    report = convert_to_native(holder)
    assert report.int8 == ["a", "b"] and report.fp8 == []
    assert report.kept == {
        "weight_only": "Linear: weight-only int8 has no int8 activation",
        "w4": "Linear: int4 weights have no native kernel here",
        "conv": "Conv2d: native kernels cover Linear only",
    }
    assert str(report) == (
        "int8: 2 layers via torch._int_mm; fp8: 0; 3 kept fake-quant (1 Linear: weight-only int8 has no int8 activation, "
        "1 Linear: int4 weights have no native kernel here, 1 Conv2d: native kernels cover Linear only)"
    )
    assert type(holder.weight_only) is QuantizedLinear and type(holder.plain) is torch.nn.Linear
    again = convert_to_native(holder)
    assert (again.int8, again.kept) == (report.int8, report.kept)


def test_fp8_on_cpu_reports_the_fallback_and_stays_fake_quant() -> None:
    fp8 = TensorSpec("fp8_e4m3")
    layer, x = quantized_linear(fp8, fp8)
    holder = Holder(proj=layer)
    with torch.inference_mode():
        before = layer(x)
    report = convert_to_native(holder)
    assert report.fp8 == [] and report.kept == {"proj": f"Linear: {FP8_DEVICE_REASON}"}
    assert "fp8: 0 (fp8 kernels need a CUDA GPU with compute capability >= 8.9; kept fake-quant)" in str(report)
    assert holder.proj is layer
    with torch.inference_mode():
        assert torch.equal(holder.proj(x), before)
    with pytest.raises(ValueError, match="compute capability"):
        NativeFp8Linear.from_quantized(layer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_forward_matches_fake_quant_where_scaled_mm_runs(dtype) -> None:
    """The CUDA fp8 forward (column-major b, tensor-wise scales), run through torch's CPU _scaled_mm.

    convert_to_native never picks it on a CPU (it is no faster there than fake-quant); this only
    checks the arguments it passes, built without the eligibility check.
    """
    fp8 = TensorSpec("fp8_e4m3")
    layer, x = quantized_linear(fp8, fp8, dtype=dtype)
    native = NativeFp8Linear(layer.weight_shape, layer.weight_spec, layer.stored_tensors(), layer.bias, dtype,
                             layer.input_spec, {"input_scale": layer.input_scale})
    try:
        with torch.inference_mode():
            out = native(x)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"torch._scaled_mm does not run here: {exc}")
    with torch.inference_mode():
        relative = relative_error(out, layer(x), error_scale(layer, x))
    assert out.dtype == dtype and out.shape == (4, 8, 64)
    assert relative.max() <= bound(layer)


def test_ineligible_layers_and_a_root_layer_raise_with_the_reason() -> None:
    weight_only, _ = quantized_linear(INT8, None)
    with pytest.raises(ValueError, match="weight-only int8 has no int8 activation"):
        NativeInt8Linear.from_quantized(weight_only)
    layer, _ = quantized_linear(INT8, INT8)
    with pytest.raises(ValueError, match="from_quantized"):
        convert_to_native(layer)


@pytest.fixture(scope="module")
def int8_checkpoint(calib_factory, tmp_path_factory) -> tuple[Path, Path]:
    calib = calib_factory("tiny-sdxl")
    out = tmp_path_factory.mktemp("native") / "int8_w8a8"
    quantize(QuantizeSettings(calib=calib, recipe="int8_w8a8", out=out, device="cpu"), show_progress=False)
    return calib, out


def test_tiny_sdxl_checkpoint_runs_natively_within_tolerance(int8_checkpoint) -> None:
    calib, checkpoint = int8_checkpoint
    fake, manifest = load_quantized_submodule(checkpoint)
    native = copy.deepcopy(fake)
    before = {name: t.clone() for name, t in native.state_dict().items()}
    report = convert_to_native(native)

    linears = [e["name"] for e in manifest["layers"] if e["type"] == "Linear"]
    convs = [e["name"] for e in manifest["layers"] if e["type"] == "Conv2d"]
    assert sorted(report.int8) == sorted(linears) and len(linears) == 96
    assert report.kept == {name: "Conv2d: native kernels cover Linear only" for name in convs} and len(convs) == 22
    assert str(report) == "int8: 96 layers via torch._int_mm; fp8: 0; 22 kept fake-quant (22 Conv2d: native kernels cover Linear only)"
    after = native.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)

    fake_layers = dict(fake.named_modules())
    worst: dict[str, float] = {}

    def check(name: str):
        def hook(module, args, output) -> None:
            reference = fake_layers[name]
            relative = relative_error(output, reference(args[0]), error_scale(reference, args[0]))
            worst[name] = max(worst.get(name, 0.0), float(relative.max()))
            assert relative.max() <= bound(reference), name
        return hook

    for name in report.int8:
        native.get_submodule(name).register_forward_hook(check(name))
    artifact = CalibrationArtifact(calib)
    with torch.inference_mode():
        for i in range(len(artifact)):
            sample = artifact.sample(i)
            expected = submodule_output(fake(**sample))
            got = submodule_output(native(**sample))
            assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert len(worst) == 96 and max(worst.values()) <= 1e-6  # measured 2.9e-7


def test_generate_native_writes_a_png(int8_checkpoint, tmp_path: Path) -> None:
    _, checkpoint = int8_checkpoint
    out = tmp_path / "cat.png"
    result = CliRunner().invoke(main, ["generate", "--checkpoint", str(checkpoint), "--prompt", "a cat", "--out", str(out),
                                       "--steps", "1", "--device", "cpu", "--native"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "native: int8: 96 layers via torch._int_mm" in result.output


def test_empty_report_reads_as_nothing_converted() -> None:
    assert str(NativeReport()) == "int8: 0 layers via torch._int_mm; fp8: 0; 0 kept fake-quant"
