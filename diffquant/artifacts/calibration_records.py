"""Typed records of the calibration manifest: the run settings, a shard entry, the rank of a
data-parallel run, and the manifest that holds them (the format is described in README.md here).

Each record is a dataclass with `to_json()` / `from_json()`; `to_json(from_json(d)) == d` key for
key, so a manifest read and written again is the same bytes (`ArtifactLocation.write_json` sorts
the keys). `CalibrationManifest.from_json` is the one place the format name and version are
checked; top-level keys this version does not name are kept in `extra` and written back as read.
The nested `model`, `pipeline`, `placement`, `prompts`, `library_versions`, `shard_format` and
`schema` documents stay mappings: their readers (presets, the quantize stage, the shard formats)
take them as such.

Example:
    >>> settings = RunSettings(model="tiny-sdxl", source="tiny://sdxl", revision=None, pipeline_class="StableDiffusionXLPipeline",
    ...                        torch_dtype="float32", variant=None, target="unet", prompts_sha256="ab" * 32, num_prompts=2,
    ...                        steps=3, seed=0, pipeline_kwargs={"height": 64}, device="cpu", shard_size_bytes=1 << 20,
    ...                        shard_format={"name": "safetensors", "compression": "none"}, num_processes=1)
    >>> manifest = CalibrationManifest.new(settings, model={"name": "tiny-sdxl"}, prompts={"count": 2})
    >>> manifest.add_shard(ShardEntry(file="shard-000000.safetensors", first_sample=0, num_samples=6, bytes=4096, sha256="0" * 64,
    ...                               first_prompt=0, num_prompts=2, tensor_bytes=4000, raw_bytes=9000))
    >>> manifest.num_samples, manifest.num_prompts_done, manifest.stored_bytes
    (6, 2, 4096)
    >>> document = manifest.to_json()
    >>> document["settings_sha256"] == settings.sha256(), CalibrationManifest.from_json(document, "m.json").to_json() == document
    (True, True)
    >>> CalibrationManifest.from_json({**document, "version": 2}, "m.json")
    Traceback (most recent call last):
    ...
    diffquant.errors.ArtifactError: m.json has format version 2, this diffquant reads version 1 — recalibrate with this version or upgrade diffquant
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from diffquant.artifacts.calibration_format import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, check_manifest_fields, json_sha256
from diffquant.errors import ArtifactError

if TYPE_CHECKING:
    from diffquant.artifacts.location import ArtifactLocation

_SETTINGS_FIX = "re-run the original command to resume it, choose another --out, or pass --overwrite"


@dataclass(frozen=True)
class RunSettings:
    """The settings that decide an artifact's content: its identity, `settings` in the manifest.

    Re-running with equal settings resumes the run; other settings into the same directory are
    refused. `live` describes a pipeline object calibrated through `diffquant.calibrate` (its
    scheduler, the target's state hash, the per-prompt arguments' hash); runs of a preset have none.
    """

    model: str
    source: str
    revision: str | None
    pipeline_class: str
    torch_dtype: str
    variant: str | None
    target: str
    prompts_sha256: str
    num_prompts: int
    steps: int
    seed: int
    pipeline_kwargs: dict[str, Any]
    device: str
    shard_size_bytes: int
    shard_format: dict[str, Any]
    num_processes: int
    live: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        document = {item.name: copy.deepcopy(getattr(self, item.name)) for item in dataclasses.fields(self)}
        if self.live is None:
            del document["live"]
        return document

    @classmethod
    def from_json(cls, document: dict[str, Any], where: str) -> "RunSettings":
        names = {item.name for item in dataclasses.fields(cls)}
        required = names - {"live"}
        unknown, missing = sorted(set(document) - names), sorted(required - set(document))
        if unknown or missing:
            raise ArtifactError(
                f"{where}: settings {'lack ' + ', '.join(missing) if missing else 'hold unknown ' + ', '.join(unknown)}, "
                "so they are not the settings of a run of this diffquant", _SETTINGS_FIX)
        return cls(**copy.deepcopy(document))

    def sha256(self) -> str:
        """`settings_sha256`: the sha256 of the canonical JSON of `to_json()`."""
        return json_sha256(self.to_json())

    def differing(self, other: "RunSettings | None") -> list[str]:
        """The names of the settings that differ from `other`'s (all of them when there is none)."""
        mine, theirs = self.to_json(), other.to_json() if other is not None else {}
        return sorted(key for key in mine.keys() | theirs.keys() if mine.get(key) != theirs.get(key))


@dataclass(frozen=True)
class ShardEntry:
    """One committed shard in `shards`: its file, the samples and prompts it holds, its size and hash.

    `first_prompt`, `num_prompts`, `tensor_bytes` and `raw_bytes` are what the writer records; a
    manifest made by other means may leave them out (None: not written).
    """

    file: str
    first_sample: int
    num_samples: int
    bytes: int
    sha256: str
    first_prompt: int | None = None
    num_prompts: int | None = None
    tensor_bytes: int | None = None
    raw_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> "ShardEntry":
        names = {item.name for item in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in document.items() if key in names})

    def at(self, first_sample: int) -> "ShardEntry":
        """The same shard listed from sample `first_sample` on (a rank's shard in the merged manifest)."""
        return dataclasses.replace(self, first_sample=first_sample)


@dataclass(frozen=True)
class RankRecord:
    """`rank` of a data-parallel rank's manifest: this rank's index, the world size, its prompt block."""

    index: int
    of: int
    prompts: tuple[int, int]

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "of": self.of, "prompts": list(self.prompts)}

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> "RankRecord":
        return cls(index=document["index"], of=document["of"], prompts=tuple(document["prompts"]))


