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
import json
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from diffquant.artifacts.calibration_format import json_sha256
from diffquant.artifacts.location import ArtifactLocation

STATS_DIR = "stats"
INDEX_NAME = "index.json"
INDEX_VERSION = 1


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

    def _index(self) -> dict[str, Any]:
        if not self.root.is_file(INDEX_NAME):
            return {}
        try:
            content = self.root.read_json(INDEX_NAME)
        except (OSError, json.JSONDecodeError):
            return {}
        return content.get("entries", {}) if content.get("version") == INDEX_VERSION else {}
