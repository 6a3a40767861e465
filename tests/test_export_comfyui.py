"""comfyui export: read back with comfy-kitchen's own layouts (eager backend) on the CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from diffquant.errors import ConfigError
from diffquant.export import export_checkpoint
from diffquant.export.common import read_checkpoint
from diffquant.export.keys import original_key_map
from diffquant.models.tiny import tiny_pipeline_dir
from tests.helpers.export_runtime import holdout_samples, output_sqnr, outputs, weight_only

ck = pytest.importorskip("comfy_kitchen")
from comfy_kitchen.tensor import QuantizedTensor, TensorCoreFP8Layout, TensorCoreNVFP4Layout, TensorWiseINT8Layout  # noqa: E402

# ComfyUI's QUANT_ALGOS (comfy/quant_ops.py): format -> comfy-kitchen layout and storage dtype.
LAYOUTS = {"float8_e4m3fn": ("TensorCoreFP8Layout", TensorCoreFP8Layout, torch.float8_e4m3fn),
           "int8_tensorwise": ("TensorWiseINT8Layout", TensorWiseINT8Layout, torch.int8),
           "nvfp4": ("TensorCoreNVFP4Layout", TensorCoreNVFP4Layout, torch.uint8)}  # fmt: skip


def comfy_dequantize(path: Path, shapes: dict[str, tuple[int, int]]) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, torch.Tensor]]:
    """Every tensor of the file, quantized layers dequantized as ComfyUI's loader builds them
    (`_load_quantized_module`: QuantizedTensor(weight, layout, Params(scales, orig_dtype, orig_shape)))."""
    with safe_open(str(path), framework="pt") as handle:
        raw = {k: handle.get_tensor(k) for k in handle.keys()}
        header = json.loads(handle.metadata()["_quantization_metadata"])
    confs = {k[: -len(".comfy_quant")]: json.loads(raw.pop(k).numpy().tobytes()) for k in list(raw) if k.endswith(".comfy_quant")}
    assert header == {"format_version": "1.0", "layers": confs}
    dense: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    with ck.registry.use_backend("eager"):
        for layer, conf in confs.items():
            name, layout, storage = LAYOUTS[conf["format"]]
            weight = raw.pop(f"{layer}.weight")
            assert weight.dtype == storage
            if conf["format"] == "nvfp4":
                params = layout.Params(scale=raw.pop(f"{layer}.weight_scale_2"), block_scale=raw.pop(f"{layer}.weight_scale"),
                                       orig_dtype=torch.float32, orig_shape=shapes[layer])
            else:
                params = layout.Params(scale=raw.pop(f"{layer}.weight_scale"), orig_dtype=torch.float32, orig_shape=shapes[layer])
            dense[f"{layer}.weight"] = QuantizedTensor(weight, name, params).dequantize()
            if f"{layer}.input_scale" in raw:
                inputs[layer] = raw.pop(f"{layer}.input_scale")
    dense.update(raw)
    return dense, confs, inputs


def _to_diffusers(family: str, original: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers' own single-file converter on the export's (dequantized) tensors."""
    from diffusers.loaders import single_file_utils as sfu

    if family == "flux":
        inner = config["num_attention_heads"] * config["attention_head_dim"]
        real_split = torch.split

        def split(tensor, sizes, dim=0):  # Flux.1's hard-coded linear1 sizes -> the tiny twin's
            return real_split(tensor, (inner, inner, inner, 4 * inner) if tuple(sizes) == (3072, 3072, 3072, 12288) else sizes, dim=dim)

        torch.split = split
        try:
            return sfu.convert_flux_transformer_checkpoint_to_diffusers(dict(original))
        finally:
            torch.split = real_split
    return sfu.convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in original.items()}, config)


CASES = [("tiny-flux", "fp8"), ("tiny-flux", "nvfp4"), ("tiny-flux", "int8_weight_only"), ("tiny-sdxl", "fp8"), ("tiny-sdxl", "nvfp4")]


