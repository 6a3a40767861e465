"""Block-by-block onload on tiny real diffusers models, on the CPU: same outputs, one block resident."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import diffusers
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from diffquant.errors import ConfigError
from diffquant.models.blockwise import BlockwiseOnload, onload_units, split_modules

Inputs = dict[str, object]


def tiny_unet() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    inputs = {"sample": torch.randn(1, 4, 8, 8), "timestep": torch.tensor([10]), "encoder_hidden_states": torch.randn(1, 3, 32)}
    return model.eval(), inputs


def tiny_flux() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    )
    inputs = {
        "hidden_states": torch.randn(1, 4, 16), "encoder_hidden_states": torch.randn(1, 3, 32),
        "pooled_projections": torch.randn(1, 32), "timestep": torch.tensor([0.5]),
        "img_ids": torch.randn(4, 3), "txt_ids": torch.zeros(3, 3),
    }
    return model.eval(), inputs


def tiny_pixart() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    model = diffusers.PixArtTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, cross_attention_dim=16, caption_channels=16, norm_num_groups=8, use_additional_conditions=False,
    )
    inputs = {
        "hidden_states": torch.randn(1, 4, 8, 8), "encoder_hidden_states": torch.randn(1, 3, 16), "timestep": torch.tensor([10]),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }
    return model.eval(), inputs


def tiny_sd3() -> tuple[nn.Module, Inputs]:
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16,
        dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    inputs = {"hidden_states": torch.randn(1, 4, 8, 8), "encoder_hidden_states": torch.randn(1, 3, 16),
              "pooled_projections": torch.randn(1, 16), "timestep": torch.tensor([10])}
    return model.eval(), inputs


def tiny_sdxl_unet() -> tuple[nn.Module, Inputs]:
    """The SDXL UNet's wiring: text_time added embeddings, several transformer layers per block."""
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8, transformer_layers_per_block=(1, 2),
    )
    inputs = {"sample": torch.randn(1, 4, 8, 8), "timestep": torch.tensor([10]), "encoder_hidden_states": torch.randn(1, 3, 32),
              "added_cond_kwargs": {"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, 6)}}
    return model.eval(), inputs


EXPECTED_UNITS: dict[Callable[[], tuple[nn.Module, Inputs]], list[str]] = {
    # time_proj (sinusoidal) and conv_act (SiLU) have no tensors, so they are no units.
    tiny_unet: ["conv_in", "time_embedding", "down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1",
                "mid_block", "conv_norm_out", "conv_out"],
    # pos_embed (rotary) has no tensors.
    tiny_flux: ["time_text_embed", "context_embedder", "x_embedder", "transformer_blocks.0",
                "single_transformer_blocks.0", "norm_out", "proj_out"],
    # norm_out is a LayerNorm without affine weights; scale_shift_table is the root's own parameter.
    tiny_pixart: ["pos_embed", "transformer_blocks.0", "transformer_blocks.1", "proj_out", "adaln_single", "caption_projection"],
    tiny_sd3: ["pos_embed", "time_text_embed", "context_embedder", "transformer_blocks.0", "transformer_blocks.1", "norm_out", "proj_out"],
    tiny_sdxl_unet: ["conv_in", "time_embedding", "add_embedding", "down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1",
                     "mid_block", "conv_norm_out", "conv_out"],
}
BUILDERS = list(EXPECTED_UNITS)


def onloaded_units(placement: BlockwiseOnload) -> list[str]:
    """Names of the units the placement has on the device now, in the order they were onloaded."""
    return list(placement._onloaded)


def output(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@contextlib.contextmanager
def unit_calls(model: nn.Module, placement: BlockwiseOnload) -> Iterator[list[tuple[str, list[str]]]]:
    """Records, for each unit forward, the unit and the units onloaded when it starts.

    Installed after the placement's hooks, so each record sees the unit's own onload.
    """
    calls: list[tuple[str, list[str]]] = []
    handles = [
        unit.register_forward_pre_hook(lambda m, a, name=name: calls.append((name, onloaded_units(placement))))
        for name, unit in onload_units(model, placement.max_unit_bytes)
    ]
    yield calls
    for handle in handles:
        handle.remove()


@contextlib.contextmanager
def unit_moves(model: nn.Module, placement: BlockwiseOnload, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, str]]]:
    """Records every `Tensor.to(device)` of a unit's weight as (unit name, device), one entry per
    run of consecutive moves of the same unit (the model's own `.to` calls on activations are not
    weights of a unit and are left out)."""
    owner = {t.data_ptr(): name for name, unit in onload_units(model, placement.max_unit_bytes)
             for t in [*unit.parameters(), *unit.buffers()] if t.numel()}
    moves: list[tuple[str, str]] = []
    original = torch.Tensor.to

    def spy(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        name = owner.get(self.data_ptr()) if self.numel() else None
        if name is not None:
            move = (name, str(args[0] if args else kwargs.get("device")))
            if not moves or moves[-1] != move:
                moves.append(move)
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "to", spy)
        yield moves


@pytest.mark.parametrize("build", BUILDERS, ids=lambda b: b.__name__)
def test_units_are_top_level_children_with_block_lists_expanded(build) -> None:
    model, _ = build()
    assert [name for name, _ in onload_units(model)] == EXPECTED_UNITS[build]


@pytest.mark.parametrize("build", BUILDERS, ids=lambda b: b.__name__)
def test_forward_is_bit_identical_with_one_unit_resident_at_a_time(build) -> None:
    model, inputs = build()
    reference = output(model, inputs)
    with BlockwiseOnload(model, "cpu") as placement, unit_calls(model, placement) as calls:
        got = output(model, inputs)
        report = placement.report()

    assert torch.equal(got, reference)
    assert calls and all(onloaded == [name] for name, onloaded in calls)
    assert report["transfers"] == len(calls)
    assert report["peak_resident_bytes"] <= report["root_bytes"] + report["largest_unit_bytes"]
    assert report["peak_resident_bytes"] < report["total_bytes"]
    assert report["resident_bytes"] == report["root_bytes"]
    assert report["total_bytes"] == sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_root_parameters_stay_resident() -> None:
    model, inputs = tiny_pixart()
    with BlockwiseOnload(model, "cpu") as placement:
        output(model, inputs)
        assert placement.root_bytes == model.scale_shift_table.numel() * 4 > 0
        assert placement.resident_bytes == placement.root_bytes


def test_each_unit_moves_to_the_device_once_per_forward_and_its_home_tensors_come_back(monkeypatch: pytest.MonkeyPatch) -> None:
    model, inputs = tiny_unet()
    home = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]}
    home_data = {name: t.data for name, t in home.items()}
    # "cpu:0" is the CPU too, but spelled apart from home so the spy tells onloads apart.
    placement = BlockwiseOnload(model, "cpu:0", home="cpu")
    with placement, unit_calls(model, placement) as calls, unit_moves(model, placement, monkeypatch) as moves:
        output(model, inputs)
        # Offloading copies nothing back: every weight points at its own home tensor again.
        params = dict(model.named_parameters())
        assert all(params[name] is home[name] and params[name].data.data_ptr() == home_data[name].data_ptr() for name in params)
    order = [name for name, _ in calls]
    assert sorted(order) == sorted(EXPECTED_UNITS[tiny_unet])  # each unit runs once, in execution order
    assert moves == [(name, "cpu:0") for name in order]


