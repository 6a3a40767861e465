"""Shared export pieces: inverse key maps (round trip through diffusers' own converters),
fused-group stacking and requantization, the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from diffquant.export.common import fuse_group
from diffquant.export.keys import original_key_map, qkv_groups
from diffquant.models.tiny import tiny_pipeline_dir
from tests.helpers.export_runtime import synthetic_contents as _contents
from diffquant.quant.weights import QuantizedWeight
from diffquant.quant.spec import TensorSpec


@pytest.mark.parametrize("family", ["sdxl", "sd15", "sd21"])
def test_unet_keys_round_trip_through_diffusers_ldm_converter(family: str) -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir(family), subfolder="unet")
    state = unet.state_dict()
    original = original_key_map(family, state).to_original(state)
    assert "input_blocks.1.0.in_layers.2.weight" in original and "middle_block.1.proj_in.weight" in original
    back = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in original.items()}, dict(unet.config))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_flux_keys_round_trip_through_diffusers_flux_converter() -> None:
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    model = FluxTransformer2DModel.from_pretrained(tiny_pipeline_dir("flux"), subfolder="transformer")
    state = model.state_dict()
    original = original_key_map("flux", state).to_original(state)
    assert original["double_blocks.0.img_attn.qkv.weight"].shape == (3 * 64, 64)
    assert original["single_blocks.0.linear1.weight"].shape == (3 * 64 + 256, 64)
    real_split = torch.split

    def split(tensor, sizes, dim=0):  # the converter hard-codes Flux.1's (3072, 3072, 3072, 12288)
        return real_split(tensor, (64, 64, 64, 256) if tuple(sizes) == (3072, 3072, 3072, 12288) else sizes, dim=dim)

    torch.split = split
    try:
        back = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    finally:
        torch.split = real_split
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_qkv_groups_follow_shared_inputs() -> None:
    names = ["u.attn1.to_q", "u.attn1.to_k", "u.attn1.to_v", "u.attn2.to_q", "u.attn2.to_k", "u.attn2.to_v",
             "f.attn.add_q_proj", "f.attn.add_k_proj", "f.attn.add_v_proj", "f.attn.to_out.0"]  # fmt: skip
    assert qkv_groups(names) == [("f.attn.add_q_proj", "f.attn.add_k_proj", "f.attn.add_v_proj"),
                                 ("u.attn1.to_q", "u.attn1.to_k", "u.attn1.to_v"), ("u.attn2.to_k", "u.attn2.to_v")]  # fmt: skip


def test_fused_nvfp4_group_with_different_global_scales_is_requantized_and_measured() -> None:
    # q alone: amax 2688, global 1. k alone: amax 3.3, global 3.3 / 2688, block scale 448 -> exact 3.3.
    # Stacked: global 1, k's block ratio 3.3 / 6 = 0.55 rounds to E4M3 0.5625; 3.3 / 0.5625 = 5.87 -> 6.0.
    q = torch.zeros(1, 16)
    q[0, 0] = 2688.0
    k = torch.zeros(1, 16)
    k[0, 0] = 3.3
    spec = TensorSpec(dtype="nvfp4")
    contents = _contents({"a.to_q": q, "a.to_k": k}, spec)
    assert QuantizedWeight(spec, torch.Size((1, 16)), contents.stored(contents.layers["a.to_k"])).dequantize(torch.float32)[0, 0].item() == pytest.approx(3.3, rel=1e-6)
    fused = fuse_group(contents, "a.qkv", ("a.to_q", "a.to_k"))
    assert fused.shape == (2, 16) and fused.requantized
    assert fused.stored["weight_scale_2"].item() == 1.0
    assert fused.stored["weight_scale"].float()[:, 0].tolist() == [448.0, 0.5625]
    approx = QuantizedWeight(spec, torch.Size((2, 16)), fused.stored).dequantize(torch.float32)
    assert approx[1, 0].item() == 6.0 * 0.5625
    expected = 10 * math.log10((2688.0**2 + 3.3**2) / (3.375 - 3.3) ** 2)
    assert fused.requant_sqnr_db == pytest.approx(expected, abs=1e-3)


def test_fused_group_with_shared_scales_reuses_the_codes_exactly() -> None:
    spec = TensorSpec(dtype="nvfp4")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 32, generator=gen)
    parts = {"a.to_q": base, "a.to_k": base.flip(0), "a.to_v": base.roll(1, dims=1)}  # same amax, same global scale
    contents = _contents(parts, spec)
    fused = fuse_group(contents, "a.qkv", tuple(parts))
    assert not fused.requantized and math.isinf(fused.requant_sqnr_db)
    stacked = torch.cat([contents.stored(contents.layers[n])["weight_packed"] for n in parts])
    assert torch.equal(fused.stored["weight_packed"], stacked)


def test_fused_fp8_per_tensor_group_requantizes_with_the_largest_scale() -> None:
    spec = TensorSpec(dtype="fp8_e4m3", granularity="per_tensor")
    q = torch.tensor([[448.0, 1.0]])
    # k alone: scale s = 0.3 / 448, codes 448 and e4m3(0.1 / s = 149.3) = 144, so it dequantizes to
    # (0.3, 144 s = 0.0964). Stacked: scale 1 (q's), e4m3(0.3) = 0.3125 (step 2^-5 in [0.25, 0.5)),
    # e4m3(0.0964) = 0.09375 (step 2^-7 in [0.0625, 0.125)).
    k = torch.tensor([[0.3, 0.1]])
    fused = fuse_group(_contents({"a.to_q": q, "a.to_k": k}, spec), "a.qkv", ("a.to_q", "a.to_k"))
    assert fused.stored["weight_scale"].item() == 1.0
    assert fused.stored["weight"].float()[1].tolist() == [0.3125, 0.09375]
    assert math.isfinite(fused.requant_sqnr_db) and fused.requantized


def test_cli_export_refusal_is_one_line_exit_2(quantize_factory, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from diffquant.cli import main

    result = CliRunner().invoke(main, ["export", str(quantize_factory("tiny-flux", "nvfp4").out), "--to", "diffusers-bfl", "--out", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 2
    assert "Error: recipe nvfp4" in result.output and "quantize with recipe nvfp4_static" in result.output
    assert "Traceback" not in result.output


def test_export_docstring_examples_run() -> None:
    import doctest

    from diffquant.export import comfyui, common, diffusers_bfl, keys, modelopt_layout

    for module in (common, keys, comfyui, diffusers_bfl, modelopt_layout):
        failures, attempted = doctest.testmod(module)
        assert failures == 0 and attempted > 0, module.__name__


def test_a_quantized_swapped_module_has_its_row_halves_exchanged() -> None:
    from diffquant.export.common import original_layout
    from diffquant.export.keys import swap_halves

    spec = TensorSpec(dtype="nvfp4")
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(4))
    contents = _contents({"norm_out.linear": weight}, spec)
    layers, _, _ = original_layout(contents, original_key_map("flux", ["norm_out.linear.weight"]))
    (layer,) = layers
    assert layer.key == "final_layer.adaLN_modulation.1"
    swapped = QuantizedWeight(spec, torch.Size((8, 32)), layer.stored).dequantize(torch.float32)
    assert torch.equal(swapped, swap_halves(contents.dequantized(contents.layers["norm_out.linear"])))


@pytest.mark.parametrize("weight", [{"dtype": "fp8_e4m3", "granularity": "per_tensor"}, {"dtype": "int8", "granularity": "per_tensor"}, {"dtype": "nvfp4"}])
def test_share_groups_fused_makes_the_linear1_stack_exact(weight: dict) -> None:
    """Parts quantized with recipe `share_groups: fused` stack without requantization (the
    quantize-time shared scale); the same parts chosen apart are requantized at export."""
    from diffquant.artifacts.checkpoint_records import LayerRecord
    from diffquant.export.common import CheckpointContents
    from diffquant.quant.quantizer import build_quantized_layer, plan_layers
    from diffquant.quant.recipe import recipe_from_dict

    generator = torch.Generator().manual_seed(3)
    block = torch.nn.Module()
    block.attn = torch.nn.Module()
    for i, part in enumerate(("to_q", "to_k", "to_v")):
        setattr(block.attn, part, torch.nn.Linear(32, 16, bias=False))
        getattr(block.attn, part).weight.data = torch.randn(16, 32, generator=generator) * (1 + i)
    block.proj_mlp = torch.nn.Linear(32, 64, bias=False)
    model = torch.nn.Module()
    model.single_transformer_blocks = torch.nn.ModuleList([block])
    parts = ("single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
             "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp")  # fmt: skip

    def contents(share: str) -> CheckpointContents:
        recipe = recipe_from_dict({"name": "t", "global": {"weight": weight}, "share_groups": share})
        plans, _ = plan_layers(model, recipe, (), ())
        layers, tensors = {}, {}
        for plan in plans:
            layer, _ = build_quantized_layer(model.get_submodule(plan.name), plan, None, None)
            names = {suffix: f"{plan.name}.{suffix}" for suffix in layer.stored_names}
            tensors.update({key: getattr(layer, suffix) for suffix, key in names.items()})
            layers[plan.name] = LayerRecord(name=plan.name, type="Linear", shape=tuple(layer.weight_shape), dtype="float32",
                                            weight=plan.spec.weight.to_dict(), tensors=names)  # fmt: skip
        return CheckpointContents(Path("."), {"quantization_config": {"recipe": "t"}}, layers, tensors)

    shared, apart = contents("fused"), contents("none")
    exact = fuse_group(shared, "single_blocks.0.linear1", parts)
    assert not exact.requantized and exact.requant_sqnr_db == math.inf
    stacked = torch.cat([shared.dequantized(shared.layers[p]) for p in parts])
    assert torch.equal(QuantizedWeight(exact.spec, torch.Size(exact.shape), exact.stored).dequantize(torch.float32), stacked)
    assert fuse_group(apart, "single_blocks.0.linear1", parts).requantized
