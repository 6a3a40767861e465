"""Constants and small helpers of the calibration artifact format (documented in README.md here).

An artifact is a directory, local or in an fsspec store (`location.py`): `manifest.json` (the
commit point; readers trust only what it lists) and `shard-NNNNNN.safetensors` files (or
`shard-NNNNNN.zarr` groups). Each shard holds whole prompts: its tensors are named by
content hash, and its `__metadata__` carries the per-sample records, so a shard is readable on its
own.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffquant.errors import ArtifactError

if TYPE_CHECKING:
    from diffquant.artifacts.location import ArtifactLocation

FORMAT_NAME = "diffquant-calib"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "{prefix}{index:06d}{suffix}"
SHARD_PREFIX = "shard-"


def shard_name(index: int, suffix: str = ".safetensors", prefix: str = SHARD_PREFIX) -> str:
    """`shard-000042.safetensors`; a rank of a data-parallel run uses the prefix `shard-r001-`."""
    return SHARD_PATTERN.format(prefix=prefix, index=index, suffix=suffix)


def rank_manifest_name(rank: int) -> str:
    """The per-rank manifest of a data-parallel run (merged into manifest.json at the end)."""
    return f"manifest.rank{rank:03d}.json"


def rank_shard_prefix(rank: int) -> str:
    return f"{SHARD_PREFIX}r{rank:03d}-"


def tensor_digest(tensor: torch.Tensor) -> str:
    """Content hash of a CPU tensor: dtype, shape and bytes (sha256, 32 hex characters kept)."""
    flat = tensor.detach().contiguous().reshape(-1)
    hasher = hashlib.sha256(f"{flat.dtype}|{tuple(tensor.shape)}|".encode())
    if flat.numel():
        hasher.update(memoryview(flat.view(torch.uint8).numpy()))
    return hasher.hexdigest()[:32]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, read through one reused 1 MiB buffer (no per-block allocations)."""
    hasher = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            hasher.update(view[:count])
    return hasher.hexdigest()


def json_sha256(obj: Any) -> str:
    """sha256 of the canonical JSON form (sorted keys, no spaces) of `obj`."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def read_manifest(directory: ArtifactLocation) -> dict[str, Any]:
    """Load and check `manifest.json` (format, version and fields: `CalibrationManifest.from_json`)
    as the JSON document it is; a missing or unknown one is a one-line error."""
    from diffquant.artifacts.calibration_records import CalibrationManifest, read_document

    document = read_document(directory, MANIFEST_NAME)
    CalibrationManifest.from_json(document, f"{directory}/{MANIFEST_NAME}")
    return document


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MANIFEST_FIX = "restore manifest.json, or recalibrate into a new directory"


def check_manifest_fields(manifest: dict[str, Any], where: str) -> None:
    """Refuse a manifest whose fields have the wrong type or range, whose shard list names a file
    twice or outside the artifact, or whose counters disagree with its shards: one line naming the
    file, the field, the value and what is allowed."""
    from diffquant.artifacts.location import checked_name

    def bad(field: str, value: Any, allowed: str) -> ArtifactError:
        text = repr(value)
        return ArtifactError(f"{where}: {field} is {text if len(text) <= 60 else text[:57] + '...'}, allowed is {allowed}", _MANIFEST_FIX)

    def count(container: dict[str, Any], field: str, label: str) -> int:
        value = container.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad(label, value, "an integer >= 0")
        return value

    if manifest.get("status") not in ("complete", "in_progress"):
        raise bad("status", manifest.get("status"), "complete or in_progress")
    if not isinstance(manifest.get("schema"), dict):
        raise bad("schema", manifest.get("schema"), "a mapping")
    # settings, model and prompts are what calibrate writes and check_model reads; a manifest
    # written by other means may lack them, but not hold them in another shape.
    for field in ("settings", "model", "prompts"):
        if field in manifest and not isinstance(manifest[field], dict):
            raise bad(field, manifest[field], "a mapping")
    model = manifest.get("model", {})
    for field in ("name", "target", "target_class", "target_config_sha256", "target_weights_sha256"):
        if field in model and not isinstance(model[field], str):
            raise bad(f"model.{field}", model[field], "a string")
    if "count" in manifest.get("prompts", {}):
        count(manifest["prompts"], "count", "prompts.count")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise bad("shards", shards, "a list")
    seen: set[str] = set()
    total = 0
    for index, shard in enumerate(shards):
        label = f"shards[{index}]"
        if not isinstance(shard, dict):
            raise bad(label, shard, "a mapping")
        name = checked_name(shard.get("file"), f"{where} {label}.file")
        if name in seen:
            raise bad(f"{label}.file", name, "a shard listed once (it is listed twice)")
        seen.add(name)
        for field in ("first_sample", "num_samples", "bytes"):
            count(shard, field, f"{label}.{field}")
        if shard["first_sample"] != total:
            raise bad(f"{label}.first_sample", shard["first_sample"], f"{total}, the samples of the shards before it")
        total += shard["num_samples"]
        if not isinstance(shard.get("sha256"), str) or not _SHA256.match(shard["sha256"]):
            raise bad(f"{label}.sha256", shard.get("sha256"), "64 lowercase hex digits")
    if count(manifest, "num_samples", "num_samples") != total and "rank" not in manifest:
        raise bad("num_samples", manifest["num_samples"], f"{total}, the sum over its shards")
    count(manifest, "num_prompts_done", "num_prompts_done")
    for path, entry in manifest["schema"].items():
        if not isinstance(entry, dict):
            raise bad(f"schema.{path}", entry, "a mapping")
