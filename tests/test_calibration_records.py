"""The typed records of the calibration manifest: lossless round trips of real manifests, the
format version checked in one place, strict settings, and a writer that owns its manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffquant.artifacts.calibration_format import MANIFEST_NAME
from diffquant.artifacts.calibration_reader import CalibrationArtifact
from diffquant.artifacts.calibration_records import CalibrationManifest, RunSettings, ShardEntry, load_manifest
from diffquant.artifacts.calibration_writer import CalibrationWriter, CapturedSample
from diffquant.artifacts.location import ArtifactLocation
from diffquant.errors import ArtifactError
from tests.helpers.calibration_runs import SYNTHETIC_RUNS

FIXTURES = Path(__file__).parent / "fixtures" / "calibration_df4f6e6_interrupted"


def _written_bytes(document: dict) -> bytes:
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()  # ArtifactLocation.write_json


@pytest.mark.parametrize("source", ["cli", "live", "interrupted-cli", "interrupted-live", "zarr"])
def test_real_manifests_round_trip_to_the_same_bytes(source: str, calib_factory, tmp_path: Path) -> None:
    if source == "cli":
        path = calib_factory("tiny-sdxl") / MANIFEST_NAME
    elif source == "zarr":
        path = calib_factory("tiny-flux", num_prompts=2, steps=2, shard_format="zarr") / MANIFEST_NAME
    elif source == "live":
        SYNTHETIC_RUNS["synthetic_live"](tmp_path / "live")
        path = tmp_path / "live" / MANIFEST_NAME
    else:
        path = FIXTURES / f"synthetic_{source.split('-')[1]}" / MANIFEST_NAME
    document = json.loads(path.read_text())
    record = CalibrationManifest.from_json(document, str(path))
    assert record.to_json() == document and _written_bytes(record.to_json()) == path.read_bytes()
    assert record.settings is not None and record.settings.sha256() == document["settings_sha256"]
    assert record.num_samples == sum(shard.num_samples for shard in record.shards)
    assert (record.settings.live is not None) == (source in ("live", "interrupted-live"))


def test_the_reader_exposes_the_record_and_the_document_as_written(calib_factory) -> None:
    out = calib_factory("tiny-sdxl")
    artifact = CalibrationArtifact(out)
    assert artifact.manifest == json.loads((out / MANIFEST_NAME).read_text())
    assert artifact.record.to_json() == artifact.manifest
    assert [shard.file for shard in artifact.record.shards] == [shard["file"] for shard in artifact.manifest["shards"]]


@pytest.mark.parametrize(("change", "message"), [
    ({"version": 2}, "has format version 2, this diffquant reads version 1"),
    ({"version": None}, "has format version None"),
    ({"format": "diffquant-checkpoint"}, "is not a diffquant calibration manifest"),
])
def test_format_and_version_are_checked_on_every_read(change: dict, message: str, calib_factory, tmp_path: Path) -> None:
    document = {**json.loads((calib_factory("tiny-sdxl") / MANIFEST_NAME).read_text()), **change}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(document))
    for read in (lambda: load_manifest(ArtifactLocation(tmp_path)), lambda: CalibrationArtifact(tmp_path)):
        with pytest.raises(ArtifactError, match=message):
            read()


def test_settings_of_another_shape_are_refused_in_one_line(calib_factory) -> None:
    settings = json.loads((calib_factory("tiny-sdxl") / MANIFEST_NAME).read_text())["settings"]
    assert RunSettings.from_json(settings, "m").to_json() == settings
    with pytest.raises(ArtifactError, match="m: settings lack seed, so they are not the settings of a run of this diffquant"):
        RunSettings.from_json({key: value for key, value in settings.items() if key != "seed"}, "m")
    with pytest.raises(ArtifactError, match="settings hold unknown colour"):
        RunSettings.from_json({**settings, "colour": "red"}, "m")
    changed = RunSettings.from_json({**settings, "seed": 9, "steps": 7}, "m")
    assert changed.differing(RunSettings.from_json(settings, "m")) == ["seed", "steps"]


def test_unknown_top_level_keys_are_kept_and_optional_ones_stay_absent() -> None:
    record = CalibrationManifest.from_json({"format": "diffquant-calib", "version": 1, "status": "in_progress", "schema": {}, "shards": [],
                                            "num_samples": 0, "num_prompts_done": 0, "raw_bytes": 0, "stored_bytes": 0, "note": [1, 2]}, "m")
    assert record.extra == {"note": [1, 2]} and record.settings is None and record.model is None
    assert set(record.to_json()) == {"format", "version", "status", "schema", "shards", "num_samples", "num_prompts_done", "raw_bytes",
                                     "stored_bytes", "note"}
    shard = ShardEntry(file="shard-000000.safetensors", first_sample=0, num_samples=1, bytes=10, sha256="0" * 64)
    assert shard.to_json() == {"file": "shard-000000.safetensors", "first_sample": 0, "num_samples": 1, "bytes": 10, "sha256": "0" * 64}


def test_the_writer_owns_its_manifest_and_hands_out_snapshots(tmp_path: Path) -> None:
    given = CalibrationManifest(model={"name": "m"})
    with CalibrationWriter(tmp_path, given, shard_size_bytes=1) as writer:
        given.model["name"] = "changed after the writer took it"
        given.shards.append(ShardEntry(file="bogus", first_sample=0, num_samples=1, bytes=1, sha256="0" * 64))
        writer.add(CapturedSample(prompt_index=0, step=0, timestep=1.0, kwargs={"x": torch.ones(2)}))
        writer.end_prompt(0)
        writer.finish()
        first, second = writer.manifest, writer.manifest
    assert first is not second and first == second
    first.shards.clear()
    assert len(writer.manifest.shards) == 1 and writer.manifest.model == {"name": "m"}
    on_disk = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert on_disk == writer.manifest.to_json() and on_disk["model"] == {"name": "m"} and on_disk["status"] == "complete"
    assert [shard["file"] for shard in on_disk["shards"]] == ["shard-000000.safetensors"]


def test_a_live_run_with_tuple_arguments_is_found_complete_again(tmp_path: Path) -> None:
    """`original_size=(64, 64)` is written as a JSON list; the settings of the second call compare
    equal to the ones read back, so it returns the finished run instead of refusing it."""
    import diffquant
    from diffusers import DiffusionPipeline
    from diffquant.models.tiny import tiny_pipeline_dir

    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir("sdxl"))
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=1, height=64, width=64, original_size=(64, 64), show_progress=False)
    first = diffquant.calibrate(pipe, pipe.unet, ["a cat"], tmp_path / "calib", **call)
    assert first.manifest["settings"]["pipeline_kwargs"]["original_size"] == [64, 64]
    again = diffquant.calibrate(pipe, pipe.unet, ["a cat"], tmp_path / "calib", **call)
    assert again.already_complete and again.manifest == first.manifest
