"""share_groups and SVDQuant with static inputs: what the quantizer chooses once per shared-input group."""

from __future__ import annotations

import pytest
import torch

from diffquant.models.presets import resolve_model
from diffquant.models.submodule import load_submodule
from diffquant.quant.activation_stats import LayerActivationStats
from diffquant.quant.algorithms.svdquant import low_rank_split, smoothing_factor
from diffquant.quant.errors import ConfigError
from diffquant.quant.formats.affine import choose_qparams_affine
from diffquant.quant.formats.nvfp4 import nvfp4_global_scale, nvfp4_quantize
from diffquant.quant.formats.pack import pack_nibbles
from diffquant.quant.observers import make_observer
from diffquant.quant.quantizer import build_quantized_layer, plan_layers
from diffquant.quant.recipe import recipe_from_dict
from diffquant.quant.shared_groups import shared_input_groups

NVFP4_SVD = {"weight": {"dtype": "nvfp4"}, "input": {"dtype": "nvfp4", "dynamic": False, "observer": "min_max"}}
SVD = [{"name": "svdquant", "rank": 8, "alpha": 0.5, "svd": "full"}]


class Attention(torch.nn.Module):
    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.to_out = (torch.nn.Linear(64, 32) for _ in range(4))
        with torch.no_grad():
            for i, layer in enumerate((self.to_q, self.to_k, self.to_v)):
                layer.weight.copy_(torch.randn(32, 64, generator=generator) * (1 + i))  # different ranges per part


