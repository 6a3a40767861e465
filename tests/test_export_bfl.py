"""diffusers-bfl export: loaded by plain diffusers (a process that never imports diffquant)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffquant.errors import ConfigError
from diffquant.export import export_checkpoint
from diffquant.export.common import read_checkpoint
from diffquant.models.tiny import tiny_pipeline_dir
from tests.helpers.export_runtime import holdout_samples, output_sqnr, outputs, save_samples, weight_only

# Runs in a fresh interpreter: diffusers' own from_single_file + BFL quantizer, no diffquant.
LOADER = r'''
import json, sys
import torch
from safetensors.torch import load_file, save_file
from diffusers import FluxTransformer2DModel
from diffusers.quantizers.quantization_config import BFLQuantizationConfig
import diffusers.quantizers.bfl.utils as bfl

pipeline_dir, path, samples_path, out_path = sys.argv[1:]
config = json.load(open(f"{pipeline_dir}/transformer/config.json"))
inner = config["num_attention_heads"] * config["attention_head_dim"]
# diffusers' Flux converter splits linear1 by Flux.1's sizes (3072, 3072, 3072, 12288); the tiny twin
# has inner_dim 64, so that one call gets the tiny sizes. Everything else is diffusers' code as shipped.
real_split = torch.split
def split(tensor, sizes, dim=0):
    if tuple(sizes) == (3072, 3072, 3072, 12288):
        sizes = (inner, inner, inner, 4 * inner)
    return torch.Tensor.split(tensor, sizes, dim=dim)
torch.split = split
model = FluxTransformer2DModel.from_single_file(
    path, config=pipeline_dir, subfolder="transformer",
    quantization_config=BFLQuantizationConfig(compute_dtype=torch.bfloat16), torch_dtype=torch.bfloat16)
torch.split = real_split
assert "diffquant" not in sys.modules, "the loader process imported diffquant"
result = {}
for name, module in model.named_modules():
    if isinstance(module, bfl.BFLNVFP4Linear):
        result[f"w/{name}"] = bfl.dequantize_nvfp4(module.weight, module.weight_scale, module.weight_scale_2)
        result[f"input_scale/{name}"] = module.input_scale.reshape(1)
    elif isinstance(module, bfl.BFLFP8RLinear):
        result[f"w/{name}"] = bfl.dequantize_fp8r(module.weight, module.weight_scale)
samples = load_file(samples_path)
meta = json.load(open(samples_path + ".json"))
with torch.no_grad():
    for i in meta["ids"]:
        kwargs = {k.split("/", 1)[1]: v for k, v in samples.items() if k.startswith(f"{i}/")}
        kwargs.update(meta["consts"][str(i)])
        result[f"out/{i}"] = model(**kwargs)[0].float()
save_file({k: v.clone() for k, v in result.items()}, out_path)
'''


def _load_in_diffusers(export: Path, samples_path: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    out = tmp_path / "runtime.safetensors"
    proc = subprocess.run([sys.executable, "-c", LOADER, str(tiny_pipeline_dir("flux")), str(export), str(samples_path), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out))


@pytest.mark.parametrize(("recipe", "scheme"), [("fp8", "fp8r"), ("nvfp4_static", "nvfp4")])
def test_bfl_export_loads_in_plain_diffusers_with_equal_weights_and_outputs(quantize_factory, tmp_path: Path, recipe: str, scheme: str) -> None:
    result = quantize_factory("tiny-flux", recipe)
    path = tmp_path / "flux-bfl.safetensors"
    report = export_checkpoint(result.out, "diffusers-bfl", path)
    contents = read_checkpoint(result.out)
    assert report.layers == {scheme: len(contents.layers) - 14}  # 2 x (qkv, qkv) from 6, 2 x linear1 from 4
    samples = holdout_samples(result)
    save_samples(samples, tmp_path / "samples.safetensors")
    runtime = _load_in_diffusers(path, tmp_path / "samples.safetensors", tmp_path)

    # every quantized layer's weight, dequantized by diffusers' own BFL code, equals diffquant's bit for bit
    assert {k[2:] for k in runtime if k.startswith("w/")} == set(contents.layers)
    for name, record in contents.layers.items():
        assert torch.equal(runtime[f"w/{name}"], contents.dequantized(record)), name
        if scheme == "nvfp4":
            assert torch.equal(runtime[f"input_scale/{name}"], contents.input_params(record)["input_scale_2"].reshape(1))

    # outputs on held-out samples: diffusers dequantizes the weight and runs bf16 activations on the CPU,
    # which is diffquant's model with its weights and without input fake-quant
    from diffusers import FluxTransformer2DModel

    original = FluxTransformer2DModel.from_pretrained(tiny_pipeline_dir("flux"), subfolder="transformer", torch_dtype=torch.bfloat16)
    reference = outputs(original, samples)
    ours = output_sqnr(reference, outputs(weight_only(result.model), samples))
    theirs = output_sqnr(reference, {i: runtime[f"out/{i}"] for i, _ in samples})
    assert math.isfinite(ours) and abs(ours - theirs) <= 0.1, (ours, theirs)


@pytest.mark.parametrize(("recipe", "message"), [
    ("nvfp4", "needs a static NVFP4 input scale.*nvfp4_static"),
    ("int8_w8a8", "int8 per_tensor weights are neither fp8r nor nvfp4.*recipe fp8 or nvfp4_static"),
    ("svdquant_w4a4", "no SVDQuant low-rank branch.*recipe fp8 or nvfp4_static"),
])
def test_bfl_refuses_what_it_cannot_carry_naming_a_recipe(quantize_factory, tmp_path: Path, recipe: str, message: str) -> None:
    result = quantize_factory("tiny-flux", recipe)
    with pytest.raises(ConfigError, match=message):
        export_checkpoint(result.out, "diffusers-bfl", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_bfl_refuses_a_unet(quantize_factory, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="carries Flux transformers, not sdxl.*--to comfyui"):
        export_checkpoint(quantize_factory("tiny-sdxl", "fp8").out, "diffusers-bfl", tmp_path / "x.safetensors")
