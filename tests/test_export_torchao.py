"""torchao export: loaded by plain diffusers (`from_pretrained`, its TorchAoConfig backend and
torchao's own safetensors unflattening) in a process that never imports diffquant."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from diffquant.errors import ConfigError
from diffquant.export import export_checkpoint
from diffquant.export.stored import StoredCheckpoint
from diffquant.export.torchao_layout import torchao_input_spec
from diffquant.paths import CONFIG_DIR
from diffquant.quant.kernels.select import set_execution
from tests.helpers.export_checks import float_outputs, held_out_samples, outputs, run_without_diffquant, sqnr, to_plain

pytest.importorskip("torchao")

TORCHAO_LOAD = r"""
import sys, torch, diffusers
from safetensors.torch import save_file
folder, cls_name, dtype, samples_path, out = sys.argv[1:]
model = getattr(diffusers, cls_name).from_pretrained(folder, torch_dtype=getattr(torch, dtype)).eval()
found = {}
with torch.inference_mode():
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and type(module.weight).__name__ in ("Int8Tensor", "Float8Tensor", "IntxUnpackedToInt8Tensor"):
            found[name + ".weight"] = module.weight.dequantize().contiguous()
    for i, sample in enumerate(torch.load(samples_path, weights_only=True)):
        result = model(**sample)
        found[f"output.{i}"] = (result[0] if isinstance(result, tuple) else result.sample).float().contiguous()
save_file(found, out)
assert "diffquant" not in sys.modules
"""

FP8_WEIGHT_ONLY = """name: fp8_weight_only
description: FP8 E4M3 per-tensor weights (min_max), 16-bit inputs (test recipe for the torchao export).
global:
  weight: {dtype: fp8_e4m3, granularity: per_tensor, symmetric: true, observer: min_max}
exclude: []
algorithms: []
"""


W4A16_MODEL_SCALES = """name: w4a16_model_scales
description: w4a16 with its scales rounded up to the model dtype (test recipe for the torchao export).
global:
  weight: {dtype: int4, granularity: per_group, group_size: 64, symmetric: true, observer: mse_search, scale_rule: half_span, scale_dtype: model}
exclude: []
algorithms: []
"""


@pytest.fixture(scope="session")
def fp8_weight_only(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("recipes") / "fp8_weight_only.yaml"
    path.write_text(FP8_WEIGHT_ONLY)
    return str(path)


@pytest.fixture(scope="session")
def test_recipes(fp8_weight_only, tmp_path_factory) -> dict[str, str]:
    path = tmp_path_factory.mktemp("recipes") / "w4a16_model_scales.yaml"
    path.write_text(W4A16_MODEL_SCALES)
    return {"fp8_weight_only": fp8_weight_only, "w4a16_model_scales": str(path)}


def torchao_int8_dynamic_arithmetic(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a diffquant int8_dynamic model whose Linear layers compute what torchao 0.18's
    `Int8Tensor` linear does with diffquant's codes (int8_tensor.py, `act_quant_kwargs` path;
    kernel/intmm.py `_int_scaled_matmul_cpu`): bf16(f32(bf16(f32(q_x @ q_wᵀ) · s_x) · s_w) + b)."""
    import copy

    from diffquant.quant.kernels.gemm import as_rows, dynamic_int8_scale, from_rows, quantize_int8
    from diffquant.quant.modules import QuantizedLinear

    model = copy.deepcopy(model)
    for layer in model.modules():
        if isinstance(layer, QuantizedLinear):
            def forward(x: torch.Tensor, layer: QuantizedLinear = layer) -> torch.Tensor:
                rows = as_rows(x)
                s_x = dynamic_int8_scale(rows, layer.input_spec)
                acc = torch._int_mm(quantize_int8(rows, s_x, reciprocal=True), layer.weight.t())
                y = (acc.float() * s_x).to(x.dtype) * layer.weight_scale.float().reshape(-1)
                return from_rows((y if layer.bias is None else y + layer.bias).to(x.dtype), x)
            layer.forward = forward
    return model


@pytest.mark.parametrize(("recipe", "int8_tensor"), [("int8_weight_only", "Int8Tensor"), ("int8_weight_only", None),
                                                    ("fp8_weight_only", None), ("int8_dynamic", None), ("fp8_dynamic", None),
                                                    ("w4a16", None), ("w4a16_model_scales", None)])
