"""The activation-statistics cache beside a calibration artifact: `stats/`.

One safetensors file per statistic kind and key (`stats/<kind>-<key hash>.safetensors`, tensors
named `<layer>/<field>`), and `stats/index.json` listing each entry: its key, layers, bytes and
sha256. The key is everything a statistic depends on: the calibration manifest's sha256, the
model's class, config hash and dtype, the device type it was computed on, the statistic kind with
the histogram layout version, and the sha256 of the selected sample ids. An entry is used only if
its key matches exactly, it covers every requested layer, and its file has the recorded size and
sha256; anything else is recomputed and replaced, never silently reused. The cache lives in the
artifact's own location, so an artifact in a store (`s3://...`) keeps its statistics there too.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from diffquant.artifacts.atomic import PARTIAL_SUFFIX
from diffquant.artifacts.calibration_format import json_sha256
from diffquant.artifacts.location import ArtifactLocation, checked_name
from diffquant.errors import ArtifactError

STATS_DIR = "stats"
INDEX_NAME = "index.json"
INDEX_VERSION = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FIX = "delete the artifact's stats/ directory (a cache, recomputed on the next run) or pass --no-stats-cache"


class StatsCache:
    """Read and write cached statistics of one calibration artifact."""

    def __init__(self, artifact: ArtifactLocation) -> None:
        self.root = artifact.child(STATS_DIR)
        self.hits: list[str] = []
        self.rejected: list[str] = []

    def lookup(self, key: dict[str, Any], layers: set[str]) -> dict[str, dict[str, torch.Tensor]] | None:
        """{layer: {field: tensor}} for a valid entry of `key` covering `layers`, else None."""
        entry = self._index().get(json_sha256(key))
        kind = key["kind"]
        if entry is None or entry["key"] != key or not layers <= set(entry["layers"]):
            return None
        data = self.root.read_bytes(entry["file"]) if self.root.is_file(entry["file"]) else b""
        # The entry's hash is checked against the bytes read, in the one pass that reads them.
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            self.rejected.append(kind)
            return None
        tensors = load_safetensors_bytes(data)
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            layer, _, fieldname = name.rpartition("/")
            if layer in layers:
                out.setdefault(layer, {})[fieldname] = tensor
        self.hits.append(kind)
        return out

    def store(self, key: dict[str, Any], data: dict[str, dict[str, torch.Tensor]]) -> None:
        """Write one entry (replacing any entry of the same key) and commit it to the index."""
        self.root.make()
        key_hash = json_sha256(key)
        name = f"{key['kind']}-{key_hash[:16]}.safetensors"
        tensors = {f"{layer}/{field}": t.detach().cpu().contiguous() for layer, fields in data.items() for field, t in fields.items()}
        content = save_safetensors_bytes(tensors)
        self.root.write_bytes(name, content)
        index = self._index()
        index[key_hash] = {
            "key": key,
            "file": name,
            "layers": sorted(data),
            "bytes": len(content),
            "sha256": hashlib.sha256(content).hexdigest(),
        }
        self.root.write_json(INDEX_NAME, {"version": INDEX_VERSION, "entries": index})

    def owns_everything(self) -> bool:
        """Whether every file in `stats/` is the index or an entry it lists (or their temporaries):
        only then may an `--overwrite` delete the directory."""
        try:
            listed = {entry["file"] for entry in self._index().values()} | {INDEX_NAME}
        except ArtifactError:
            return False
        return all(name.removesuffix(PARTIAL_SUFFIX) in listed for name in self.root.names())

    def verify(self) -> list[str]:
        """One line per entry whose file is missing or fails its recorded size or sha256."""
        problems = []
        for entry in self._index().values():
            where = f"{self.root}/{entry['file']}"
            if not self.root.is_file(entry["file"]):
                problems.append(f"{where}: missing")
                continue
            if self.root.size(entry["file"]) != entry["bytes"] or self.root.sha256(entry["file"]) != entry["sha256"]:
                problems.append(f"{where}: sha256 differs from {self.root}/{INDEX_NAME}")
        return problems

    def _index(self) -> dict[str, Any]:
        """The index's entries, each checked field by field; a malformed index is a one-line error."""
        if not self.root.is_file(INDEX_NAME):
            return {}
        where = f"{self.root}/{INDEX_NAME}"
        content = self.root.read_json(INDEX_NAME)
        if not isinstance(content, dict) or content.get("version") != INDEX_VERSION:
            raise ArtifactError(f"{where} is not a statistics index of version {INDEX_VERSION}", _FIX)
        entries = content.get("entries")
        if not isinstance(entries, dict):
            raise ArtifactError(f"{where}: entries is {type(entries).__name__}, not a mapping", _FIX)
        for key_hash, entry in entries.items():
            _check_entry(where, key_hash, entry)
        return entries


def _check_entry(where: str, key_hash: str, entry: Any) -> None:
    """Refuse an index entry whose fields have the wrong type or range, or name a file elsewhere."""
    def bad(field: str, allowed: str) -> ArtifactError:
        value = entry.get(field) if isinstance(entry, dict) else entry
        return ArtifactError(f"{where}: entry {key_hash[:16]} field {field} is {value!r}, allowed is {allowed}", _FIX)

    if not isinstance(entry, dict):
        raise bad("<entry>", "a mapping")
    if not isinstance(entry.get("key"), dict) or json_sha256(entry["key"]) != key_hash:
        raise bad("key", "the statistic's key, whose sha256 is the entry's name")
    name = entry.get("file")
    if not isinstance(name, str) or "/" in name or not name.endswith(".safetensors"):
        raise bad("file", "a .safetensors file name inside stats/")
    checked_name(name, where)
    layers = entry.get("layers")
    if not isinstance(layers, list) or not all(isinstance(layer, str) for layer in layers):
        raise bad("layers", "a list of layer names")
    if not isinstance(entry.get("bytes"), int) or isinstance(entry.get("bytes"), bool) or entry["bytes"] < 0:
        raise bad("bytes", "an integer >= 0")
    if not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
        raise bad("sha256", "64 lowercase hex digits")
