"""Nothing diffquant did not write is deleted: owned outputs only, no output inside a source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffquant.artifacts.checkpoint import MANIFEST_NAME as CHECKPOINT_MANIFEST
from diffquant.artifacts.checkpoint import WEIGHTS_NAME
from tests.helpers.reliability import copy_artifact, run_cli, tree_hash

CALIBRATE = ["calibrate", "--model", "tiny-sd15", "--num-prompts", "1", "--steps", "2", "--json"]


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize("where", ["same", "inside", "holds"])
def test_convert_into_its_own_source_is_refused_and_the_source_is_kept(where: str, calib_factory, tmp_path: Path) -> None:
    source = copy_artifact(calib_factory(), tmp_path / "a" / "calib")
    destination = {"same": source, "inside": source / "zarr", "holds": tmp_path / "a"}[where]
    before = tree_hash(tmp_path)
    message = _one_error_line(run_cli(["convert", str(source), str(destination), "--format", "zarr", "--overwrite"]))
    assert "source artifact" in message and {"same": " is the ", "inside": "lies inside", "holds": "holds"}[where] in message
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize("command", ["calibrate", "convert"])
def test_overwrite_of_a_directory_that_never_held_an_artifact_deletes_nothing(command: str, calib_factory, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    (out / "stats").mkdir(parents=True)
    for name in ("manifest.json", "shard-notes.txt", "thesis.partial", ".tmp-draft", "stats/index.json"):
        (out / name).write_text(f"the user's {name}")
    before = tree_hash(tmp_path)
    if command == "calibrate":
        (out / "manifest.json").unlink()  # a directory with a foreign manifest.json is refused as not a diffquant manifest
        before = tree_hash(tmp_path)
        result = run_cli([*CALIBRATE, "--out", str(out), "--overwrite"])
    else:
        result = run_cli(["convert", str(calib_factory()), str(out), "--format", "zarr", "--overwrite"])
    message = _one_error_line(result)
    assert str(out) in message
    assert tree_hash(tmp_path) == before


def test_foreign_manifest_json_is_not_taken_for_an_artifact(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "manifest.json").write_text('{"name": "my web app"}')
    before = tree_hash(tmp_path)
    message = _one_error_line(run_cli([*CALIBRATE, "--out", str(out), "--overwrite"]))
    assert "is not a diffquant calibration manifest" in message
    assert tree_hash(tmp_path) == before


def test_overwrite_of_an_artifact_keeps_the_files_it_does_not_list(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run_cli([*CALIBRATE, "--out", str(out)]).exit_code == 0
    (out / "notes.txt").write_text("keep me")
    (out / "stats").mkdir()
    (out / "stats" / "mine.txt").write_text("keep me too")
    result = run_cli([*CALIBRATE, "--seed", "5", "--out", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["settings"]["seed"] == 5
    assert (out / "notes.txt").read_text() == "keep me" and (out / "stats" / "mine.txt").read_text() == "keep me too"
    assert not list(tmp_path.glob(".run.diffquant-*"))


def test_quantize_refuses_an_out_inside_the_calibration_and_a_foreign_weights_file(private_calib, tmp_path: Path) -> None:
    calib = private_calib("tiny-sdxl")
    args = ["quantize", "--calib", str(calib), "--recipe", "int8_weight_only", "--device", "cpu", "--holdout", "2", "--json"]
    before = tree_hash(calib)
    message = _one_error_line(run_cli([*args, "--out", str(calib / "ckpt")]))
    assert "lies inside the calibration artifact" in message
    assert tree_hash(calib) == before
    out = tmp_path / "out"
    out.mkdir()
    (out / WEIGHTS_NAME).write_bytes(b"somebody else's weights")
    message = _one_error_line(run_cli([*args, "--out", str(out), "--overwrite"]))
    assert f"no {CHECKPOINT_MANIFEST}" in message
    assert (out / WEIGHTS_NAME).read_bytes() == b"somebody else's weights"