def test_forward_that_raises_moves_its_unit_back() -> None:
    model, inputs = tiny_unet()
    bad = {**inputs, "encoder_hidden_states": torch.randn(1, 3, 7)}  # cross-attention in down_blocks.0 fails
    with BlockwiseOnload(model, "cpu") as placement, unit_calls(model, placement) as calls:
        with pytest.raises(RuntimeError):
            output(model, bad)
        assert calls[-1] == ("down_blocks.0", ["down_blocks.0"])
        assert onloaded_units(placement) == []
        assert placement.resident_bytes == placement.root_bytes
        assert torch.equal(output(model, inputs), output(model, inputs))  # depth counts are intact


def test_held_unit_stays_onloaded_through_forwards_until_released(monkeypatch: pytest.MonkeyPatch) -> None:
    model, inputs = tiny_unet()
    reference = output(model, inputs)
    with BlockwiseOnload(model, "cpu") as placement:
        with placement.holding("down_blocks.1") as held, unit_calls(model, placement) as calls:
            assert held is model.down_blocks[1]
            with unit_moves(model, placement, monkeypatch) as moves:
                got = output(model, inputs)
                got_again = output(model, inputs)
            assert onloaded_units(placement) == ["down_blocks.1"]
        assert onloaded_units(placement) == []
        report = placement.report()

    assert torch.equal(got, reference) and torch.equal(got_again, reference)
    assert "down_blocks.1" not in {name for name, _ in moves}
    for name, onloaded in calls:
        assert onloaded == (["down_blocks.1"] if name == "down_blocks.1" else ["down_blocks.1", name])
    assert report["transfers"] == 1 + 2 * (len(EXPECTED_UNITS[tiny_unet]) - 1)
    assert report["peak_resident_bytes"] <= report["root_bytes"] + 2 * report["largest_unit_bytes"]


