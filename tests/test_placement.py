"""The placement protocol: whole model, accelerate-placed and block by block, on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffquant.artifacts.calibration_reader import SampleRecord, SampleSelection
from diffquant.artifacts.sample_split import choose_samples, indices_of_ids
from diffquant.errors import ConfigError
from diffquant.models.placement import DEFAULT_MAX_BLOCK_SHARE, AcceleratePlaced, Blockwise, WholeModel, placement_for
from diffquant.quant.recipe import CalibrationSelection


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def blocks_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), Block(), nn.Linear(4, 2))


def test_settings_choose_the_placement() -> None:
    assert type(placement_for("cpu")) is WholeModel
    assert type(placement_for("cpu", device_map="auto")) is AcceleratePlaced
    blockwise = placement_for("cpu", blockwise=True)
    assert type(blockwise) is Blockwise and blockwise.max_block_share == DEFAULT_MAX_BLOCK_SHARE
    assert placement_for("cpu", blockwise=True, max_block_share=0.5).max_block_share == 0.5


def test_whole_and_accelerate_placements_visit_in_order_and_report_their_mode() -> None:
    model = blocks_model()
    for placement, mode, device_map in ((WholeModel("cpu"), "whole", None), (AcceleratePlaced("cpu", "auto"), "device_map", "auto")):
        with placement.placed(model):
            assert list(placement.visit(["2", "0", "1.1"])) == ["2", "0", "1.1"]
            assert placement.home_of(model[0]) == torch.device("cpu")
            placement.after_swaps()
        assert placement.report() == {"mode": mode, "device": "cpu", "device_map": device_map}
        assert placement.state_dict(model).keys() == model.state_dict().keys()


def test_blockwise_holds_each_block_while_its_layers_are_visited() -> None:
    model = blocks_model()
    placement = Blockwise("cpu", max_block_share=1.0)  # units: 0, 1 (a block of two layers, kept whole), 2
    held = []
    with placement.placed(model):
        for name in placement.visit(["0", "1.a", "1.b", "2"]):
            held.append((name, {unit for unit, depth in placement.blocks._depth.items() if depth}))
        assert placement.home_of(model[1].a) == torch.device("cpu")
    assert held == [("0", {"0"}), ("1.a", {"1"}), ("1.b", {"1"}), ("2", {"2"})]
    report = placement.report()
    assert report["mode"] == "blockwise" and report["transfers"] == 3 and report["resident_bytes"] == 0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_blockwise_outside_its_run_is_refused() -> None:
    with pytest.raises(RuntimeError, match="outside"):
        list(Blockwise("cpu").visit(["0"]))


def test_the_split_quantize_records_maps_back_to_the_same_samples_for_eval() -> None:
    records = [SampleRecord(id=100 + i, prompt=i // 3, step=i % 3, timestep=999.0 - 10 * i, shard="s", structure={}, tensors={})
               for i in range(9)]
    split = choose_samples(records, {"every": 1, "holdout": 3}, CalibrationSelection(), recipe_sets_holdout=False)
    # 9 selected, 3 held out at floor((i + 0.5) * 9 / 3) = 1, 4, 7.
    assert split.holdout == [1, 4, 7] and split.calibration == [0, 2, 3, 5, 6, 8] and split.holdout_rule is None
    ids = [records[i].id for i in split.holdout]
    assert indices_of_ids(records, ids, "calib") == split.holdout
    # An override of the recipe's selection, and the default holdout adapted to a small selection.
    small = choose_samples(records, {"limit": 3}, CalibrationSelection(), recipe_sets_holdout=False)
    assert small.selection == SampleSelection(limit=3) and small.holdout == [1] and small.holdout_rule is not None
    # A holdout the recipe writes is never adapted: 3 selected cannot hold out 4.
    with pytest.raises(ConfigError, match="3 calibration samples selected, but 4 are held out"):
        choose_samples(records, {"limit": 3}, CalibrationSelection(), recipe_sets_holdout=True)
    off = choose_samples(records, {"holdout": 0}, CalibrationSelection(), recipe_sets_holdout=True)
    assert off.holdout == [] and off.calibration == list(range(9))