def test_diffusers_torchao_loads_the_export_with_diffquant_weights(recipe, int8_tensor, test_recipes, quantize_factory, private_calib, tmp_path) -> None:
    result = quantize_factory("tiny-flux", test_recipes.get(recipe, recipe))
    report = export_checkpoint(result.out, "torchao", tmp_path / "tao", **({} if int8_tensor is None else {"int8_tensor": int8_tensor}))
    assert sum(report.layers.values()) == len(result.manifest["layers"])
    if recipe == "int8_weight_only":  # the default: IntxUnpackedToInt8Tensor, since int8_weight_only's scales are bf16 values here
        assert list(report.layers) == ["Int8WeightOnlyConfig" if int8_tensor else "IntxWeightOnlyConfig"]
    samples = held_out_samples(result, private_calib("tiny-flux"))
    torch.save([to_plain(s) for s in samples], tmp_path / "samples.pt")
    dtype = result.manifest["model"]["torch_dtype"]
    run_without_diffquant(TORCHAO_LOAD, str(tmp_path / "tao"), "FluxTransformer2DModel", dtype, str(tmp_path / "samples.pt"),
                          str(tmp_path / "loaded.safetensors"))
    loaded = load_file(tmp_path / "loaded.safetensors")
    source = StoredCheckpoint.read(result.out)
    compute = getattr(torch, dtype)
    for record in source.layers:
        # torchao: dequantize_affine((q - 0) * scale) in float32, one rounding to the model dtype.
        got, ours = loaded[f"{record.name}.weight"], source.dequantized(record, compute)
        if recipe != "w4a16":
            assert torch.equal(got, ours)
            continue
        # w4a16's float32 scales reload in bf16 (diffusers casts them): q · bf16(s), rounded once.
        codes, scale = source.int_codes(record).float(), source.scale_per_column(record)
        assert torch.equal(got, (codes * scale.to(compute).float()).to(compute))
        # |bf16(s) - s| <= 2^-8 s, and each side's product rounds once more by <= 2^-8 of itself.
        assert torch.all((got.float() - ours.float()).abs() <= codes.abs() * 2.0**-8 * scale + 2.0**-8 * (got.float().abs() + ours.float().abs()))
    if recipe == "w4a16":
        assert any("int4 scales" in note and "are not torch.bfloat16 values" in note for note in report.notes)
    runtime = sqnr(reference := float_outputs("tiny-flux", samples), [loaded[f"output.{i}"] for i in range(len(samples))])
    fake_quant = sqnr(reference, outputs(result.model, samples))
    # The weights are identical (w4a16: see its bullet). The forwards:
    # - Int8Tensor weight-only (opt-in) computes bf16(bf16(x @ q^T) * bf16(s)) (int8_tensor.py,
    #   "optimized int8 path"), diffquant bf16(x @ bf16(q * s)^T). On the tiny model (about 48 dB)
    #   that moves the SQNR by 0.58 dB (measured). The default, IntxUnpackedToInt8Tensor, dequantizes
    #   first, F.linear(x, bf16(q * s)), diffquant's forward: 0.000 dB apart (measured; its scale
    #   reloads as bf16, exact because int8_weight_only stores bf16-valued scales on this bf16 model).
    #   Float8Tensor weight-only dequantizes first and stays within 0.1 dB.
    # - Dynamic inputs: torchao quantizes them as diffquant does (same codes and scales,
    #   test_torchao_quantizes_inputs_as_the_dynamic_recipes_do), and the recipes' `matmul: torchao`
    #   computes the GEMM as torchao does: int8_dynamic 47.01 dB both (before, with the dequantized
    #   GEMM, diffquant gave 47.26: torchao's inner bf16 rounding of acc · s_x is in both now),
    #   fp8_dynamic 42.73 dB both (torch._scaled_mm; 42.56 with the dequantized bf16 GEMM).
    # - int4 (IntxUnpackedToInt8Tensor): w4a16's float32 scales reload in bf16, which moves the
    #   output SQNR by 0.14 dB on tiny-flux (40.20 against 40.06 dB, measured); with bf16-valued
    #   scales (w4a16_model_scales) the weights and outputs are diffquant's (0.000 dB).
    # Where the runtime computes diffquant's arithmetic (0.000 dB measured) the bound is 0.01 dB:
    # only the unquantized layers' float GEMMs may sum in another order in the other process.
    exact = recipe in ("int8_weight_only", "int8_dynamic", "fp8_dynamic", "w4a16_model_scales") and int8_tensor is None
    tolerance = 0.01 if exact else 1.0 if int8_tensor == "Int8Tensor" else 0.3 if recipe == "w4a16" else 0.1
    assert abs(runtime - fake_quant) < tolerance
    if recipe == "int8_dynamic":  # torchao's epilogue written out from its source gives diffquant's outputs bit for bit
        ours, ported = outputs(result.model, samples), outputs(torchao_int8_dynamic_arithmetic(result.model), samples)
        assert all(torch.equal(a, b) for a, b in zip(ours, ported))
    if recipe == "fp8_dynamic":
        import copy

        native = copy.deepcopy(result.model)
        assert set_execution(native, "native").counts() == {"native": len(source.layers)}
        assert abs(runtime - sqnr(reference, outputs(native, samples))) < 0.01