def test_nested_holding_releases_only_at_the_outermost_exit() -> None:
    model, _ = tiny_flux()
    with BlockwiseOnload(model, "cpu") as placement:
        with placement.holding("transformer_blocks.0"):
            with placement.holding("transformer_blocks.0"):
                assert onloaded_units(placement) == ["transformer_blocks.0"]
            assert onloaded_units(placement) == ["transformer_blocks.0"]
        assert onloaded_units(placement) == []
        assert placement.transfers == 1
        with pytest.raises(ValueError, match="not an onload unit"), placement.holding("pos_embed"):
            pass


def test_reattach_hooks_the_replacement_unit_and_unhooks_the_old_one() -> None:
    model, inputs = tiny_flux()
    reference = output(model, inputs)
    with BlockwiseOnload(model, "cpu") as placement:
        old = model.x_embedder
        new = nn.Linear(old.in_features, old.out_features)
        new.load_state_dict(old.state_dict())
        model.x_embedder = new
        placement.attach()
        placement.attach()  # idempotent: no doubled hooks
        with unit_calls(model, placement) as calls:
            got = output(model, inputs)

        assert not old._forward_hooks and not old._forward_pre_hooks
        assert len(new._forward_hooks) == 1 and len(new._forward_pre_hooks) == 1
        assert ("x_embedder", ["x_embedder"]) in calls
        assert placement.transfers == len(calls)
        assert placement.resident_bytes == placement.root_bytes
    assert torch.equal(got, reference)


def test_reattach_after_replacing_a_layer_inside_a_held_block_keeps_the_block_onloaded() -> None:
    model, inputs = tiny_flux()
    reference = output(model, inputs)
    with BlockwiseOnload(model, "cpu") as placement:
        with placement.holding("transformer_blocks.0") as block:
            old = block.attn.to_q
            block.attn.to_q = nn.Linear(old.in_features, old.out_features)
            block.attn.to_q.load_state_dict(old.state_dict())
            placement.attach()
            assert onloaded_units(placement) == ["transformer_blocks.0"]
        got = output(model, inputs)
        assert placement.resident_bytes == placement.root_bytes
    assert torch.equal(got, reference)


def test_unit_of_maps_module_names_to_their_unit() -> None:
    model, _ = tiny_unet()
    placement = BlockwiseOnload(model, "cpu")
    assert placement.unit_of("down_blocks.1.resnets.0.conv1") == "down_blocks.1"
    assert placement.unit_of("down_blocks.0.attentions.0.proj_in") == "down_blocks.0"
    assert placement.unit_of("down_blocks.1") == "down_blocks.1"
    assert placement.unit_of("time_embedding.linear_1") == "time_embedding"
    assert placement.unit_of("conv_in") == "conv_in"
    assert placement.unit_of("down_blocks.10.x") is None  # not a prefix match on "down_blocks.1"
    assert placement.unit_of("time_proj") is None
    assert placement.unit_of("down_blocks") is None
    assert placement.unit_of("") is None


