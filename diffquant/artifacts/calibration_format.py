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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffquant.artifacts.atomic import PARTIAL_SUFFIX
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


def empty_contents() -> dict[str, Any]:
    """The content fields of a manifest that holds no shard yet (the writer extends them)."""
    return {"schema": {}, "shards": [], "num_samples": 0, "num_prompts_done": 0, "raw_bytes": 0, "stored_bytes": 0}


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
    """Load and version-check `manifest.json`; a missing or unknown one is a one-line error."""
    path = f"{directory}/{MANIFEST_NAME}"
    if not directory.is_file(MANIFEST_NAME):
        raise ArtifactError(f"{directory} has no {MANIFEST_NAME}", "pass a calibration artifact written by `diffquant calibrate`")
    try:
        manifest = json.loads(directory.read_bytes(MANIFEST_NAME))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc})", "recalibrate into a new directory") from exc
    if manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path} is not a diffquant calibration manifest", "pass a calibration artifact directory")
    if manifest.get("version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format version {manifest.get('version')}, this diffquant reads version {FORMAT_VERSION}",
            "recalibrate with this version or upgrade diffquant",
        )
    return manifest


def remove_artifact_files(out: ArtifactLocation) -> None:
    """Delete every file of a calibration artifact (manifests, shards, leftovers, stats cache)."""
    for name in out.names():
        if name in (MANIFEST_NAME, "stats") or name.startswith(("shard-", ".tmp", "manifest.rank")) or name.endswith(PARTIAL_SUFFIX):
            out.remove(name)
