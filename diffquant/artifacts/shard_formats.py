"""The two shard formats of a calibration artifact: safetensors files and zarr v3 groups.

Both hold the same thing, a shard's distinct tensors named by content hash plus the shard's JSON
header (its sample records and structures). In a local directory both are published atomically:
written under `<name>.partial` and renamed (a directory rename is atomic too), so a shard either
exists whole or not at all. In a remote store (`location.py`) a safetensors shard is one atomic
object upload, and a zarr shard is written in place and counts once the manifest lists it.

safetensors: `shard-NNNNNN.safetensors`, tensors named by digest, the header in `__metadata__`.

zarr (v3, zarr-python >= 3): `shard-NNNNNN.zarr/`, one array per flattened kwarg key (`k000`,
`k001`, ...; the key is in the array's attributes), axis 0 the distinct values of that key in the
shard, so one sample's tensor is one row: inner chunks of one row, the whole array in one zarr
shard (sharding codec), a crc32c checksum on every chunk (a flipped byte is an error, not a wrong
value), and optional zstd or blosc compression. zarr has no bfloat16 or float8 dtypes, so those
are stored bit-exactly as their uint16 / uint8 views with the torch dtype in the attributes. The
group's attributes hold the header and the digest -> (array, row) map.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from safetensors.torch import save_file

from diffquant.artifacts.atomic import PARTIAL_SUFFIX, fsync_directory, partial_path, publish
from diffquant.artifacts.location import ArtifactLocation
from diffquant.errors import ConfigError

HEADER_KEY = "diffquant.shard"
COMPRESSIONS = ("none", "zstd", "blosc")
_VIEWS = {torch.bfloat16: torch.uint16, torch.float8_e4m3fn: torch.uint8, torch.float8_e5m2: torch.uint8}


class ShardReader(Protocol):
    def header(self) -> str: ...
    def get(self, name: str) -> torch.Tensor: ...


@dataclass(frozen=True)
class ShardFormat:
    """How shards are written and read: `name` is `safetensors` or `zarr`."""

    name: str = "safetensors"
    compression: str = "none"

    def __post_init__(self) -> None:
        if self.name not in ("safetensors", "zarr"):
            raise ConfigError(f"shard format {self.name!r} is not allowed", "use --format safetensors or --format zarr")
        if self.compression not in COMPRESSIONS:
            raise ConfigError(f"compression {self.compression!r} is not allowed", f"use one of {', '.join(COMPRESSIONS)}")
        if self.name == "safetensors" and self.compression != "none":
            raise ConfigError("safetensors shards are not compressed", "use --format zarr for --compression zstd|blosc")

    @property
    def suffix(self) -> str:
        return ".zarr" if self.name == "zarr" else ".safetensors"

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "compression": self.compression}

    def write(self, location: ArtifactLocation, name: str, tensors: dict[str, torch.Tensor], header: str,
              keys: dict[str, str]) -> tuple[int, str] | None:
        """Write one shard `name` into `location` and publish it (module docstring); returns its
        (bytes, sha256) when they are known without reading the shard back, else None.

        tensors: {digest: tensor}; keys: {digest: the kwarg path it was first seen under}.
        """
        if self.name == "zarr":
            _write_zarr(location, name, tensors, header, keys, self.compression)
        elif location.local is None:
            data = save_safetensors_bytes(tensors, metadata={HEADER_KEY: header})
            location.write_bytes(name, data)
            return len(data), hashlib.sha256(data).hexdigest()
        else:
            final = location.path(name)
            tmp = partial_path(final)
            save_file(tensors, str(tmp), metadata={HEADER_KEY: header})
            publish_shard(tmp, final)
        return None

    def open(self, location: ArtifactLocation, name: str) -> ShardReader:
        if self.name == "zarr":
            return _ZarrReader(location.zarr_store(name, read_only=True))
        if location.local is None:
            return _RemoteSafetensorsReader(location, name)
        return _SafetensorsReader(location.path(name))


def publish_shard(tmp: Path, final: Path) -> None:
    """Make a written shard (a file, or a directory of files) durable and rename it into place."""
    if not tmp.is_dir():
        publish(tmp, final)
        return
    for item in tmp.rglob("*"):
        if item.is_file():
            with open(item, "rb+") as handle:
                os.fsync(handle.fileno())
    os.replace(tmp, final)
    fsync_directory(final.parent)


class _SafetensorsReader:
    def __init__(self, path: Path) -> None:
        self._handle = safe_open(str(path), framework="pt")

    def header(self) -> str:
        metadata = self._handle.metadata() or {}
        return metadata.get(HEADER_KEY, "")

    def get(self, name: str) -> torch.Tensor:
        return self._handle.get_tensor(name)


class _RemoteSafetensorsReader:
    """A safetensors shard in a remote store: the header by two ranged reads, the tensors by one
    download of the whole shard on first use (a memory map cannot reach across a network)."""

    def __init__(self, location: ArtifactLocation, name: str) -> None:
        self._location, self._name = location, name
        self._tensors: dict[str, torch.Tensor] | None = None

    def header(self) -> str:
        (length,) = struct.unpack("<Q", self._location.read_bytes(self._name, 0, 8))
        metadata = json.loads(self._location.read_bytes(self._name, 8, 8 + length)).get("__metadata__") or {}
        return metadata.get(HEADER_KEY, "")

    def get(self, name: str) -> torch.Tensor:
        if self._tensors is None:
            self._tensors = load_safetensors_bytes(self._location.read_bytes(self._name))
        return self._tensors[name]


class _ZarrReader:
    def __init__(self, store: Any) -> None:
        import zarr

        self._group = zarr.open_group(store, mode="r")
        attrs = self._group.attrs.asdict()
        self._header = attrs.get(HEADER_KEY, "")
        self._rows: dict[str, list] = attrs.get("diffquant.rows", {})
        self._dtypes: dict[str, str] = attrs.get("diffquant.dtypes", {})
        self._arrays: dict[str, object] = {}

    def header(self) -> str:
        return self._header

    def get(self, name: str) -> torch.Tensor:
        array_name, row = self._rows[name]
        array = self._arrays.get(array_name)
        if array is None:
            array = self._arrays[array_name] = self._group[array_name]
        values = torch.from_numpy(array[row])
        torch_dtype = getattr(torch, self._dtypes[array_name])
        return values.view(torch_dtype) if values.dtype != torch_dtype else values


def _write_zarr(location: ArtifactLocation, name: str, tensors: dict[str, torch.Tensor], header: str, keys: dict[str, str],
                compression: str) -> None:
    import zarr
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    compressors = {
        "none": [Crc32cCodec()],
        "zstd": [ZstdCodec(level=1), Crc32cCodec()],
        "blosc": [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"), Crc32cCodec()],
    }[compression]
    # Locally the group is written under `.partial` and renamed; in a store, in place (no rename).
    written = name + PARTIAL_SUFFIX if location.local is not None else name
    location.remove(written)
    # Group the distinct tensors by kwarg key, then by dtype and shape (one array, one of each).
    groups: dict[tuple[str, torch.dtype, tuple[int, ...]], list[str]] = {}
    for digest, tensor in tensors.items():
        groups.setdefault((keys[digest], tensor.dtype, tuple(tensor.shape)), []).append(digest)
    group = zarr.open_group(location.zarr_store(written, read_only=False), mode="w")
    rows: dict[str, list] = {}
    dtypes: dict[str, str] = {}
    for index, ((key, dtype, shape), names) in enumerate(sorted(groups.items(), key=lambda item: (item[0][0], str(item[0][1]), item[0][2]))):
        array_name = f"k{index:03d}"
        stacked = torch.stack([tensors[n] for n in names]).contiguous()
        stored = stacked.view(_VIEWS[dtype]) if dtype in _VIEWS else stacked
        array = group.create_array(
            array_name, shape=tuple(stored.shape), dtype=str(stored.numpy().dtype),
            chunks=(1, *shape), shards=tuple(stored.shape), compressors=compressors,
        )
        array[...] = stored.numpy()
        array.attrs.update({"kwarg": key, "torch_dtype": str(dtype).removeprefix("torch.")})
        dtypes[array_name] = str(dtype).removeprefix("torch.")
        for row, digest in enumerate(names):
            rows[digest] = [array_name, row]
    group.attrs.update({HEADER_KEY: header, "diffquant.rows": rows, "diffquant.dtypes": dtypes})
    if location.local is not None:
        publish_shard(location.path(written), location.path(name))