_OPTIONAL_MAPPINGS = ("model", "pipeline", "placement", "prompts", "library_versions", "shard_format")
_KNOWN = {"format", "version", "status", "schema", "shards", "num_samples", "num_prompts_done", "raw_bytes", "stored_bytes",
          "settings", "settings_sha256", "rank", *_OPTIONAL_MAPPINGS}


@dataclass
class CalibrationManifest:
    """`manifest.json` (or a rank's `manifest.rankNNN.json`): the settings, what the run is of, and
    the shards committed so far with their counters. Optional parts are None when absent (not
    written). The writer extends its own copy (`add_shard`); everyone else holds snapshots."""

    status: str = "in_progress"
    schema: dict[str, Any] = field(default_factory=dict)
    shards: list[ShardEntry] = field(default_factory=list)
    num_samples: int = 0
    num_prompts_done: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0
    settings: RunSettings | None = None
    settings_sha256: str | None = None
    model: dict[str, Any] | None = None
    pipeline: dict[str, Any] | None = None
    placement: dict[str, Any] | None = None
    prompts: dict[str, Any] | None = None
    library_versions: dict[str, Any] | None = None
    shard_format: dict[str, Any] | None = None
    rank: RankRecord | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    @classmethod
    def new(cls, settings: RunSettings, **parts: Any) -> "CalibrationManifest":
        """The manifest of a run that has not committed a shard: `settings` and its hash, the
        shard format they name, and `parts` (model, pipeline, placement, prompts, library_versions)."""
        return cls(settings=settings, settings_sha256=settings.sha256(), shard_format=dict(settings.shard_format), **parts)

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def add_shard(self, shard: ShardEntry) -> None:
        """Commit `shard` after the ones listed: the counters grow by its samples, prompts and bytes."""
        self.shards.append(shard)
        self.num_samples += shard.num_samples
        self.num_prompts_done += shard.num_prompts or 0
        self.stored_bytes += shard.bytes
        self.raw_bytes += shard.raw_bytes or 0

    def snapshot(self) -> "CalibrationManifest":
        return copy.deepcopy(self)

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "format": self.format, "version": self.version, "status": self.status, "schema": copy.deepcopy(self.schema),
            "shards": [shard.to_json() for shard in self.shards], "num_samples": self.num_samples,
            "num_prompts_done": self.num_prompts_done, "raw_bytes": self.raw_bytes, "stored_bytes": self.stored_bytes,
        }
        if self.settings is not None:
            document["settings"] = self.settings.to_json()
        if self.settings_sha256 is not None:
            document["settings_sha256"] = self.settings_sha256
        for name in _OPTIONAL_MAPPINGS:
            if getattr(self, name) is not None:
                document[name] = copy.deepcopy(getattr(self, name))
        if self.rank is not None:
            document["rank"] = self.rank.to_json()
        document.update(copy.deepcopy(self.extra))
        return document

    @classmethod
    def from_json(cls, document: Any, where: str) -> "CalibrationManifest":
        """The manifest of a JSON document, with its format and version checked (the one place they
        are) and every field's type and range (`check_manifest_fields`); `where` names it in errors."""
        if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
            raise ArtifactError(f"{where} is not a diffquant calibration manifest", "pass a calibration artifact directory")
        if document.get("version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{where} has format version {document.get('version')}, this diffquant reads version {FORMAT_VERSION}",
                "recalibrate with this version or upgrade diffquant",
            )
        check_manifest_fields(document, where)
        document = copy.deepcopy(document)
        settings = document.get("settings")
        return cls(
            status=document["status"], schema=document["schema"], shards=[ShardEntry.from_json(shard) for shard in document["shards"]],
            num_samples=document["num_samples"], num_prompts_done=document["num_prompts_done"],
            raw_bytes=document.get("raw_bytes", 0), stored_bytes=document.get("stored_bytes", 0),
            settings=RunSettings.from_json(settings, where) if settings is not None else None,
            settings_sha256=document.get("settings_sha256"),
            **{name: document.get(name) for name in _OPTIONAL_MAPPINGS},
            rank=RankRecord.from_json(document["rank"]) if "rank" in document else None,
            extra={key: value for key, value in document.items() if key not in _KNOWN},
            format=document["format"], version=document["version"],
        )


def read_document(directory: ArtifactLocation, name: str = MANIFEST_NAME) -> Any:
    """The JSON document `name` in `directory`; a missing or unparsable one is a one-line error."""
    path = f"{directory}/{name}"
    if not directory.is_file(name):
        raise ArtifactError(f"{directory} has no {name}", "pass a calibration artifact written by `diffquant calibrate`")
    try:
        return json.loads(directory.read_bytes(name))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc})", "recalibrate into a new directory") from exc


def load_manifest(directory: ArtifactLocation, name: str = MANIFEST_NAME) -> CalibrationManifest:
    """The checked manifest `name` (`manifest.json`, or a rank's) of the artifact in `directory`."""
    return CalibrationManifest.from_json(read_document(directory, name), f"{directory}/{name}")


def library_versions() -> dict[str, str]:
    """`library_versions` of a new manifest: diffquant, python and the libraries that compute the samples."""
    import sys

    import diffusers
    import safetensors
    import torch
    import transformers

    from diffquant import __version__

    return {
        "diffquant": __version__, "python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "safetensors": safetensors.__version__,
    }
