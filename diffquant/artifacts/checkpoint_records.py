"""Typed records of a quantized checkpoint's manifest: `CheckpointManifest`, one `LayerRecord` per layer.

`quant_manifest.json` (format in README.md beside this file) is one `CheckpointManifest`: the
quantization config, the recipe, the model, the calibration it came from, every quantized layer
(`LayerRecord`) and every skipped one (`SkippedLayer`), the quality report, sizes, the stats
cache's report, the placement, phase times and the weights file's record. The writer
(`checkpoint.write_checkpoint`) takes one and readers (the loader, `generate`, `eval`, the
exporters, `verify`) get one, instead of indexing the JSON by string keys. `from_json` checks the
format name and version (here, and nowhere else) and each field's type, so a malformed manifest is
one line naming the field; `to_json` gives back the manifest's JSON object, key for key, so a
manifest read and written again is byte-identical.

Specs stay plain dicts here (the `TensorSpec` fields): `artifacts` does not import `quant`; the
rebuild path (`diffquant.quant.rebuild`) turns them into specs.

Example:
    >>> raw = {"name": "proj", "type": "Linear", "shape": [4, 8], "dtype": "float32",
    ...        "weight": {"dtype": "int8", "granularity": "per_channel"}, "weight_format": "int8",
    ...        "granularity": "per_channel", "observer": "min_max",
    ...        "tensors": {"weight": "proj.weight", "weight_scale": "proj.weight_scale"},
    ...        "input": None, "input_params": {}, "input_tensors": {}, "bias": "proj.bias",
    ...        "svd": None, "quality": {"weight_sqnr_db": 40.1, "output_sqnr_db": 38.2}}
    >>> record = LayerRecord.from_json(raw)
    >>> record.out_features, record.in_features, record.tensor_names()
    (4, 8, ['proj.weight', 'proj.weight_scale', 'proj.bias'])
    >>> record.to_json() == raw
    True
    >>> manifest = CheckpointManifest(diffquant_version="0.1.0", quantization_config={"recipe": "int8"}, recipe={},
    ...     model={"name": "tiny-sdxl", "torch_dtype": "float32", "target": "unet"}, calibration={"holdout_sample_ids": [3]},
    ...     layers=(record,), skipped=(SkippedLayer("conv_in", "excluded by *conv_in*"),), quality={}, sizes={})
    >>> CheckpointManifest.from_json(manifest.to_json()) == manifest
    True
    >>> CheckpointManifest.from_json({**manifest.to_json(), "version": 2})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    diffquant.errors.ArtifactError: quant_manifest.json is not a diffquant checkpoint manifest of version 1 — ...
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from diffquant.errors import ArtifactError

CHECKPOINT_FORMAT = "diffquant-checkpoint"
CHECKPOINT_VERSION = 1
# quantization_config.packing and .scale_conventions: how to read the stored tensors back.
NIBBLE_ORDER = "byte = code[2k] | code[2k+1] << 4 along the input dim (low nibble = even index)"
SCALE_CONVENTIONS = {
    "affine": "x = (q - zero_point) * scale",
    "fp8": "x = float(q) * scale",
    "mxfp4": "x = e2m1(code) * 2^(weight_scale - 127), scale mode floor (OCP MX v1.0)",
    "nvfp4": "x = e2m1(code) * float(weight_scale) * weight_scale_2 (weight_scale_2 = amax / (6 * 448))",
    "svdquant": "y = Q(x / smooth_factor) deq(R)^T + (x / smooth_factor) lora_down^T lora_up^T + bias",
}
LAYER_TYPES = ("Linear", "Conv2d")
SVD_TENSORS = ("smooth_factor", "lora_down", "lora_up")
# The keys every layer entry has; anything else (e.g. `input_range`) is a fact kept in `extra`.
_CORE_KEYS = (
    "name", "type", "shape", "dtype", "weight", "weight_format", "granularity", "observer", "tensors",
    "input", "input_params", "input_tensors", "bias", "svd", "quality", "conv",
)  # fmt: skip


@dataclass(frozen=True)
class SvdRecord:
    """The low-rank branch of an SVDQuant layer: rank, smoothing alpha (None: identity smoothing,
    s = 1), SVD method, tensor names."""

    rank: int
    alpha: float | None
    method: str
    tensors: dict[str, str]
    smoothing: str

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "method": self.method, "tensors": dict(self.tensors), "smoothing": self.smoothing}


@dataclass(frozen=True)
class LayerRecord:
    """One quantized layer as the manifest records it.

    shape: the real weight shape ([out, in] or [out, in/groups, kh, kw]); dtype: the original
    weight's torch dtype name (the compute dtype); weight / input: `TensorSpec` fields; tensors:
    stored suffix -> full state-dict key (`weight` or `weight_packed`, `weight_scale`, ...);
    input_tensors: frozen input parameters, suffix -> key; bias: key or None; conv: Conv2d geometry.
    """

    name: str
    type: str
    shape: tuple[int, ...]
    dtype: str
    weight: dict[str, Any]
    tensors: dict[str, str]
    input: dict[str, Any] | None = None
    input_tensors: dict[str, str] = field(default_factory=dict)
    input_params: dict[str, Any] = field(default_factory=dict)
    bias: str | None = None
    svd: SvdRecord | None = None
    quality: dict[str, Any] = field(default_factory=dict)
    conv: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        """K: the input size of the flattened weight [out, K] (in * kh * kw / groups for a Conv2d)."""
        k = 1
        for dim in self.shape[1:]:
            k *= dim
        return k

    def tensor_names(self) -> list[str]:
        """Every state-dict key this layer owns: stored weight tensors, input parameters, SVD branch, bias."""
        names = [*self.tensors.values(), *self.input_tensors.values()]
        if self.svd is not None:
            names += list(self.svd.tensors.values())
        if self.bias is not None:
            names.append(self.bias)
        return names

    @classmethod
    def from_json(cls, raw: Any, where: str = "quant_manifest.json") -> "LayerRecord":
        """Parse one `layers[]` entry; ArtifactError naming the layer and the field otherwise."""
        if not isinstance(raw, Mapping):
            raise ArtifactError(f"{where}: a layer entry is {type(raw).__name__}, not an object", "re-run `diffquant quantize`")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise ArtifactError(f"{where}: a layer entry has no name", "re-run `diffquant quantize`")
        here = f"{where} layer {name}"
        layer_type = _field(raw, "type", str, here)
        if layer_type not in LAYER_TYPES:
            raise ArtifactError(f"{here}: type {layer_type!r} is not one of {', '.join(LAYER_TYPES)}", "re-run `diffquant quantize`")
        shape = _field(raw, "shape", list, here)
        if len(shape) < 2 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise ArtifactError(f"{here}: shape {shape!r} is not a list of positive integers", "re-run `diffquant quantize`")
        svd_raw = raw.get("svd")
        svd = None
        if svd_raw is not None:
            svd_here = f"{here} svd"
            tensors = _names(_field(svd_raw, "tensors", dict, svd_here), svd_here)
            if sorted(tensors) != sorted(SVD_TENSORS):
                raise ArtifactError(f"{svd_here}: tensors {sorted(tensors)} are not {list(SVD_TENSORS)}", "re-run `diffquant quantize`")
            identity = "alpha" in svd_raw and svd_raw["alpha"] is None  # smoothing: identity records no alpha
            alpha = None if identity else float(_field(svd_raw, "alpha", (int, float), svd_here))
            svd = SvdRecord(rank=_field(svd_raw, "rank", int, svd_here), alpha=alpha,
                            method=_field(svd_raw, "method", str, svd_here), tensors=tensors,
                            smoothing=str(svd_raw.get("smoothing", "")))
        bias = raw.get("bias")
        if bias is not None and not isinstance(bias, str):
            raise ArtifactError(f"{here}: bias {bias!r} is not a tensor name", "re-run `diffquant quantize`")
        input_spec = raw.get("input")
        if input_spec is not None and not isinstance(input_spec, Mapping):
            raise ArtifactError(f"{here}: input {input_spec!r} is not a spec object", "re-run `diffquant quantize`")
        conv = raw.get("conv")
        if layer_type == "Conv2d" and not isinstance(conv, Mapping):
            raise ArtifactError(f"{here}: a Conv2d layer has no conv geometry", "re-run `diffquant quantize`")
        weight = _field(raw, "weight", dict, here)
        if not isinstance(weight.get("dtype"), str):
            raise ArtifactError(f"{here}: the weight spec has no dtype", "re-run `diffquant quantize`")
        return cls(
            name=name, type=layer_type, shape=tuple(shape), dtype=_field(raw, "dtype", str, here), weight=dict(weight),
            tensors=_names(_field(raw, "tensors", dict, here), here), input=dict(input_spec) if input_spec is not None else None,
            input_tensors=_names(raw.get("input_tensors") or {}, here), input_params=dict(raw.get("input_params") or {}),
            bias=bias, svd=svd, quality=dict(raw.get("quality") or {}), conv=dict(conv) if conv is not None else None,
            extra={key: value for key, value in raw.items() if key not in _CORE_KEYS},
        )

    def to_json(self) -> dict[str, Any]:
        """The manifest entry (the same keys and values `from_json` read)."""
        entry: dict[str, Any] = {
            "name": self.name, "type": self.type, "shape": list(self.shape), "dtype": self.dtype,
            "weight": dict(self.weight), "weight_format": self.weight["dtype"],
            "granularity": self.weight.get("granularity"), "observer": self.weight.get("observer", "min_max"),
            "tensors": dict(self.tensors), "input": dict(self.input) if self.input is not None else None,
            "input_params": dict(self.input_params), "input_tensors": dict(self.input_tensors), "bias": self.bias,
            "svd": self.svd.to_json() if self.svd is not None else None, "quality": dict(self.quality), **self.extra,
        }  # fmt: skip
        if self.conv is not None:
            entry["conv"] = dict(self.conv)
        return entry


def layer_records(manifest: Mapping[str, Any], where: str = "quant_manifest.json") -> list[LayerRecord]:
    """Every `layers[]` entry of a checkpoint manifest as a LayerRecord (names must be unique)."""
    raw = manifest.get("layers")
    if not isinstance(raw, list):
        raise ArtifactError(f"{where}: `layers` is {type(raw).__name__}, not a list", "re-run `diffquant quantize`")
    records = [LayerRecord.from_json(entry, where) for entry in raw]
    seen: set[str] = set()
    for record in records:
        if record.name in seen:
            raise ArtifactError(f"{where}: layer {record.name} is listed twice", "re-run `diffquant quantize`")
        seen.add(record.name)
    return records


@dataclass(frozen=True)
class SkippedLayer:
    """A Linear or Conv2d layer the recipe left in float, and why (the exclude pattern)."""

    name: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "reason": self.reason}


# The optional top-level blocks: absent from a manifest built in memory (`diffquant.quantize`
# without `out`) or carried by `save_quantized`; `files` is added by the writer.
_OPTIONAL_BLOCKS = ("stats_cache", "placement", "timing", "files")


@dataclass(frozen=True)
class CheckpointManifest:
    """`quant_manifest.json` as a record (the README beside this file documents each block).

    quantization_config: recipe name, global spec, SVDQuant settings, packing and scale
    conventions; recipe: the recipe as written; model: the model and target the checkpoint was
    made for (`name`, `torch_dtype`, `target`, class and config hash, ...); calibration: the
    artifact, its hashes, the sample selection and the held-out sample ids; quality: the quality
    report (`output_sqnr_db`, median / worst layer, `holdout_samples`; `report: "off"` when it was
    turned off); sizes: bytes of the checkpoint and the weights against fp16; stats_cache,
    placement, timing: what the run did; files: the weights file's bytes and sha256.
    """

    diffquant_version: str
    quantization_config: dict[str, Any]
    recipe: dict[str, Any]
    model: dict[str, Any]
    calibration: dict[str, Any]
    layers: tuple[LayerRecord, ...]
    skipped: tuple[SkippedLayer, ...]
    quality: dict[str, Any]
    sizes: dict[str, Any]
    stats_cache: dict[str, Any] | None = None
    placement: dict[str, Any] | None = None
    timing: dict[str, Any] | None = None
    files: dict[str, Any] | None = None

    @property
    def holdout_sample_ids(self) -> list[int]:
        """The ids of the calibration samples held out for the quality report (empty: report off)."""
        return list(self.calibration.get("holdout_sample_ids") or [])

    @property
    def quality_report(self) -> bool:
        """Whether the run measured the quality report (`--holdout 0` turns it off)."""
        return self.quality.get("report") != "off"

    def layer(self, name: str) -> LayerRecord:
        return next(record for record in self.layers if record.name == name)

    def replace(self, **changes: Any) -> "CheckpointManifest":
        """A copy with some blocks changed (records are frozen)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_json(cls, raw: Any, where: str = "quant_manifest.json") -> "CheckpointManifest":
        """Parse a manifest: format and version first (the one place they are checked), then each block."""
        check_checkpoint_format(raw, where)
        for key, kind in (("model", dict), ("quantization_config", dict), ("layers", list), ("skipped", list)):
            if not isinstance(raw.get(key), kind):
                raise ArtifactError(f"{where}: {key} is {_short(raw.get(key))}, allowed is a {'mapping' if kind is dict else 'list'}", _RERUN)
        for key in ("name", "torch_dtype", "target"):
            if not isinstance(raw["model"].get(key), str):
                raise ArtifactError(f"{where}: model.{key} is {_short(raw['model'].get(key))}, allowed is a string", _RERUN)
        skipped = []
        for entry in raw["skipped"]:
            if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("reason"), str):
                raise ArtifactError(f"{where}: skipped entry {_short(entry)} is not {{name, reason}}", _RERUN)
            skipped.append(SkippedLayer(entry["name"], entry["reason"]))
        blocks = {}
        for key in ("recipe", "calibration", "quality", "sizes", *_OPTIONAL_BLOCKS):
            value = raw.get(key)
            if value is not None and not isinstance(value, dict) or value is None and key not in _OPTIONAL_BLOCKS:
                raise ArtifactError(f"{where}: {key} is {_short(value)}, allowed is a mapping", _RERUN)
            blocks[key] = value
        version = raw.get("diffquant_version")
        if not isinstance(version, str):
            raise ArtifactError(f"{where}: diffquant_version is {_short(version)}, allowed is a string", _RERUN)
        unknown = sorted(set(raw) - {"format", "version", "diffquant_version", "model", "quantization_config", "layers", "skipped", *blocks})
        if unknown:
            raise ArtifactError(f"{where}: unknown field {unknown[0]!r} (a newer diffquant wrote it?)", "re-quantize with this diffquant version")
        return cls(diffquant_version=version, quantization_config=raw["quantization_config"], model=raw["model"],
                   layers=tuple(layer_records(raw, where)), skipped=tuple(skipped), **blocks)

    def to_json(self) -> dict[str, Any]:
        """The manifest's JSON object, key for key as `from_json` read it."""
        out: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "diffquant_version": self.diffquant_version,
            "quantization_config": self.quantization_config, "recipe": self.recipe, "model": self.model,
            "calibration": self.calibration, "layers": [layer.to_json() for layer in self.layers],
            "skipped": [entry.to_json() for entry in self.skipped], "quality": self.quality, "sizes": self.sizes,
        }  # fmt: skip
        out.update({key: getattr(self, key) for key in _OPTIONAL_BLOCKS if getattr(self, key) is not None})
        return out


def check_checkpoint_format(raw: Any, where: str) -> None:
    """Refuse anything but a checkpoint manifest of the one version this diffquant reads."""
    if not isinstance(raw, Mapping) or raw.get("format") != CHECKPOINT_FORMAT or raw.get("version") != CHECKPOINT_VERSION:
        raise ArtifactError(f"{where} is not a diffquant checkpoint manifest of version {CHECKPOINT_VERSION}", "re-quantize with this diffquant version")


_RERUN = "re-run `diffquant quantize` into a new --out"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _field(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = raw.get(key) if isinstance(raw, Mapping) else None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ArtifactError(f"{where}: field {key!r} is {value!r}, expected {expected}", "re-run `diffquant quantize`")
    return value


def _names(raw: Any, where: str) -> dict[str, str]:
    if not isinstance(raw, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise ArtifactError(f"{where}: tensor names {raw!r} are not a mapping of names", "re-run `diffquant quantize`")
    return dict(raw)
