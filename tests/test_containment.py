"""Every name read from a manifest or index resolves inside the artifact (local and store)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import pytest

from diffquant.artifacts.calibration_reader import CalibrationArtifact
from diffquant.artifacts.location import ArtifactLocation
from diffquant.errors import ArtifactError
from tests.helpers.reliability import copy_artifact, edit_json, run_cli

QUANTIZE = ["quantize", "--recipe", "int8_w8a8", "--device", "cpu", "--holdout", "2", "--json"]


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/hostname", "sub/../../x", "a\\..\\b", "C:x", "s3://bucket/x"])
def test_shard_names_that_leave_the_artifact_are_refused(name: str, calib_factory, tmp_path: Path) -> None:
    calib = copy_artifact(calib_factory(), tmp_path / "calib")
    shutil.copy(next(calib.glob("shard-*")), tmp_path / "outside.safetensors")
    edit_json(calib / "manifest.json", lambda m: m["shards"][0].update(file=name))
    result = run_cli([*QUANTIZE, "--calib", str(calib), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "leaves the artifact directory" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_symlinked_shard_pointing_outside_is_refused(calib_factory, tmp_path: Path) -> None:
    calib = copy_artifact(calib_factory(), tmp_path / "calib")
    shard = next(calib.glob("shard-*"))
    shutil.move(shard, tmp_path / "elsewhere.safetensors")
    shard.symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(ArtifactError, match="outside the artifact"):
        CalibrationArtifact(calib)


def test_symlinked_stats_directory_is_neither_read_nor_written(calib_factory, tmp_path: Path) -> None:
    calib = copy_artifact(calib_factory(), tmp_path / "calib")
    (tmp_path / "victim").mkdir()
    (calib / "stats").symlink_to(tmp_path / "victim")
    result = run_cli([*QUANTIZE, "--calib", str(calib), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "outside the artifact" in result.output, result.output
    assert list((tmp_path / "victim").iterdir()) == []


def test_stats_index_naming_a_file_outside_is_refused(calib_factory, tmp_path: Path) -> None:
    calib = copy_artifact(calib_factory(), tmp_path / "calib")
    assert run_cli([*QUANTIZE, "--calib", str(calib), "--out", str(tmp_path / "first")]).exit_code == 0
    def point_outside(index: dict) -> None:
        for entry in index["entries"].values():
            entry["file"] = "../../secret.safetensors"

    edit_json(calib / "stats" / "index.json", point_outside)
    result = run_cli([*QUANTIZE, "--calib", str(calib), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "secret.safetensors" in result.output, result.output


def test_removing_a_symlinked_entry_removes_the_link_only(tmp_path: Path) -> None:
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "precious").write_text("x")
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "shard-000003.zarr").symlink_to(tmp_path / "victim", target_is_directory=True)
    ArtifactLocation(tmp_path / "art").remove("shard-000003.zarr")
    assert (tmp_path / "victim" / "precious").read_text() == "x" and not (tmp_path / "art" / "shard-000003.zarr").exists()


def test_store_artifact_names_are_contained_too(calib_factory, tmp_path: Path) -> None:
    url = "memory://containment/calib"
    fs = fsspec.filesystem("memory")
    source = calib_factory()
    for path in source.iterdir():
        if path.is_file():
            fs.pipe_file(f"/containment/calib/{path.name}", path.read_bytes())
    fs.pipe_file("/containment/secret.safetensors", next(source.glob("shard-*")).read_bytes())
    manifest = json.loads(fs.cat_file("/containment/calib/manifest.json"))
    manifest["shards"][0]["file"] = "../secret.safetensors"
    fs.pipe_file("/containment/calib/manifest.json", json.dumps(manifest).encode())
    with pytest.raises(ArtifactError, match="leaves the artifact directory"):
        CalibrationArtifact(url)


def test_symlink_inside_a_zarr_shard_is_refused_before_zarr_opens_it(calib_factory, tmp_path: Path) -> None:
    calib = copy_artifact(calib_factory("tiny-sdxl", num_prompts=2, steps=2, shard_format="zarr"), tmp_path / "calib")
    shard = next(calib.glob("shard-*.zarr"))
    chunk = next(p for p in sorted((shard / "k000").rglob("*")) if p.is_file() and p.name != "zarr.json")
    shutil.move(chunk, tmp_path / "outside-chunk")
    chunk.symlink_to(tmp_path / "outside-chunk")
    opened = []
    import zarr

    original = zarr.open_group
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(zarr, "open_group", lambda *a, **k: opened.append(a) or original(*a, **k))
        with pytest.raises(ArtifactError, match=r"inside the zarr shard shard-000000\.zarr is a symlink") as refused:
            CalibrationArtifact(calib)  # verify=False: the hash check that would also see it is off
    assert opened == [] and "\n" not in str(refused.value)
    result = run_cli([*QUANTIZE, "--no-verify", "--calib", str(calib), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1 and "is a symlink" in result.output, result.output


def test_zarr_key_leaving_its_shard_in_a_store_is_refused(calib_factory) -> None:
    fs = fsspec.filesystem("memory")
    source = calib_factory("tiny-sdxl", num_prompts=2, steps=2, shard_format="zarr")
    for path in source.rglob("*"):
        if path.is_file() and "stats" not in path.parts:
            fs.pipe_file(f"/zarr-contained/calib/{path.relative_to(source).as_posix()}", path.read_bytes())
    url = "memory://zarr-contained/calib"
    assert len(CalibrationArtifact(url)) == json.loads(fs.cat_file("/zarr-contained/calib/manifest.json"))["num_samples"]
    fs.pipe_file("/zarr-contained/calib/shard-000000.zarr/k000/../../secret", b"x")
    manifest = json.loads(fs.cat_file("/zarr-contained/calib/manifest.json"))
    manifest["shards"][0]["bytes"] += 1  # a consistent edit: the recorded size counts the extra key
    fs.pipe_file("/zarr-contained/calib/manifest.json", json.dumps(manifest).encode())
    with pytest.raises(ArtifactError, match="leaves the artifact directory"):
        CalibrationArtifact(url)
