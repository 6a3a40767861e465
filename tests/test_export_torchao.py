"""torchao export: loaded by plain diffusers (`from_pretrained`, its TorchAoConfig backend and
torchao's own safetensors unflattening) in a process that never imports diffquant."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from diffquant.errors import ConfigError
from diffquant.export import export_checkpoint
from diffquant.export.stored import StoredCheckpoint
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


@pytest.fixture(scope="session")
def fp8_weight_only(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("recipes") / "fp8_weight_only.yaml"
    path.write_text(FP8_WEIGHT_ONLY)
    return str(path)


@pytest.mark.parametrize(("recipe", "int8_tensor"), [("int8_weight_only", "Int8Tensor"), ("int8_weight_only", "IntxUnpackedToInt8Tensor"),
                                                    ("fp8_weight_only", "Int8Tensor")])
def test_diffusers_torchao_loads_the_export_with_diffquant_weights(recipe, int8_tensor, fp8_weight_only, quantize_factory, private_calib, tmp_path) -> None:
    result = quantize_factory("tiny-flux", fp8_weight_only if recipe == "fp8_weight_only" else recipe)
    report = export_checkpoint(result.out, "torchao", tmp_path / "tao", int8_tensor=int8_tensor)
    assert sum(report.layers.values()) == len(result.manifest["layers"])
    samples = held_out_samples(result, private_calib("tiny-flux"))
    torch.save([to_plain(s) for s in samples], tmp_path / "samples.pt")
    dtype = result.manifest["model"]["torch_dtype"]
    run_without_diffquant(TORCHAO_LOAD, str(tmp_path / "tao"), "FluxTransformer2DModel", dtype, str(tmp_path / "samples.pt"),
                          str(tmp_path / "loaded.safetensors"))
    loaded = load_file(tmp_path / "loaded.safetensors")
    source = StoredCheckpoint.read(result.out)
    for record in source.layers:
        # torchao: dequantize_affine((q - 0) * scale) in float32, one rounding to the model dtype.
        assert torch.equal(loaded[f"{record.name}.weight"], source.dequantized(record, getattr(torch, dtype)))
    runtime = [loaded[f"output.{i}"] for i in range(len(samples))]
    reference = float_outputs("tiny-flux", samples)
    # The weights are identical, the forward is not: for a per-row Int8Tensor torchao computes
    # bf16(bf16(x @ q^T) * bf16(s)) (int8_tensor.py, "optimized int8 path"), diffquant
    # bf16(x @ bf16(q * s)^T). On the tiny model (about 48 dB) that moves the SQNR by 0.58 dB
    # (int8, measured); Float8Tensor weight-only dequantizes first and stays within 0.1 dB.
    # `int8_tensor="IntxUnpackedToInt8Tensor"` makes torchao dequantize first, F.linear(x, bf16(q * s)),
    # diffquant's forward: the same output SQNR (0.0 dB apart, measured; its scale reloads as bf16,
    # exact because int8_weight_only stores bf16-valued scales on this bf16 model).
    tolerance = 1.0 if int8_tensor == "Int8Tensor" and recipe == "int8_weight_only" else 0.1
    assert abs(sqnr(reference, runtime) - sqnr(reference, outputs(result.model, samples))) < tolerance


@pytest.mark.parametrize(("model", "recipe", "message"), [
    ("tiny-flux", "int8_w8a8", "weight-only.*static input scales.*int8_weight_only"),
    ("tiny-flux", "fp8", "weight-only.*static input scales"),
    ("tiny-flux", "w4a16", "int4 weights.*no CPU path"),
    ("tiny-flux", "mxfp4", "mxfp4 weights"),
    ("tiny-flux", "svdquant_w4a16", "low-rank branch"),
    ("tiny-sdxl", "int8_weight_only", "Conv2d"),
])
def test_torchao_refuses_what_it_cannot_carry(model, recipe, message, quantize_factory, tmp_path) -> None:
    with pytest.raises(ConfigError, match=message):
        export_checkpoint(quantize_factory(model, recipe).out, "torchao", tmp_path / "tao")
    assert not (tmp_path / "tao" / "diffusion_pytorch_model.safetensors").exists()


def test_torchao_refuses_an_unknown_int8_tensor(quantize_factory, tmp_path) -> None:
    with pytest.raises(ConfigError, match="int8_tensor='Int4Tensor'.*Int8Tensor, IntxUnpackedToInt8Tensor"):
        export_checkpoint(quantize_factory("tiny-flux", "int8_weight_only").out, "torchao", tmp_path / "tao", int8_tensor="Int4Tensor")
    assert not (tmp_path / "tao").exists()