def _model_and_inputs() -> tuple[torch.nn.Module, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Module()
    model.attn = Attention(generator)
    x = torch.randn(256, 64, generator=generator)
    x[:, [3, 40]] *= 30  # outlier channels, which smoothing moves into the weight
    return model, x


def _build_all(model: torch.nn.Module, x: torch.Tensor, raw: dict) -> dict[str, torch.nn.Module]:
    recipe = recipe_from_dict(raw)
    plans, _ = plan_layers(model, recipe, ("*to_out*",), ())
    observer = make_observer("min_max", rows=1)
    observer.update(x.reshape(1, -1))
    stats = LayerActivationStats(channel_absmax=x.abs().amax(dim=0), range_state=observer.state_dict())
    return {plan.name: build_quantized_layer(model.get_submodule(plan.name), plan, stats, recipe.svdquant)[0] for plan in plans}


def test_groups_of_the_tiny_models_are_modelopts_and_bfls() -> None:
    flux = [name for name, m in load_submodule(resolve_model("tiny-flux")).named_modules() if isinstance(m, torch.nn.Linear)]
    qkv, fused = shared_input_groups(flux, "qkv"), shared_input_groups(flux, "fused")
    assert len(qkv) == 6 and all(len(g) == 3 for g in qkv)  # 2 double blocks x (image, context), 2 single blocks
    linear1 = [g for g in fused if g[-1].endswith("proj_mlp")]
    assert [g[0] for g in linear1] == ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.attn.to_q"]
    assert all(len(g) == 4 for g in linear1) and len(fused) == 6
    sdxl = [name for name, m in load_submodule(resolve_model("tiny-sdxl")).named_modules() if isinstance(m, torch.nn.Linear)]
    groups = shared_input_groups(sdxl, "qkv")
    assert groups and all(g[0].endswith("attn1.to_q") and len(g) == 3 or g[0].endswith("attn2.to_k") and len(g) == 2 for g in groups)
    assert shared_input_groups(sdxl, "none") == []


def test_qkv_group_shares_smoothing_branch_and_scales_and_stacks_to_the_joint_split() -> None:
    model, x = _model_and_inputs()
    layers = _build_all(model, x, {"name": "t", "global": NVFP4_SVD, "share_groups": "qkv", "algorithms": SVD})
    names = ["attn.to_q", "attn.to_k", "attn.to_v"]
    # the joint choice, computed here from its definition: smoothing over the stacked weight, one SVD
    stacked = torch.cat([model.get_submodule(n).weight.detach() for n in names])
    smooth = smoothing_factor(x.abs().amax(dim=0), stacked, 0.5)
    split = low_rank_split(stacked, smooth, 8, "full")
    global_scale = nvfp4_global_scale(split.residual.abs().amax())
    codes, block_scale = nvfp4_quantize(split.residual, global_scale)
    for i, name in enumerate(names):
        layer, rows = layers[name], slice(32 * i, 32 * (i + 1))
        assert torch.equal(layer.smooth_factor, smooth)
        assert torch.equal(layer.lora_down, split.lora_down.to(layer.lora_down.dtype))
        assert torch.equal(layer.lora_up, split.lora_up[rows].to(layer.lora_up.dtype))
        assert torch.equal(layer.weight_scale_2, global_scale)
        assert torch.equal(layer.weight_packed, pack_nibbles(codes[rows])) and torch.equal(layer.weight_scale.view(torch.uint8), block_scale[rows].view(torch.uint8))
        # static input scale: the min_max range of x / s, exactly
        assert torch.equal(layer.input_scale_2, nvfp4_global_scale((x / smooth).abs().amax()))
    assert layers["attn.to_q"].input_scale_2 == layers["attn.to_v"].input_scale_2


def test_without_share_groups_each_part_chooses_its_own() -> None:
    model, x = _model_and_inputs()
    layers = _build_all(model, x, {"name": "t", "global": NVFP4_SVD, "algorithms": SVD})
    q, v = layers["attn.to_q"], layers["attn.to_v"]
    assert not torch.equal(q.smooth_factor, v.smooth_factor) and not torch.equal(q.weight_scale_2, v.weight_scale_2)
    assert torch.equal(v.input_scale_2, nvfp4_global_scale((x / v.smooth_factor).abs().amax()))


def test_static_int8_inputs_with_svdquant_take_the_smoothed_range() -> None:
    model, x = _model_and_inputs()
    spec = {"weight": {"dtype": "int8", "granularity": "per_channel"}, "input": {"dtype": "int8", "granularity": "per_tensor", "observer": "min_max"}}
    layer = _build_all(model, x, {"name": "t", "global": spec, "algorithms": SVD})["attn.to_k"]
    m = (x / layer.smooth_factor).abs().amax()
    assert torch.equal(layer.input_scale, choose_qparams_affine(-m, m, -128, 127, True)[0].float())


def test_share_groups_per_tensor_weights_share_one_scale_without_svd() -> None:
    model, x = _model_and_inputs()
    spec = {"weight": {"dtype": "fp8_e4m3", "granularity": "per_tensor"}, "input": {"dtype": "fp8_e4m3", "granularity": "per_tensor"}}
    layers = _build_all(model, x, {"name": "t", "global": spec, "share_groups": "fused"})
    stacked = torch.cat([model.get_submodule(f"attn.{p}").weight.detach() for p in ("to_q", "to_k", "to_v")])
    scales = {layers[f"attn.{p}"].weight_scale.item() for p in ("to_q", "to_k", "to_v")}
    assert scales == {(stacked.abs().amax() / 448.0).item()}


@pytest.mark.parametrize(("raw", "message"), [
    ({"share_groups": "all"}, "share_groups 'all' is not allowed — use none, qkv"),
    ({"global": {**NVFP4_SVD, "input": {"dtype": "nvfp4", "dynamic": False, "observer": "percentile"}}}, "static input scale must be the symmetric min_max range of x / s"),
    ({"global": {**NVFP4_SVD, "input": {"dtype": "int4", "granularity": "per_group", "group_size": 64}}}, "min_max range of x / s, per tensor"),
])
def test_bad_share_groups_and_static_svd_observers_are_refused(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict({"name": "t", "global": NVFP4_SVD, "algorithms": SVD, **raw})


def test_a_group_whose_parts_have_different_specs_is_refused() -> None:
    model, _ = _model_and_inputs()
    recipe = recipe_from_dict({"name": "t", "global": NVFP4_SVD, "share_groups": "qkv", "algorithms": SVD,
                               "names": {"*to_v": {"weight": {"dtype": "nvfp4", "observer": "min_max"}, "input": {"dtype": "nvfp4", "dynamic": True}}}})
    with pytest.raises(ConfigError, match="share_groups chooses attn.to_q, attn.to_k, attn.to_v together, but their specs"):
        plan_layers(model, recipe, (), ())


@pytest.mark.parametrize("scale_dtype", ["bfloat16", "float16"])
def test_scale_dtype_rounds_each_static_scale_up_to_that_dtype(scale_dtype: str) -> None:
    model, x = _model_and_inputs()
    spec = {"weight": {"dtype": "int8", "granularity": "per_channel", "scale_dtype": scale_dtype},
            "input": {"dtype": "int8", "granularity": "per_tensor", "scale_dtype": scale_dtype}}
    plain = {"weight": {"dtype": "int8", "granularity": "per_channel"}, "input": {"dtype": "int8", "granularity": "per_tensor"}}
    rounded, exact = _build_all(model, x, {"name": "t", "global": spec}), _build_all(model, x, {"name": "t", "global": plain})
    dtype = getattr(torch, scale_dtype)
    for name in rounded:
        for suffix in ("weight_scale", "input_scale"):
            ours, float32 = getattr(rounded[name], suffix), getattr(exact[name], suffix)
            assert torch.equal(ours.to(dtype).float(), ours) and torch.all(ours >= float32)
            below = torch.nextafter(ours.to(dtype), torch.zeros((), dtype=dtype)).float()
            assert torch.all(below < float32)  # the smallest such value
    assert "scale_dtype" not in recipe_from_dict({"name": "t", "global": plain}).global_spec.weight.to_dict()


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scale_dtype_model_is_the_layers_compute_dtype(compute_dtype: torch.dtype) -> None:
    model, x = _model_and_inputs()
    model.to(compute_dtype)
    spec = {"weight": {"dtype": "int8", "granularity": "per_channel", "scale_dtype": "model"},
            "input": {"dtype": "int8", "granularity": "per_tensor", "scale_dtype": "model"}}
    named = "float32" if compute_dtype == torch.float32 else str(compute_dtype).removeprefix("torch.")
    explicit = {side: {**value, "scale_dtype": named} for side, value in spec.items()}
    if compute_dtype == torch.float32:  # no rounding: the float32 scales of a spec without scale_dtype
        explicit = {side: {k: v for k, v in value.items() if k != "scale_dtype"} for side, value in spec.items()}
    plans, _ = plan_layers(model, recipe_from_dict({"name": "t", "global": spec}), ("*to_out*",), ())
    # Resolved when planned, so the manifest records the dtype each layer used.
    assert {plan.spec.weight.scale_dtype for plan in plans} == {plan.spec.input.scale_dtype for plan in plans} == \
        {None if compute_dtype == torch.float32 else named}
    x = x.to(compute_dtype)
    by_model, by_name = _build_all(model, x, {"name": "t", "global": spec}), _build_all(model, x, {"name": "t", "global": explicit})
    for name in by_model:
        for suffix in ("weight_scale", "input_scale"):
            assert torch.equal(getattr(by_model[name], suffix), getattr(by_name[name], suffix))


def test_an_unresolved_model_scale_dtype_is_refused() -> None:
    from diffquant.quant.spec import TensorSpec
    from diffquant.quant.weights.base import scale_in_dtype

    with pytest.raises(ValueError, match="resolved per layer"):
        scale_in_dtype(torch.tensor([1.0]), TensorSpec("int8", scale_dtype="model"))


@pytest.mark.parametrize(("spec", "message"), [
    ({"dtype": "int8", "scale_dtype": "float64"}, "scale_dtype 'float64' is not allowed"),
    ({"dtype": "nvfp4", "scale_dtype": "bfloat16"}, "scale_dtype applies to scales of symmetric integer or fp8"),
    ({"dtype": "uint8", "symmetric": False, "scale_dtype": "bfloat16"}, "scale_dtype applies to scales of symmetric integer or fp8"),
])
def test_scale_dtype_is_refused_where_it_does_not_apply(spec: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict({"name": "t", "global": {"weight": spec}})