@pytest.mark.parametrize(("model", "recipe"), CASES)
def test_comfyui_export_dequantizes_in_comfy_kitchen_to_diffquant_weights(quantize_factory, tmp_path: Path, model: str, recipe: str) -> None:
    result = quantize_factory(model, recipe)
    contents = read_checkpoint(result.out)
    family = contents.family
    path = tmp_path / "comfy.safetensors"
    report = export_checkpoint(result.out, "comfyui", path, **({"conv": "dequantize"} if family == "sdxl" else {}))
    keymap = original_key_map(family, [*contents.tensors, *(f"{n}.weight" for n in contents.layers)])
    shapes = {}
    for name, record in contents.layers.items():
        target = keymap.fused_of(name) or keymap.module_key(name)
        rows = sum(contents.layers[p].out_features for p in keymap.fused[target]) if target in keymap.fused else record.out_features
        shapes[target] = (rows, record.in_features)
    dense, confs, inputs = comfy_dequantize(path, shapes)
    assert sum(report.layers.values()) == len(set(shapes)) and all(c["format"] in LAYOUTS for c in confs.values())

    target_class = "FluxTransformer2DModel" if family == "flux" else "UNet2DConditionModel"
    config = json.loads((tiny_pipeline_dir(family) / ("transformer" if family == "flux" else "unet") / "config.json").read_text())
    state = _to_diffusers(family, dense, config)
    # every quantized Linear: comfy-kitchen's dequantization (float32) equals diffquant's, bit for bit
    for name, record in contents.layers.items():
        expected = contents.dequantized(record)
        if record.type == "Conv2d":  # written dequantized, in the layer's dtype
            assert torch.equal(state[f"{name}.weight"], expected.to(getattr(torch, record.dtype))), name
        else:
            assert torch.equal(state[f"{name}.weight"], expected.reshape(record.out_features, -1)), name
            if record.input_tensors:
                suffix = "input_scale_2" if record.weight["dtype"] == "nvfp4" else "input_scale"
                target = keymap.fused_of(name) or keymap.module_key(name)
                assert torch.equal(inputs[target], contents.input_params(record)[suffix].float().reshape(()))
    # every other tensor keeps its value under its diffusers name (diffusers' converter found them all)
    plain = contents.plain_tensors()
    assert all(torch.equal(state[key], value) for key, value in plain.items() if key not in {f"{n}.weight" for n in contents.layers})

    # held-out outputs: the model with comfy-kitchen's weights vs diffquant's weight path
    import diffusers

    cls = getattr(diffusers, target_class)
    dtype = getattr(torch, contents.manifest["model"]["torch_dtype"])
    original = cls.from_pretrained(tiny_pipeline_dir(family), subfolder="transformer" if family == "flux" else "unet", torch_dtype=dtype)
    samples = holdout_samples(result)
    reference = outputs(original, samples)
    runtime = cls.from_pretrained(tiny_pipeline_dir(family), subfolder="transformer" if family == "flux" else "unet", torch_dtype=dtype)
    runtime.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    ours, theirs = output_sqnr(reference, outputs(weight_only(result.model), samples)), output_sqnr(reference, outputs(runtime, samples))
    assert math.isfinite(ours) and abs(ours - theirs) <= 0.1, (ours, theirs)


def test_comfyui_nvfp4_layout_is_high_nibble_first_and_tiled_scales(quantize_factory, tmp_path: Path) -> None:
    from comfy_kitchen.float_utils import to_blocked

    result = quantize_factory("tiny-flux", "nvfp4")
    contents = read_checkpoint(result.out)
    export_checkpoint(result.out, "comfyui", tmp_path / "c.safetensors")
    record = contents.layers["transformer_blocks.0.ff.net.2"]
    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as handle:
        weight = handle.get_tensor("double_blocks.0.img_mlp.2.weight")
        scale = handle.get_tensor("double_blocks.0.img_mlp.2.weight_scale")
    ours = contents.stored(record)["weight_packed"]
    assert torch.equal(weight, (ours << 4) | (ours >> 4))  # nibbles swapped: even element high
    assert torch.equal(scale.view(torch.uint8), to_blocked(contents.stored(record)["weight_scale"].view(torch.uint8), flatten=False))