@pytest.mark.parametrize(("weight_dtype", "granularity"), [("int8", "PerRow"), ("fp8_e4m3", "PerTensor")])
def test_torchao_quantizes_inputs_as_the_dynamic_recipes_do(weight_dtype, granularity) -> None:
    """torchao's own activation quantizer (`Int8Tensor.from_hp` / `Float8Tensor.from_hp`, what its
    linear calls on every input) gives diffquant's fake-quantized inputs bit for bit, on bf16
    tokens of magnitudes 2^-12 .. 2^6 (the rule in torchao_layout's docstring)."""
    import torchao.quantization as tq
    from torchao.quantization.quantize_.workflows import Float8Tensor, Int8Tensor

    from diffquant.quant.spec import resolve_scale_dtype
    from diffquant.quant.weights import fake_quantize_input
    from diffquant.recipes import load_recipe

    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 512, 256, generator=generator) * 2.0 ** torch.randint(-12, 7, (4, 512, 1), generator=generator)).bfloat16()
    recipe = load_recipe("int8_dynamic" if weight_dtype == "int8" else "fp8_dynamic").global_spec
    spec = resolve_scale_dtype(recipe, "bfloat16").input
    assert spec == torchao_input_spec(weight_dtype, "bfloat16")
    if weight_dtype == "int8":
        theirs = Int8Tensor.from_hp(x, tq.PerRow())
        division = fake_quantize_input(x, dataclasses.replace(spec, rounding="half_even"), None)
        assert 0 < int((division != theirs.dequantize()).sum()) < x.numel() // 1000  # x / s differs from x · fl(1 / s) at ties only
        # The documented exception: torchao raises s to 2^-23, so a token of amax < 127.5 · 2^-23
        # gets codes round(x / 2^-23) there (8 for 1e-6) and +-127 here.
        tiny = torch.tensor([[1e-6, -5e-7]], dtype=torch.bfloat16)
        assert Int8Tensor.from_hp(tiny, tq.PerRow()).qdata.tolist() == [[8, -4]]
        assert fake_quantize_input(tiny, spec, None)[0, 0] == tiny[0, 0]
    else:
        theirs = Float8Tensor.from_hp(x, granularity=tq.PerTensor())
        float32_scale = fake_quantize_input(x, dataclasses.replace(spec, scale_dtype=None), None)
        assert not torch.equal(float32_scale, theirs.dequantize())  # torchao's scale is the bf16 amax / 448
    assert torch.equal(fake_quantize_input(x, spec, None), theirs.dequantize())


@pytest.mark.parametrize(("model", "recipe", "message"), [
    ("tiny-flux", "int8_w8a8", "static input scales.*dynamically at each call — quantize with int8_dynamic, or a weight-only recipe such as int8_weight_only"),
    ("tiny-flux", "fp8", "static input scales.*dynamically at each call — quantize with fp8_dynamic"),
    ("tiny-flux", "w4a4", "quantizes its inputs; torchao's int4 config here is weight-only — quantize with w4a16"),
    ("tiny-flux", "mxfp4", "mxfp4 weights"),
    ("tiny-flux", "svdquant_w4a16", "low-rank branch"),
    ("tiny-sdxl", "int8_weight_only", "Conv2d"),
])
def test_torchao_refuses_what_it_cannot_carry(model, recipe, message, quantize_factory, tmp_path) -> None:
    with pytest.raises(ConfigError, match=message):
        export_checkpoint(quantize_factory(model, recipe).out, "torchao", tmp_path / "tao")
    assert not (tmp_path / "tao" / "diffusion_pytorch_model.safetensors").exists()


