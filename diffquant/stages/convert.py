"""Convert a calibration artifact between shard formats (safetensors <-> zarr).

Every sample is read back complete and written again through `CalibrationWriter`, so the result is
an ordinary artifact of the other format: same samples in the same order, same deduplication, the
same shard-size rule, and a manifest whose settings differ only in `shard_format`. Readers yield
bit-identical samples from both. Either side may be a local directory or an fsspec URL
(`s3://...`), so `convert` also uploads an artifact to a store or brings one home.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tqdm.auto import tqdm

from diffquant.artifacts.calibration_format import MANIFEST_NAME
from diffquant.artifacts.calibration_reader import CalibrationArtifact
from diffquant.artifacts.calibration_records import CalibrationManifest
from diffquant.artifacts.calibration_writer import CalibrationWriter, CapturedSample
from diffquant.artifacts.location import ArtifactLocation
from diffquant.artifacts.locking import OutputLock
from diffquant.artifacts.replace import owned_files, recover_generation, recover_switch, refuse_nested, replacing
from diffquant.artifacts.shard_formats import ShardFormat
from diffquant.errors import ArtifactError


def convert_artifact(source: Path | str, destination: Path | str, shard_format: ShardFormat, overwrite: bool = False,
                     show_progress: bool = True, verify: bool = True) -> dict:
    """Write `source` again as `destination` in `shard_format`; returns the new manifest.

    The destination may be neither the source nor inside it (nor hold it). An `--overwrite` builds
    the new artifact beside the old one and publishes it in one step when complete (`replace.py`)."""
    target = ArtifactLocation(destination)
    refuse_nested(target, source, "source artifact", "DESTINATION")
    artifact = CalibrationArtifact(source, verify=verify)
    with OutputLock(target):
        replaced = _prepare_destination(target, overwrite)
        with replacing(target, replaced) as build:
            manifest = _convert(artifact, build.location, shard_format, show_progress)
    return build.published or manifest


def _convert(artifact: CalibrationArtifact, target: ArtifactLocation, shard_format: ShardFormat, show_progress: bool) -> dict:
    source = artifact.record
    if source.settings is None:
        raise ArtifactError(f"calibration artifact {artifact.path} records no settings", "convert an artifact written by `diffquant calibrate`")
    settings = dataclasses.replace(source.settings, shard_format=shard_format.describe())
    fresh = CalibrationManifest.new(settings, **{name: getattr(source, name) for name in ("model", "pipeline", "placement", "prompts", "library_versions")})
    manifest = dataclasses.replace(fresh, extra=source.extra)
    records = artifact.records
    with CalibrationWriter(target, manifest, settings.shard_size_bytes) as writer:
        for index, record in enumerate(tqdm(records, desc="convert", unit="sample", disable=not show_progress)):
            writer.add(CapturedSample(record.prompt, record.step, record.timestep, artifact.sample(index)))
            if index + 1 == len(records) or records[index + 1].prompt != record.prompt:
                writer.end_prompt(record.prompt)
        writer.finish()
    return writer.manifest.to_json()


def _prepare_destination(destination: ArtifactLocation, overwrite: bool) -> set[str] | None:
    """Check the destination; for an `--overwrite`, the old artifact's file names."""
    if destination.local is not None:
        recover_switch(destination.local)
    else:
        recover_generation(destination)
    if not destination.names():
        destination.make()
        return None
    if not overwrite:
        raise ArtifactError(f"{destination} is not empty", "choose an empty destination, or pass --overwrite")
    if not destination.is_file(MANIFEST_NAME):
        raise ArtifactError(f"{destination} holds no calibration manifest, so --overwrite will not delete there",
                            "choose an empty or new destination")
    return owned_files(destination)