@pytest.mark.parametrize(("model", "recipe", "message"), [
    ("tiny-flux", "int8_w8a8", "int8_tensorwise quantizes activations per row.*int8_weight_only"),
    ("tiny-flux", "w4a16", "int4 per_group weights have no ComfyUI layout.*fp8, nvfp4 or int8_weight_only"),
    ("tiny-flux", "mxfp4", "mxfp4 per_group weights have no ComfyUI layout"),
    ("tiny-flux", "svdquant_w4a16", "no SVDQuant low-rank branch.*fp8, nvfp4 or int8_weight_only"),
    ("tiny-sdxl", "fp8", "quantizes only Linear layers.*conv='dequantize'"),
])
def test_comfyui_refuses_what_it_cannot_carry(quantize_factory, tmp_path: Path, model: str, recipe: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        export_checkpoint(quantize_factory(model, recipe).out, "comfyui", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_comfy_kitchen_input_quantization_with_the_exported_input_scale_matches_diffquant(quantize_factory, tmp_path: Path) -> None:
    """ComfyUI quantizes a layer's input with `QuantizedTensor.from_float(x, layout, scale=input_scale)`.

    fp8: comfy-kitchen computes x * (1 / s) where diffquant divides, x / s. The two float32 quotients
    differ by at most 2 ulps, so the E4M3 codes agree except where the quotient lies within 2 ulps
    of a rounding midpoint, and there they are adjacent codes (one E4M3 step apart).
    """
    from diffquant.quant.weights import fake_quantize_input as fake_quantize
    from diffquant.quant.spec import TensorSpec

    result = quantize_factory("tiny-flux", "fp8")
    export_checkpoint(result.out, "comfyui", tmp_path / "c.safetensors")
    contents = read_checkpoint(result.out)
    record = contents.layers["transformer_blocks.0.ff.net.2"]
    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as handle:
        input_scale = handle.get_tensor("double_blocks.0.img_mlp.2.input_scale")
    assert torch.equal(input_scale, contents.input_params(record)["input_scale"])
    x = torch.randn(64, record.in_features, generator=torch.Generator().manual_seed(0)) * float(input_scale) * 200
    with ck.registry.use_backend("eager"):
        theirs = QuantizedTensor.from_float(x, "TensorCoreFP8Layout", scale=input_scale)
        theirs_codes = theirs._qdata
    ours = fake_quantize(x, TensorSpec(**record.input), contents.input_params(record))
    ours_codes = (x / input_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(ours, ours_codes.float() * input_scale)  # diffquant's path is x / s, RNE
    steps = (ours_codes.view(torch.int8).int() - theirs_codes.view(torch.int8).int()).abs()
    assert steps.max().item() <= 1 and (steps > 0).float().mean().item() < 1e-3


def test_comfyui_nvfp4_pads_rows_to_16_and_comfy_kitchen_slices_them_off() -> None:
    from diffquant.export.comfyui import comfy_tensors
    from diffquant.export.common import OriginalLayer
    from diffquant.quant.spec import TensorSpec
    from tests.helpers.export_runtime import synthetic_contents

    spec = TensorSpec(dtype="nvfp4")
    weight = torch.randn(20, 48, generator=torch.Generator().manual_seed(2))
    contents = synthetic_contents({"m": weight}, spec)
    record = contents.layers["m"]
    layer = OriginalLayer("m", ("m",), record, spec, record.shape, contents.stored(record), {})
    conf, tensors = comfy_tensors(layer)
    assert conf == {"format": "nvfp4"} and tensors["m.weight"].shape == (32, 24)  # rows 20 -> 32
    assert tensors["m.weight_scale"].shape == (128, 4)  # [20, 3] block scales in one 128 x 4 tile
    params = TensorCoreNVFP4Layout.Params(scale=tensors["m.weight_scale_2"], block_scale=tensors["m.weight_scale"],
                                          orig_dtype=torch.float32, orig_shape=(20, 48))
    with ck.registry.use_backend("eager"):
        dense = QuantizedTensor(tensors["m.weight"], "TensorCoreNVFP4Layout", params).dequantize()
    assert torch.equal(dense, contents.dequantized(record))


class _ComfyLinear(torch.nn.Module):
    """A Linear computed the way ComfyUI's `mixed_precision_ops.Linear.forward` does: the input is
    quantized by comfy-kitchen (`QuantizedTensor.from_float(x, layout, scale=input_scale)`, a
    per-call scale when the file has none) and `F.linear` dispatches on the quantized tensors
    (on the CPU comfy-kitchen dequantizes both operands)."""

    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None, layout: str, input_scale: torch.Tensor | None) -> None:
        super().__init__()
        self.weight, self.bias, self.layout, self.input_scale = weight, bias, layout, input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        with ck.registry.use_backend("eager"):
            quantized = QuantizedTensor.from_float(flat, self.layout, scale=self.input_scale)
            out = torch.nn.functional.linear(quantized, self.weight, self.bias)
        return out.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("recipe", ["fp8"])
def test_comfyui_forward_with_quantized_inputs_matches_diffquant_fake_quant(quantize_factory, tmp_path: Path, recipe: str) -> None:
    """tiny-sdxl with its Linear layers quantized (convolutions excluded): every Linear replaced by
    a ComfyUI-style Linear built from the exported file; held-out outputs within 0.1 dB of
    diffquant's fake-quant model (static fp8 input scales). NVFP4's quantized matmul runs only on
    Blackwell (comfy-kitchen's CPU path raises "CPU does not support swizzle"; ComfyUI then
    dequantizes the weight, the weight-only comparison above); its input quantization is checked
    at the tensor level below."""
    import diffusers

    spec = {"fp8": "{dtype: fp8_e4m3, granularity: per_tensor}", "nvfp4": "{dtype: nvfp4}"}[recipe]
    inputs = {"fp8": "{dtype: fp8_e4m3, granularity: per_tensor, dynamic: false}", "nvfp4": "{dtype: nvfp4, dynamic: true}"}[recipe]
    path = tmp_path / f"{recipe}_linear.yaml"
    path.write_text(f"name: {recipe}_linear\nglobal:\n  weight: {spec}\n  input: {inputs}\nexclude: ['*conv*']\nalgorithms: []\n")
    result = quantize_factory("tiny-sdxl", str(path))
    contents = read_checkpoint(result.out)
    assert contents.layers and all(r.type == "Linear" for r in contents.layers.values())
    export_checkpoint(result.out, "comfyui", tmp_path / "c.safetensors")
    keymap = original_key_map("sdxl", [*contents.tensors, *(f"{n}.weight" for n in contents.layers)])
    shapes = {keymap.module_key(n): (r.out_features, r.in_features) for n, r in contents.layers.items()}
    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as handle:
        raw = {k: handle.get_tensor(k) for k in handle.keys()}
    model = diffusers.UNet2DConditionModel.from_pretrained(tiny_pipeline_dir("sdxl"), subfolder="unet")
    for name in contents.layers:
        key = keymap.module_key(name)
        fmt = json.loads(raw[f"{key}.comfy_quant"].numpy().tobytes())["format"]
        layout_name, layout, _ = LAYOUTS[fmt]
        if fmt == "nvfp4":
            params = layout.Params(scale=raw[f"{key}.weight_scale_2"], block_scale=raw[f"{key}.weight_scale"], orig_dtype=torch.float32, orig_shape=shapes[key])
        else:
            params = layout.Params(scale=raw[f"{key}.weight_scale"], orig_dtype=torch.float32, orig_shape=shapes[key])
        parent, _, child = name.rpartition(".")
        original = model.get_submodule(name)
        setattr(model.get_submodule(parent), child, _ComfyLinear(QuantizedTensor(raw[f"{key}.weight"], layout_name, params),
                                                                 original.bias, layout_name, raw.get(f"{key}.input_scale")))
    samples = holdout_samples(result)
    reference = outputs(diffusers.UNet2DConditionModel.from_pretrained(tiny_pipeline_dir("sdxl"), subfolder="unet"), samples)
    ours, theirs = output_sqnr(reference, outputs(result.model, samples)), output_sqnr(reference, outputs(model, samples))
    assert math.isfinite(ours) and abs(ours - theirs) <= 0.1, (ours, theirs)


def test_comfy_kitchen_nvfp4_input_quantization_matches_diffquant_dynamic_nvfp4() -> None:
    """Without input_scale ComfyUI quantizes an nvfp4 layer's input per call: global scale
    amax / 2688, block scale e4m3(amax_blk / 6 / g) (diffquant: amax_blk / (6 g), one rounding
    less, and a 2^-9 floor), elements x / (g * block) to E2M1 by RNE. The two block ratios differ
    by at most 2 float32 ulps, so block scales agree except at an E4M3 midpoint, where they are
    adjacent; where they agree, the codes agree."""
    from diffquant.quant.formats.nvfp4 import nvfp4_global_scale, nvfp4_quantize

    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(3)) * torch.logspace(-2, 2, 64)
    with ck.registry.use_backend("eager"):
        theirs = QuantizedTensor.from_float(x, "TensorCoreNVFP4Layout")
    from comfy_kitchen.float_utils import from_blocked

    their_scales = from_blocked(theirs._params.block_scale, num_rows=256, num_cols=4)
    their_codes = torch.stack([theirs._qdata >> 4, theirs._qdata & 0xF], dim=-1).reshape(256, 64)
    assert torch.equal(theirs._params.scale, nvfp4_global_scale(x.abs().amax()))
    codes, scales = nvfp4_quantize(x, nvfp4_global_scale(x.abs().amax()))
    steps = (scales.view(torch.uint8).int() - their_scales.view(torch.uint8).int()).abs()
    assert steps.max().item() <= 1 and (steps > 0).float().mean().item() < 0.01
    same_block = (steps == 0).repeat_interleave(16, dim=1)
    assert torch.equal(codes[same_block], their_codes[same_block])
