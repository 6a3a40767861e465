"""Check every sha256 an artifact records: `diffquant verify DIR|URL`.

A calibration artifact records the sha256 of each shard in `manifest.json` and of each cached
statistic in `stats/index.json`; a checkpoint records the sha256 of `model.safetensors` in
`quant_manifest.json`. `verify_artifact` recomputes each one, streamed (1 MiB reads, one pass per
file), and returns one line per file that is missing or differs, so one damaged shard does not
hide another. A statistics entry whose key names another calibration (the artifact was replaced
since) is reported too: it could never be used.

Example:
    >>> import tempfile
    >>> verify_artifact(tempfile.mkdtemp())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    diffquant.errors.ArtifactError: ... holds neither manifest.json nor quant_manifest.json — pass a calibration artifact ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from diffquant.artifacts.calibration_format import MANIFEST_NAME, json_sha256, read_manifest
from diffquant.artifacts.calibration_records import CalibrationManifest
from diffquant.artifacts.checkpoint import MANIFEST_NAME as CHECKPOINT_MANIFEST_NAME
from diffquant.artifacts.checkpoint import read_checkpoint_manifest, verify_checkpoint_files
from diffquant.artifacts.location import ArtifactLocation
from diffquant.artifacts.stats_cache import STATS_DIR, StatsCache
from diffquant.errors import ArtifactError


@dataclass
class VerifyReport:
    """What `verify_artifact` checked: the kind of artifact, how many files, and every mismatch."""

    kind: str
    files_checked: int = 0
    problems: list[str] = field(default_factory=list)


def verify_artifact(target: Path | str) -> VerifyReport:
    """Recompute every recorded sha256 of a calibration artifact or a checkpoint (module docstring)."""
    location = ArtifactLocation(target)
    if location.is_file(CHECKPOINT_MANIFEST_NAME) and not location.is_file(MANIFEST_NAME):
        if location.local is None:
            raise ArtifactError(f"{location} is a checkpoint in a store; checkpoints are verified in a local directory", "copy it to a local directory")
        directory = location.local
        files = read_checkpoint_manifest(directory, verify=False).files or {}
        return VerifyReport("checkpoint", len(files), verify_checkpoint_files(directory, files))
    if not location.is_file(MANIFEST_NAME):
        raise ArtifactError(f"{location} holds neither {MANIFEST_NAME} nor {CHECKPOINT_MANIFEST_NAME}",
                            "pass a calibration artifact or a quantized checkpoint directory")
    manifest = read_manifest(location)
    report = VerifyReport("calibration")
    for shard in CalibrationManifest.from_json(manifest, f"{location}/{MANIFEST_NAME}").shards:
        where = f"{location}/{shard.file}"
        report.files_checked += 1
        if not location.exists(shard.file):
            report.problems.append(f"{where}: missing")
        elif location.size(shard.file) != shard.bytes:
            report.problems.append(f"{where}: {location.size(shard.file)} bytes, the manifest records {shard.bytes}")
        elif location.sha256(shard.file) != shard.sha256:
            report.problems.append(f"{where}: sha256 differs from the manifest's")
    if location.exists(STATS_DIR):
        cache = StatsCache(location)
        entries = cache.index().entries
        report.files_checked += len(entries)
        report.problems.extend(cache.verify())
        current = json_sha256(manifest)
        for entry in entries.values():
            if entry.key.get("calibration_manifest_sha256") != current:
                report.problems.append(f"{cache.root}/{entry.file}: computed from another calibration than {location}/{MANIFEST_NAME}")
    return report
