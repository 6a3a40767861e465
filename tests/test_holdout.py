"""The default holdout adapts to a small selection, with a floor of 1, and says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffquant.artifacts.sample_split import HOLDOUT_RULE, adaptive_holdout
from tests.helpers.reliability import copy_artifact, run_cli


@pytest.mark.parametrize(("selected", "held_out"), [(2, 1), (3, 1), (4, 2), (5, 4), (6, 4), (100, 4)])
def test_adaptive_holdout_keeps_the_default_where_it_fits(selected: int, held_out: int) -> None:
    assert adaptive_holdout(selected, 4) == held_out


def test_small_artifact_quantizes_with_the_default_recipe_and_the_run_says_so(calib_factory, tmp_path: Path) -> None:
    calib = copy_artifact(calib_factory("tiny-sdxl", num_prompts=2, steps=2), tmp_path / "calib")  # 4 samples
    out = tmp_path / "out"
    result = run_cli(["quantize", "--calib", str(calib), "--recipe", "int8_weight_only", "--out", str(out), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert f"holdout: 2 samples ({HOLDOUT_RULE})" in result.output
    manifest = json.loads((out / "quant_manifest.json").read_text())
    assert manifest["quality"]["holdout_samples"] == 2 and manifest["calibration"]["num_calibration_samples"] == 2
    assert manifest["calibration"]["holdout_rule"] == HOLDOUT_RULE


def test_explicit_holdout_is_never_adapted(calib_factory, tmp_path: Path) -> None:
    calib = copy_artifact(calib_factory("tiny-sdxl", num_prompts=2, steps=2), tmp_path / "calib")
    result = run_cli(["quantize", "--calib", str(calib), "--recipe", "int8_weight_only", "--out", str(tmp_path / "out"), "--device", "cpu",
                      "--holdout", "4", "--json"])
    assert result.exit_code == 2 and "4 calibration samples selected, but 4 are held out" in result.output
