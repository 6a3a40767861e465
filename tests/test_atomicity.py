"""--overwrite is atomic: a kill at any point of the publish step leaves a loadable checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffquant.artifacts import replace
from diffquant.artifacts.calibration_reader import CalibrationArtifact
from diffquant.artifacts.checkpoint import MANIFEST_NAME, WEIGHTS_NAME, load_checkpoint_tensors, prepare_checkpoint_dir, read_checkpoint_manifest
from tests.helpers.reliability import run_cli

HELPERS = Path(__file__).parent / "helpers"


def _args(calib: Path, out: Path, recipe: str) -> list[str]:
    return ["--calib", str(calib), "--recipe", recipe, "--out", str(out), "--device", "cpu", "--holdout", "2", "--json"]


def _recipe_of(out: Path) -> str:
    manifest = read_checkpoint_manifest(out)  # verifies the weights' sha256 too
    assert load_checkpoint_tensors(out)
    return manifest.quantization_config["recipe"]


@pytest.mark.parametrize("step", ["weights", "manifest", "switch", "cleanup"])
def test_kill_inside_the_publish_step_of_an_overwrite_leaves_a_loadable_checkpoint(step: str, private_calib, tmp_path: Path) -> None:
    calib, out = private_calib("tiny-sdxl"), tmp_path / "out"
    first = run_cli(["quantize", *_args(calib, out, "int8_weight_only")])
    assert first.exit_code == 0, first.output
    killed = subprocess.run([sys.executable, str(HELPERS / "quantize_then_die.py"), step, "--", *_args(calib, out, "int8_w8a8"), "--overwrite"],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert _recipe_of(out) == ("int8_w8a8" if step == "cleanup" else "int8_weight_only")
    again = run_cli(["quantize", *_args(calib, out, "int8_w8a8"), "--overwrite"])
    assert again.exit_code == 0, again.output
    assert _recipe_of(out) == "int8_w8a8"
    assert sorted(p.name for p in out.iterdir()) == [WEIGHTS_NAME, MANIFEST_NAME]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging, old copy or lock left


def test_switch_without_exchange_interrupted_between_its_renames_restores_the_old_checkpoint(quantize_factory, tmp_path: Path, monkeypatch) -> None:
    import shutil

    out = tmp_path / "out"
    shutil.copytree(quantize_factory("tiny-sdxl", "int8_weight_only").out, out)
    # The fallback's first rename happened, the kill came before the second one.
    os.rename(out, replace.old_dir(out))
    replace.staging_dir(out).mkdir()
    (replace.staging_dir(out) / WEIGHTS_NAME).write_bytes(b"half")
    prepare_checkpoint_dir(out, overwrite=True)
    assert _recipe_of(out) == "int8_weight_only"
    assert not replace.old_dir(out).exists() and not replace.staging_dir(out).exists()
    monkeypatch.setattr(replace, "_exchange", lambda a, b: False)
    new = replace.staging_dir(out)
    shutil.copytree(quantize_factory("tiny-sdxl", "int8_w8a8").out, new)
    replace.switch_directory(new, out, {WEIGHTS_NAME, MANIFEST_NAME})
    assert _recipe_of(out) == "int8_w8a8" and not replace.old_dir(out).exists()


def test_kill_during_a_calibrate_overwrite_keeps_the_old_artifact(tmp_path: Path) -> None:
    out = tmp_path / "run"
    base = ["--model", "tiny-sd15", "--num-prompts", "2", "--steps", "2", "--out", str(out)]
    assert run_cli(["calibrate", *base, "--json"]).exit_code == 0
    before = (out / "manifest.json").read_bytes()
    killed = subprocess.run([sys.executable, str(HELPERS / "calibrate_then_die.py"), "prompt", "1", "--", *base, "--seed", "7", "--overwrite"],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (out / "manifest.json").read_bytes() == before
    assert len(CalibrationArtifact(out, verify=True)) == json.loads(before)["num_samples"]
    assert run_cli(["calibrate", *base, "--seed", "7", "--overwrite", "--json"]).exit_code == 0
    assert json.loads((out / "manifest.json").read_text())["settings"]["seed"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_disk_full_while_writing_the_checkpoint_is_one_line_and_keeps_the_old_one(quantize_factory, private_calib, tmp_path: Path, monkeypatch) -> None:
    import errno
    import shutil

    from diffquant.artifacts import checkpoint

    out = tmp_path / "out"
    shutil.copytree(quantize_factory("tiny-sdxl", "int8_weight_only").out, out)

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    result = run_cli(["quantize", *_args(private_calib("tiny-sdxl"), out, "int8_w8a8"), "--overwrite"])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [result.output.strip()], result.output
    assert "No space left on device" in result.output and "previous checkpoint is kept" in result.output
    assert _recipe_of(out) == "int8_weight_only"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_disk_full_during_a_calibrate_overwrite_is_one_line_and_keeps_the_old_artifact(tmp_path: Path, monkeypatch) -> None:
    import errno

    from diffquant.artifacts import shard_formats

    out = tmp_path / "run"
    base = ["calibrate", "--model", "tiny-sd15", "--num-prompts", "1", "--steps", "2", "--out", str(out), "--json"]
    assert run_cli(base).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shard_formats, "save_file", full)
    result = run_cli([*base, "--seed", "3", "--overwrite"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error:") and "No space left on device" in lines[0], result.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the half-built replacement is gone
