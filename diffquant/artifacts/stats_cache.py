"""The activation-statistics cache beside a calibration artifact: `stats/`.

One safetensors file per statistic kind and key (`stats/<kind>-<key hash>.safetensors`, tensors
named `<layer>/<field>`), and `stats/index.json` listing each entry: its key, layers, bytes and
sha256. The key is everything a statistic depends on: the calibration manifest's sha256, the
model's class, config hash and dtype, the device type it was computed on, the statistic kind with
the histogram layout version, and the sha256 of the selected sample ids. An entry is used only if
its key matches exactly, it covers every requested layer, and its file has the recorded size and
sha256; anything else is recomputed and replaced, never silently reused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diffquant.artifacts.atomic import partial_path, publish, write_json_atomic
from diffquant.artifacts.calibration_format import file_sha256, json_sha256

STATS_DIR = "stats"
INDEX_NAME = "index.json"
INDEX_VERSION = 1


class StatsCache:
    """Read and write cached statistics of one calibration artifact."""

    def __init__(self, calib_dir: Path) -> None:
        self.root = Path(calib_dir) / STATS_DIR
        self.hits: list[str] = []
        self.misses: list[str] = []
        self.rejected: list[str] = []

    def lookup(self, key: dict[str, Any], layers: set[str]) -> dict[str, dict[str, torch.Tensor]] | None:
        """{layer: {field: tensor}} for a valid entry of `key` covering `layers`, else None."""
        entry = self._index().get(json_sha256(key))
        kind = key["kind"]
        if entry is None or entry["key"] != key or not layers <= set(entry["layers"]):
            self.misses.append(kind)
            return None
        path = self.root / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            self.rejected.append(kind)
            return None
        tensors = load_file(str(path))
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            layer, _, fieldname = name.rpartition("/")
            if layer in layers:
                out.setdefault(layer, {})[fieldname] = tensor
        self.hits.append(kind)
        return out

    def store(self, key: dict[str, Any], data: dict[str, dict[str, torch.Tensor]]) -> None:
        """Write one entry (replacing any entry of the same key) and commit it to the index."""
        self.root.mkdir(parents=True, exist_ok=True)
        key_hash = json_sha256(key)
        final = self.root / f"{key['kind']}-{key_hash[:16]}.safetensors"
        tmp = partial_path(final)
        tensors = {f"{layer}/{field}": t.detach().cpu().contiguous() for layer, fields in data.items() for field, t in fields.items()}
        save_file(tensors, str(tmp))
        publish(tmp, final)
        index = self._index()
        index[key_hash] = {
            "key": key,
            "file": final.name,
            "layers": sorted(data),
            "bytes": final.stat().st_size,
            "sha256": file_sha256(final),
        }
        write_json_atomic(self.root / INDEX_NAME, {"version": INDEX_VERSION, "entries": index})

    def _index(self) -> dict[str, Any]:
        path = self.root / INDEX_NAME
        if not path.is_file():
            return {}
        try:
            content = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return content.get("entries", {}) if content.get("version") == INDEX_VERSION else {}
