"""`--holdout 0` turns the quality report off: no sample held out, no reference pass, no figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffquant.artifacts.calibration_reader import CalibrationArtifact
from diffquant.artifacts.checkpoint import read_checkpoint_manifest
from diffquant.models.presets import resolve_model
from diffquant.models.submodule import load_submodule
from diffquant.recipes import load_recipe
from diffquant.stages.evaluate import CheckpointEvaluator, evaluation_preset
from diffquant.stages.quantize import QuantizeSettings, quantize_module
from tests.helpers.reliability import run_cli


def forwards_of(model: torch.nn.Module, calib: Path, recipe: str, holdout: int) -> tuple[int, dict]:
    """(calls of the submodule's forward during one quantize run, the run's manifest)."""
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    settings = QuantizeSettings(calib=calib, recipe=recipe, device="cpu", holdout=holdout, use_stats_cache=False)
    try:
        result = quantize_module(model, CalibrationArtifact(calib), load_recipe(recipe), settings, show_progress=False)
    finally:
        handle.remove()
    return len(calls), result.manifest


@pytest.mark.parametrize(("recipe", "statistics_passes"), [("int8_w8a8", 1), ("int8_weight_only", 0)])
def test_report_off_runs_no_reference_pass(recipe: str, statistics_passes: int, private_calib) -> None:
    calib = private_calib("tiny-sdxl")  # 6 samples
    model = load_submodule(resolve_model("tiny-sdxl"))
    off, manifest = forwards_of(model, calib, recipe, holdout=0)
    # Report off: the statistics pass sees all 6 samples, and nothing else runs the model; a
    # weight-only recipe needs no statistics, so it runs no forward pass at all.
    assert off == 6 * statistics_passes
    assert manifest["quality"] == {"report": "off", "holdout_samples": 0}
    assert manifest["calibration"]["holdout_sample_ids"] == [] and manifest["calibration"]["num_calibration_samples"] == 6
    assert all(layer["quality"] == {} for layer in manifest["layers"])
    # Report on (2 held out): the statistics pass sees the other 4, the reference pass and the
    # quantized model's output pass see the 2 held out.
    on, manifest = forwards_of(load_submodule(resolve_model("tiny-sdxl")), calib, recipe, holdout=2)
    assert on == 4 * statistics_passes + 2 + 2
    assert manifest["quality"]["holdout_samples"] == 2 and all(layer["quality"] for layer in manifest["layers"])


def test_report_off_from_the_command_line_is_recorded_and_summarised(private_calib, tmp_path: Path) -> None:
    out = tmp_path / "q"
    result = run_cli(["quantize", "--calib", str(private_calib("tiny-sdxl")), "--recipe", "int8_weight_only", "--out", str(out),
                      "--device", "cpu", "--holdout", "0", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["quality_report"] == "off" and summary["holdout_samples"] == 0 and summary["calibration_samples"] == 6
    assert "output_sqnr_db" not in summary  # no figure, rather than a null that reads as +inf dB
    manifest = read_checkpoint_manifest(out)
    assert not manifest.quality_report and manifest.holdout_sample_ids == []
    table = run_cli(["inspect", str(out)])
    assert table.exit_code == 0, table.output
    assert "quality_report" in table.output


def test_eval_of_a_report_off_checkpoint_skips_the_held_out_figures(private_calib, tmp_path: Path) -> None:
    calib, out = private_calib("tiny-sdxl"), tmp_path / "q"
    assert run_cli(["quantize", "--calib", str(calib), "--recipe", "int8_weight_only", "--out", str(out), "--device", "cpu",
                    "--holdout", "0", "--json"]).exit_code == 0
    artifact = CalibrationArtifact(calib)
    record = CheckpointEvaluator(evaluation_preset(artifact.manifest["model"], artifact), "cpu", None).evaluate(out, artifact)
    assert record["holdout"] == {"status": "skipped", "reason": "the checkpoint was quantized with the quality report off (--holdout 0)"}
    assert record["output_sqnr_db"] is None and record["holdout_samples"] is None
