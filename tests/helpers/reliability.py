"""Shared helpers of the reliability tests: private artifact copies, directory hashes, CLI runs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from diffquant.artifacts.calibration_format import file_sha256
from diffquant.cli import main


def copy_artifact(source: Path, destination: Path, keep_stats: bool = False) -> Path:
    shutil.copytree(source, destination, ignore=None if keep_stats else shutil.ignore_patterns("stats"), symlinks=True)
    return destination


def tree_hash(root: Path) -> dict[str, str]:
    """{relative path: sha256 or link target} of every file and symlink under `root`."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[relative] = "link:" + str(path.readlink())
        elif path.is_file():
            out[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run_cli(args: list[str]) -> Any:
    return CliRunner().invoke(main, args)


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    """Apply `change` to the parsed document (it edits in place, or returns a replacement)."""
    document = json.loads(path.read_text())
    replaced = change(document)
    path.write_text(json.dumps(document if replaced is None else replaced))


def flip_byte(path: Path, offset_from_end: int = 1) -> None:
    """Invert one byte near the end of the file (tensor data, not the header); same size."""
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def rewrite_shard(calib: Path, change_header: Callable[[dict], Any] | None = None, change_tensors: Callable[[dict], None] | None = None,
                  raw_header: str | None = None) -> None:
    """Rewrite the artifact's first safetensors shard with an edited header or edited tensors, and
    record its new size and sha256 in the manifest, so that only the edit itself is wrong."""
    manifest_path = calib / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    shard = calib / manifest["shards"][0]["file"]
    with safe_open(str(shard), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        header = handle.metadata()["diffquant.shard"]
    if change_header is not None:
        content = json.loads(header)
        replaced = change_header(content)
        header = json.dumps(content if replaced is None else replaced)
    if raw_header is not None:
        header = raw_header
    if change_tensors is not None:
        change_tensors(tensors)
    save_file(tensors, str(shard), metadata={"diffquant.shard": header})
    manifest["shards"][0].update(bytes=shard.stat().st_size, sha256=file_sha256(shard))
    manifest["stored_bytes"] = sum(s["bytes"] for s in manifest["shards"])
    manifest_path.write_text(json.dumps(manifest))


def store_on_local_filesystem(directory: Path) -> Any:
    """An `ArtifactLocation` of `directory` through fsspec's LocalFileSystem, as a store: the
    `file://` backend of the store code paths (a `file://` URL itself is taken as a local path)."""
    import fsspec

    from diffquant.artifacts.location import ArtifactLocation

    location = ArtifactLocation(f"memory://placeholder-{directory.name}")
    location.fs, location.root, location.url, location.object_store = fsspec.filesystem("file"), str(directory), f"file://{directory}", False
    return location
