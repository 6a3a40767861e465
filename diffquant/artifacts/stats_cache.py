"""The activation-statistics cache beside a calibration artifact: `stats/`.

One safetensors file per statistic kind and key (`stats/<kind>-<key hash>.safetensors`, tensors
named `<layer>/<field>`), and `stats/index.json` listing each entry: its key, layers, bytes and
sha256. The key is everything a statistic depends on: the calibration manifest's sha256, the
model's class, config hash and dtype, the device type it was computed on, the statistic kind with
the histogram layout version, and the sha256 of the selected sample ids. An entry is used only if
its key matches exactly, it covers every requested layer, and its file has the recorded size and
sha256; anything else is recomputed and replaced, never silently reused. The cache lives in the
artifact's own location, so an artifact in a store (`s3://...`) keeps its statistics there too.

The index is a typed record (`StatsIndex` of `StatsEntry`), parsed and version-checked in
`StatsIndex.from_json` only, and written back by `to_json` byte for byte as the dicts it replaced
(sorted keys, two-space indent).

Example:
    >>> entry = StatsEntry(key={"kind": "range"}, file="range-0.safetensors", layers=["conv_in"], bytes=8, sha256="0" * 64)
    >>> index = StatsIndex(entries={json_sha256(entry.key): entry})
    >>> StatsIndex.from_json(index.to_json(), "index.json") == index
    True
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class StatsEntry:
    """One cached statistic: its full key, its file in `stats/`, the layers it covers, and the
    file's size and sha256."""

    key: dict[str, Any]
    file: str
    layers: list[str]
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "file": self.file, "layers": self.layers, "bytes": self.bytes, "sha256": self.sha256}

    @classmethod
    def from_json(cls, raw: Any, key_hash: str, where: str) -> "StatsEntry":
        """The entry named `key_hash`, each field checked for type and range; one line otherwise."""
        def bad(name: str, allowed: str) -> ArtifactError:
            value = raw.get(name) if isinstance(raw, dict) else raw
            return ArtifactError(f"{where}: entry {key_hash[:16]} field {name} is {value!r}, allowed is {allowed}", _FIX)

        if not isinstance(raw, dict):
            raise bad("<entry>", "a mapping")
        if not isinstance(raw.get("key"), dict) or json_sha256(raw["key"]) != key_hash:
            raise bad("key", "the statistic's key, whose sha256 is the entry's name")
        name = raw.get("file")
        if not isinstance(name, str) or "/" in name or not name.endswith(".safetensors"):
            raise bad("file", "a .safetensors file name inside stats/")
        checked_name(name, where)
        layers = raw.get("layers")
        if not isinstance(layers, list) or not all(isinstance(layer, str) for layer in layers):
            raise bad("layers", "a list of layer names")
        size = raw.get("bytes")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise bad("bytes", "an integer >= 0")
        if not isinstance(raw.get("sha256"), str) or not _SHA256.match(raw["sha256"]):
            raise bad("sha256", "64 lowercase hex digits")
        return cls(key=raw["key"], file=name, layers=list(layers), bytes=size, sha256=raw["sha256"])


@dataclass(frozen=True)
class StatsIndex:
    """`stats/index.json`: the entries by the sha256 of their key; the one place its version is checked."""

    entries: dict[str, StatsEntry] = field(default_factory=dict)
    version: int = INDEX_VERSION

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "entries": {key_hash: entry.to_json() for key_hash, entry in self.entries.items()}}

    @classmethod
    def from_json(cls, content: Any, where: str) -> "StatsIndex":
        if not isinstance(content, dict) or content.get("version") != INDEX_VERSION:
            raise ArtifactError(f"{where} is not a statistics index of version {INDEX_VERSION}", _FIX)
        entries = content.get("entries")
        if not isinstance(entries, dict):
            raise ArtifactError(f"{where}: entries is {type(entries).__name__}, not a mapping", _FIX)
        return cls(entries={key_hash: StatsEntry.from_json(raw, key_hash, where) for key_hash, raw in entries.items()})


class StatsCache:
    """Read and write cached statistics of one calibration artifact."""

    def __init__(self, artifact: ArtifactLocation) -> None:
        self.root = artifact.child(STATS_DIR)
        self.hits: list[str] = []
        self.rejected: list[str] = []

    def lookup(self, key: dict[str, Any], layers: set[str]) -> dict[str, dict[str, torch.Tensor]] | None:
        """{layer: {field: tensor}} for a valid entry of `key` covering `layers`, else None."""
        entry = self.index().entries.get(json_sha256(key))
        kind = key["kind"]
        if entry is None or entry.key != key or not layers <= set(entry.layers):
            return None
        data = self.root.read_bytes(entry.file) if self.root.is_file(entry.file) else b""
        # The entry's hash is checked against the bytes read, in the one pass that reads them.
        if len(data) != entry.bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
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
        entries = dict(self.index().entries)
        entries[key_hash] = StatsEntry(key=key, file=name, layers=sorted(data), bytes=len(content), sha256=hashlib.sha256(content).hexdigest())
        self.root.write_json(INDEX_NAME, StatsIndex(entries=entries).to_json())

    def owns_everything(self) -> bool:
        """Whether every file in `stats/` is the index or an entry it lists (or their temporaries):
        only then may an `--overwrite` delete the directory."""
        try:
            listed = {entry.file for entry in self.index().entries.values()} | {INDEX_NAME}
        except ArtifactError:
            return False
        return all(name.removesuffix(PARTIAL_SUFFIX) in listed for name in self.root.names())

    def verify(self) -> list[str]:
        """One line per entry whose file is missing or fails its recorded size or sha256."""
        problems = []
        for entry in self.index().entries.values():
            where = f"{self.root}/{entry.file}"
            if not self.root.is_file(entry.file):
                problems.append(f"{where}: missing")
                continue
            if self.root.size(entry.file) != entry.bytes or self.root.sha256(entry.file) != entry.sha256:
                problems.append(f"{where}: sha256 differs from {self.root}/{INDEX_NAME}")
        return problems

    def index(self) -> StatsIndex:
        """The parsed index (empty when there is none); a malformed index is a one-line error."""
        if not self.root.is_file(INDEX_NAME):
            return StatsIndex()
        return StatsIndex.from_json(self.root.read_json(INDEX_NAME), f"{self.root}/{INDEX_NAME}")
