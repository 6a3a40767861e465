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


def _with_rescaled_layer(src: Path, dst: Path, layer: str, factor: float) -> Path:
    """A copy of a checkpoint in which one NVFP4 layer's weight_scale_2 is multiplied by `factor`
    (the checkpoint of a model whose weight is that much larger): its qkv group no longer shares one."""
    import hashlib
    import json
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata()
    tensors[f"{layer}.weight_scale_2"] = tensors[f"{layer}.weight_scale_2"] * factor
    save_file(tensors, str(weights), metadata=metadata)
    manifest = json.loads((dst / "quant_manifest.json").read_text())
    manifest["files"]["model.safetensors"] = {"bytes": weights.stat().st_size, "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    (dst / "quant_manifest.json").write_text(json.dumps(manifest))
    return dst


def test_bfl_requantizes_a_qkv_group_with_different_global_scales(quantize_factory, tmp_path: Path) -> None:
    from diffquant.export.common import fuse_group

    result = quantize_factory("tiny-flux", "nvfp4_static")
    checkpoint = _with_rescaled_layer(result.out, tmp_path / "ckpt", "transformer_blocks.0.attn.to_k", 3.0)
    contents = read_checkpoint(checkpoint)
    parts = tuple(f"transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v"))
    fused = fuse_group(contents, "double_blocks.0.img_attn.qkv", parts)
    assert fused.requantized and 10.0 < fused.requant_sqnr_db < 60.0
    path = tmp_path / "flux-bfl.safetensors"
    report = export_checkpoint(checkpoint, "diffusers-bfl", path)
    assert any(note.startswith("double_blocks.0.img_attn.qkv: requantized") for note in report.notes)
    samples = holdout_samples(result)
    save_samples(samples, tmp_path / "samples.safetensors")
    runtime = _load_in_diffusers(path, tmp_path / "samples.safetensors", tmp_path)
    # diffusers splits the requantized matrix back into to_q / to_k / to_v: its rows are ours
    from diffquant.quant.weights import QuantizedWeight

    ours = QuantizedWeight(fused.spec, torch.Size(fused.shape), fused.stored).dequantize(torch.float32)
    assert torch.equal(torch.cat([runtime[f"w/{p}"] for p in parts]), ours)
    # the untouched groups are still exact
    for name in ("transformer_blocks.0.attn.add_q_proj", "single_transformer_blocks.1.proj_mlp"):
        assert torch.equal(runtime[f"w/{name}"], contents.dequantized(contents.layers[name]))
