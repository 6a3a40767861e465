"""Quark export: reloaded by amd-quark's own diffusers integration (`import
quark.integrations.diffusers`, then `from_pretrained`) in a process that never imports
diffquant; dequantized weights from Quark's `QParamsLinear`, outputs on held-out samples."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from diffquant.errors import ConfigError
from diffquant.export import export_checkpoint
from diffquant.export.stored import StoredCheckpoint
from diffquant.quant.formats.e2m1 import dequantize_e2m1
from diffquant.quant.formats.pack import unpack_nibbles
from tests.helpers.export_checks import float_outputs, held_out_samples, outputs, run_without_diffquant, sqnr, to_plain

pytest.importorskip("quark")

BF16_REL = 2.0**-8  # half a bf16 ulp (8-bit significand), relative

QUARK_LOAD = r"""
import sys, torch, diffusers
import quark.integrations.diffusers  # registers Quark's quantizer with diffusers
from quark.torch.export.nn.modules.qparamslinear import QParamsLinear
from safetensors.torch import save_file
folder, cls_name, dtype, samples_path, out = sys.argv[1:]
model = getattr(diffusers, cls_name).from_pretrained(folder, torch_dtype=getattr(torch, dtype)).eval()
found = {}
with torch.inference_mode():
    for name, module in model.named_modules():
        if isinstance(module, QParamsLinear):
            found[name + ".weight"] = module._get_qweight(module.weight).contiguous()
    for i, sample in enumerate(torch.load(samples_path, weights_only=True)):
        result = model(**sample)
        found[f"output.{i}"] = (result[0] if isinstance(result, tuple) else result.sample).float().contiguous()
save_file(found, out)
assert "diffquant" not in sys.modules
"""


def _bf16_scales_recipe(root) -> str:
    """int8_w8a8 with `scale_dtype: bfloat16` on weights and inputs: scales Quark's bf16 buffers hold exactly."""
    import yaml

    from diffquant.paths import CONFIG_DIR

    raw = yaml.safe_load((CONFIG_DIR / "quant" / "int8_w8a8.yaml").read_text())
    raw["name"] = "int8_w8a8_bf16_scales"
    for part in ("weight", "input"):
        raw["global"][part]["scale_dtype"] = "bfloat16"
    path = root / "int8_w8a8_bf16_scales.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize("recipe", ["int8_weight_only", "int8_w8a8", "fp8", "mxfp4", "nvfp4_static", "int8_w8a8_bf16_scales"])
def test_quark_reloads_the_export_with_diffquant_weights(recipe, quantize_factory, private_calib, tmp_path) -> None:
    from diffquant.models.tiny import tiny_pipeline_dir

    result = quantize_factory("tiny-flux", _bf16_scales_recipe(tmp_path) if recipe == "int8_w8a8_bf16_scales" else recipe)
    report = export_checkpoint(result.out, "quark", tmp_path / "quark")
    assert sum(report.layers.values()) == len(result.manifest["layers"])
    samples = held_out_samples(result, private_calib("tiny-flux"))
    torch.save([to_plain(s) for s in samples], tmp_path / "samples.pt")
    assert tiny_pipeline_dir("flux").is_dir()
    run_without_diffquant(QUARK_LOAD, str(tmp_path / "quark"), "FluxTransformer2DModel", result.manifest["model"]["torch_dtype"],
                          str(tmp_path / "samples.pt"), str(tmp_path / "loaded.safetensors"))
    loaded = load_file(tmp_path / "loaded.safetensors")
    source = StoredCheckpoint.read(result.out)
    for record in source.layers:
        got = loaded[f"{record.name}.weight"]
        ours = source.dequantized(record)
        if recipe == "mxfp4":
            assert torch.equal(got, ours)  # E2M1 x 2^(e-127): exact in float32 on both sides
        elif recipe == "nvfp4_static":
            # The scale stage `.1.scale` (weight_scale_2) is also a model-dtype buffer: Quark
            # dequantizes e2m1(c) * (float32(e4m3 b) * float32(bf16(s2))), diffquant e2m1(c) * (b * s2).
            stored = source.stored(record)
            elements = dequantize_e2m1(unpack_nibbles(stored["weight_packed"]))
            blocks = stored["weight_scale"].float().repeat_interleave(16, dim=1)
            scale_2 = stored["weight_scale_2"].float()
            assert torch.equal(got, elements * (blocks * scale_2.bfloat16().float()))
            assert torch.all((got - ours).abs() <= elements.abs() * blocks * scale_2 * (BF16_REL + 2.0**-22))
        else:
            # Quark's RealQuantizer keeps `scale` in the model's dtype, so the reload rounds the
            # float32 scale to bfloat16 (nearest even) and dequantizes float32(q) * float32(bf16(s)).
            stored = source.stored(record)
            scale = stored["weight_scale"]
            assert torch.equal(got, stored["weight"].float() * scale.bfloat16().float())
            assert torch.all((got - ours).abs() <= stored["weight"].float().abs() * BF16_REL * scale)
            if recipe in ("int8_weight_only", "int8_w8a8", "int8_w8a8_bf16_scales"):
                assert torch.equal(got, ours)  # the scale is a bf16 value (scale_dtype): Quark's rounding is exact
    runtime = [loaded[f"output.{i}"] for i in range(len(samples))]
    reference = float_outputs("tiny-flux", samples)
    # Quark also keeps the static input scale in bf16 and quantizes x as
    # clamp(round(x / bf16(s)), -128, 127) * bf16(s) in bf16. The INT8 recipes take
    # `scale_dtype: model`, so on this bf16 model every stored scale is a bf16 value: the weights
    # reload bit-exact and only Quark's bf16 arithmetic of x / s and q * s remains, 0.08 dB on
    # tiny-flux int8_w8a8 (0.27 dB with float32 scales; measured). fp8 0.08 dB and NVFP4 0.04 dB
    # (its static input scale scales the per-call E4M3 block scales; its bf16 rounding moves each
    # block's grid by at most 2^-8 relative); weight-only exports 0.0 dB.
    tolerance = 0.1
    assert abs(sqnr(reference, runtime) - sqnr(reference, outputs(result.model, samples))) < tolerance