def test_refuses_a_model_placed_by_accelerate() -> None:
    model, _ = tiny_unet()
    model.down_blocks[0]._hf_hook = object()
    with pytest.raises(ConfigError, match="--blockwise or --device-map"):
        BlockwiseOnload(model, "cpu")


def test_refuses_a_model_with_meta_parameters() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="meta"):
        BlockwiseOnload(model, "cpu")


# Stage two block by block: the same checkpoint as the whole submodule, one block on the device.
@pytest.mark.parametrize(("model", "recipe"), [("tiny-sdxl", "int8_w8a8"), ("tiny-flux", "svdquant_w4a4"), ("tiny-pixart", "nvfp4")])
def test_blockwise_quantize_writes_the_whole_model_checkpoint(model: str, recipe: str, quantize_factory, private_calib, tmp_path) -> None:
    from safetensors.torch import load_file

    from diffquant.stages.quantize import QuantizeSettings, quantize

    whole = quantize_factory(model, recipe)
    out = tmp_path / "blockwise"
    result = quantize(QuantizeSettings(calib=private_calib(model), recipe=recipe, out=out, device="cpu", holdout=2, blockwise=True),
                      show_progress=False)
    want, got = load_file(str(whole.out / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert want.keys() == got.keys()
    assert all(t.dtype == got[k].dtype and torch.equal(t, got[k]) for k, t in want.items())
    assert result.manifest["quality"] == whole.manifest["quality"]
    assert [layer["quality"] for layer in result.manifest["layers"]] == [layer["quality"] for layer in whole.manifest["layers"]]

    placement = result.manifest["placement"]
    assert placement["mode"] == "blockwise" and whole.manifest["placement"]["mode"] == "whole"
    # On the device at any time: the root's own tensors (the most they were: re-attaching after the
    # swap splits the smaller quantized model anew), one block, and the quantized layer being built
    # inside it; far less than the model.
    bound = placement["largest_root_bytes"] + placement["largest_unit_bytes"] + placement["largest_visitor_bytes"]
    assert placement["largest_unit_bytes"] <= placement["peak_resident_bytes"] <= bound
    assert placement["peak_resident_bytes"] < 0.35 * placement["total_bytes"]
    assert placement["transfers"] > len(onload_units(result.model))
    # Everything is back in CPU memory, hooks removed.
    assert all(p.device.type == "cpu" for p in result.model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in result.model.modules())


def test_blockwise_and_device_map_are_refused_together(private_calib, tmp_path) -> None:
    from click.testing import CliRunner

    from diffquant.cli import main

    refused = CliRunner().invoke(main, ["quantize", "--calib", str(private_calib("tiny-sdxl")), "--recipe", "int8_w8a8", "--out",
                                        str(tmp_path / "q"), "--blockwise", "--device-map", "auto"])
    assert refused.exit_code == 2 and len(refused.output.strip().splitlines()) == 1
    assert "--blockwise and --device-map" in refused.output and not (tmp_path / "q").exists()
    alone = CliRunner().invoke(main, ["quantize", "--calib", str(private_calib("tiny-sdxl")), "--recipe", "int8_w8a8", "--out",
                                      str(tmp_path / "q"), "--max-block-share", "0.2"])
    assert alone.exit_code == 2 and "--max-block-share only applies block by block" in alone.output


@pytest.mark.parametrize("build", BUILDERS, ids=lambda b: b.__name__)
def test_blocks_above_the_share_are_split_into_their_children(build) -> None:
    model, inputs = build()
    reference = output(model, inputs)
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    with BlockwiseOnload(model, "cpu", max_unit_share=0.15) as placement, unit_calls(model, placement) as calls:
        got = output(model, inputs)
        report = placement.report()
        units = dict(onload_units(model, placement.max_unit_bytes))
        split = dict(split_modules(model, placement.max_unit_bytes))

    assert torch.equal(got, reference)
    assert len(units) > len(EXPECTED_UNITS[build]) and set(units).isdisjoint(split)
    # Every unit is under the budget unless it has no children to split into.
    assert all(sum(t.numel() * t.element_size() for t in [*u.parameters(), *u.buffers()]) <= placement.max_unit_bytes
               or not list(u.children()) for u in units.values())
    # Units and split modules' own tensors cover the model exactly once.
    own = sum(t.numel() * t.element_size() for m in split.values() for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])
    assert own == report["root_bytes"]
    assert own + sum(sum(t.numel() * t.element_size() for t in [*u.parameters(), *u.buffers()]) for u in units.values()) == total
    assert report["largest_unit_bytes"] == max(sum(t.numel() * t.element_size() for t in [*u.parameters(), *u.buffers()]) for u in units.values())
    assert report["peak_resident_bytes"] <= report["root_bytes"] + report["largest_unit_bytes"] < 0.5 * total
    assert calls and all(onloaded == [name] for name, onloaded in calls)


def test_split_pixart_block_keeps_its_own_table_on_the_device() -> None:
    model, inputs = tiny_pixart()
    with BlockwiseOnload(model, "cpu", max_unit_share=0.15) as placement:
        split = dict(split_modules(model, placement.max_unit_bytes))
        # BasicTransformerBlock reads its scale_shift_table directly in forward, outside any child.
        assert "transformer_blocks.0" in split and "transformer_blocks.0.attn1" in dict(onload_units(model, placement.max_unit_bytes))
        assert model.transformer_blocks[0].scale_shift_table.numel() * 4 <= placement.root_bytes


def test_block_share_outside_zero_one_is_refused() -> None:
    model, _ = tiny_unet()
    for share in (0.0, 1.5):
        with pytest.raises(ConfigError, match="block share"):
            BlockwiseOnload(model, "cpu", max_unit_share=share)


class WeightUseProbe(TorchFunctionMode):
    """Flags every torch op that reads a unit's weight while that unit is not onloaded: the check
    that a model's forward uses each weight only inside its own unit (device and home are both
    the CPU in these tests, so a missed onload would not fail any op by itself)."""

    # Attribute reads and bookkeeping, not computation with the weight's values.
    READS = {"__get__", "__set__", "_has_compatible_shallow_copy_type", "is_floating_point", "is_complex", "__hash__",
             "__eq__", "data", "is_meta", "numel", "element_size", "detach", "requires_grad", "grad", "_is_view", "dtype",
             "device", "is_leaf", "data_ptr", "to"}

    def __init__(self, model: nn.Module, placement: BlockwiseOnload) -> None:
        super().__init__()
        self.placement = placement
        self.owner = {id(t): name for name, unit in onload_units(model, placement.max_unit_bytes) for t in [*unit.parameters(), *unit.buffers()]}
        self.misuses: set[tuple[str, str]] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name not in self.READS:
            onloaded = set(onloaded_units(self.placement))
            for value in [*args, *kwargs.values()]:
                for tensor in value if isinstance(value, (list, tuple)) else [value]:
                    unit = self.owner.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
                    if unit is not None and unit not in onloaded:
                        self.misuses.add((unit, name))
        return func(*args, **kwargs)


@pytest.mark.parametrize("share", [1.0, 0.15, 0.03])
@pytest.mark.parametrize("build", BUILDERS, ids=lambda b: b.__name__)
def test_every_weight_is_used_only_while_its_unit_is_onloaded(build, share: float) -> None:
    model, inputs = build()
    reference = output(model, inputs)
    with BlockwiseOnload(model, "cpu", max_unit_share=share) as placement:
        probe = WeightUseProbe(model, placement)
        with probe:
            got = output(model, inputs)
    assert probe.misuses == set()
    assert torch.equal(got, reference)


def test_the_weight_use_probe_catches_a_unit_that_is_not_onloaded() -> None:
    model, inputs = tiny_flux()
    with BlockwiseOnload(model, "cpu") as placement:
        probe = WeightUseProbe(model, placement)
        placement._remove_hooks()  # as if the units had never been hooked
        with probe:
            output(model, inputs)
    assert {unit for unit, _ in probe.misuses} == set(EXPECTED_UNITS[tiny_flux])