INT8_DYNAMIC_PER_TENSOR = """name: int8_dynamic_per_tensor
description: INT8 per-channel weights, dynamic per-tensor INT8 inputs (amax / 127) - not torchao's rule (test recipe).
global:
  weight: {dtype: int8, granularity: per_channel, symmetric: true, observer: min_max}
  input: {dtype: int8, granularity: per_tensor, symmetric: true, dynamic: true}
exclude: []
algorithms: []
"""


def test_torchao_refuses_dynamic_inputs_under_another_rule(quantize_factory, tmp_path) -> None:
    recipe = tmp_path / "int8_dynamic_per_tensor.yaml"
    recipe.write_text(INT8_DYNAMIC_PER_TENSOR)
    result = quantize_factory("tiny-flux", str(recipe))
    with pytest.raises(ConfigError, match=r"inputs as int8 tensor sym dynamic qmax scale \(in float32\), rounding half_even; torchao's "
                                          r"Int8DynamicActivationInt8WeightConfig computes int8 token sym dynamic half_span scale \(in bfloat16\), "
                                          r"rounding half_even_reciprocal — quantize with int8_dynamic"):
        export_checkpoint(result.out, "torchao", tmp_path / "tao")
    with pytest.raises(ConfigError, match="IntxUnpackedToInt8Tensor.*weight-only.*drop int8_tensor"):
        export_checkpoint(quantize_factory("tiny-flux", "int8_dynamic").out, "torchao", tmp_path / "tao", int8_tensor="IntxUnpackedToInt8Tensor")
    assert not (tmp_path / "tao").exists()


def test_torchao_refuses_an_unknown_or_misplaced_int8_tensor(quantize_factory, tmp_path) -> None:
    with pytest.raises(ConfigError, match="int8_tensor='Int4Tensor'.*Int8Tensor, IntxUnpackedToInt8Tensor"):
        export_checkpoint(quantize_factory("tiny-flux", "int8_weight_only").out, "torchao", tmp_path / "tao", int8_tensor="Int4Tensor")
    with pytest.raises(ConfigError, match="int8_tensor='Int8Tensor' chooses the tensor of int8 weights, and recipe w4a16 stores int4 layers — drop int8_tensor"):
        export_checkpoint(quantize_factory("tiny-flux", "w4a16").out, "torchao", tmp_path / "tao", int8_tensor="Int8Tensor")
    assert not (tmp_path / "tao").exists()


def test_torchao_notes_a_dynamic_checkpoint_computed_with_the_dequantized_gemm(quantize_factory, tmp_path) -> None:
    recipe = tmp_path / "int8_dynamic_dequantized.yaml"
    recipe.write_text((CONFIG_DIR / "quant" / "int8_dynamic.yaml").read_text().replace("name: int8_dynamic", "name: int8_dynamic_dequantized")
                      .replace(", matmul: torchao}", "}"))
    report = export_checkpoint(quantize_factory("tiny-flux", str(recipe)).out, "torchao", tmp_path / "tao")
    assert any(note.endswith("were computed in diffquant with the dequantized GEMM; torchao runs the GEMM from the codes, so its outputs "
                             "differ by that rounding (recipe int8_dynamic computes torchao's: input spec matmul: torchao)") for note in report.notes)


INT8_FLOAT32_SCALES = """name: int8_float32_scales
description: INT8 per-channel weights with float32 scales (test recipe).
global:
  weight: {dtype: int8, granularity: per_channel, symmetric: true, observer: min_max}
exclude: []
algorithms: []
"""


def test_torchao_default_keeps_the_weights_exact_when_scales_are_not_model_dtype_values(quantize_factory, tmp_path) -> None:
    """IntxUnpackedToInt8Tensor reloads its scales in the model dtype, so float32 scales in a bf16
    model would move the weights: the default then writes Int8Tensor and says why."""
    recipe = tmp_path / "int8_float32_scales.yaml"
    recipe.write_text(INT8_FLOAT32_SCALES)
    out = quantize_factory("tiny-flux", str(recipe)).out
    scale = StoredCheckpoint.read(out).stored(StoredCheckpoint.read(out).layers[0])["weight_scale"]
    assert not torch.equal(scale.bfloat16().float(), scale)
    report = export_checkpoint(out, "torchao", tmp_path / "tao")
    assert list(report.layers) == ["Int8WeightOnlyConfig"]
    assert any(note.startswith("int8 weights as Int8Tensor: ") and "are not torch.bfloat16 values" in note for note in report.notes)
    config = json.loads((tmp_path / "tao" / "config.json").read_text())
    assert "Int8WeightOnlyConfig" in json.dumps(config["quantization_config"])