def test_quark_config_is_quark_own_format(quantize_factory, tmp_path) -> None:
    import json

    from quark.torch.quantization.config.config import QConfig

    result = quantize_factory("tiny-flux", "fp8")
    export_checkpoint(result.out, "quark", tmp_path / "quark")
    config = json.loads((tmp_path / "quark" / "config.json").read_text())["quantization_config"]
    parsed = QConfig.from_dict(config)
    assert config["quant_method"] == "quark" and config["export"]["weight_format"] == "real_quantized"
    assert parsed.global_quant_config.weight.dtype.value == "fp8_e4m3"
    assert parsed.global_quant_config.input_tensors.dtype.value == "fp8_e4m3"
    assert set(parsed.exclude) == {entry["name"] for entry in result.manifest["skipped"]}


def test_quark_nvfp4_export_has_the_layout_quark_writes_itself(quantize_factory, private_calib, tmp_path) -> None:
    """Quark's own nvfp4 scheme, quantized and exported by amd-quark on the same model, writes the
    same tensor names, dtypes and shapes for every quantized layer and the same serialized spec."""
    import json

    from diffusers import FluxTransformer2DModel
    from quark.torch import ModelQuantizer
    from quark.torch.export.api import export_safetensors
    from quark.torch.quantization.config.config import QConfig
    from quark.torch.quantization.config.template import FP4Block16ScaleE4M3Scheme
    from safetensors import safe_open

    from diffquant.models.tiny import tiny_pipeline_dir

    result = quantize_factory("tiny-flux", "nvfp4_static")
    export_checkpoint(result.out, "quark", tmp_path / "ours")
    model = FluxTransformer2DModel.from_pretrained(tiny_pipeline_dir("flux"), subfolder="transformer", torch_dtype=torch.bfloat16)
    exclude = [entry["name"] for entry in result.manifest["skipped"]]
    sample = to_plain(held_out_samples(result, private_calib("tiny-flux"))[0])
    quantized = ModelQuantizer(QConfig(global_quant_config=FP4Block16ScaleE4M3Scheme().config, exclude=exclude)).quantize_model(model, [sample])
    export_safetensors(quantized, tmp_path / "theirs", weight_format="real_quantized")

    def layout(folder):
        with safe_open(folder / "diffusion_pytorch_model.safetensors", "pt") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}

    ours, theirs = layout(tmp_path / "ours"), layout(tmp_path / "theirs")
    assert ours == theirs
    first = result.manifest["layers"][0]["name"]
    assert ours[f"{first}.weight_quantizer.0.scale"][0] == "F8_E4M3" and ours[f"{first}.input_quantizer.1.scale"] == ("F32", ())
    config = {name: json.loads((tmp_path / name / "config.json").read_text())["quantization_config"] for name in ("ours", "theirs")}
    assert config["ours"]["global_quant_config"] == config["theirs"]["global_quant_config"]
    assert config["ours"]["export"] == config["theirs"]["export"]


@pytest.mark.parametrize(("model", "recipe", "message"), [
    ("tiny-flux", "svdquant_w4a4", "low-rank branch.*int8_weight_only, fp8 or mxfp4"),
    ("tiny-flux", "w4a16", "int4 weights.*int8_weight_only"),
    ("tiny-flux", "nvfp4", "dynamic nvfp4.*static per-tensor input scale.*nvfp4_static"),
    ("tiny-sdxl", "int8_weight_only", "Conv2d.*packs only Linear"),
])
def test_quark_refuses_what_it_cannot_carry(model, recipe, message, quantize_factory, tmp_path) -> None:
    with pytest.raises(ConfigError, match=message):
        export_checkpoint(quantize_factory(model, recipe).out, "quark", tmp_path / "quark")
    assert not (tmp_path / "quark" / "diffusion_pytorch_model.safetensors").exists()
