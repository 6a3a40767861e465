"""Quantization recipes: `configs/quant/<name>.yaml`, validated on load.

A recipe has a global layer spec, optional overrides per layer type (`Linear`, `Conv2d`) and per
module name (fnmatch patterns, applied in file order after the type overrides), exclude patterns
(added to the model preset's defaults, or with `exclude_mode: replace` used instead of them, for
the quantization and the SVD excludes alike), an algorithm list, and the calibration sample selection.

Example recipe:

    name: int8_w8a8
    description: INT8 static per-tensor weights and inputs (min_max)
    global:
      weight: {dtype: int8, granularity: per_tensor, symmetric: true, observer: min_max}
      input: {dtype: int8, granularity: per_tensor, symmetric: true, observer: min_max}
    exclude: []
    algorithms: []
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from diffquant.quant.errors import ConfigError
from diffquant.quant.shared_groups import SHARE_MODES
from diffquant.quant.spec import LayerSpec, TensorSpec, merge_layer_spec

LAYER_TYPES = ("Linear", "Conv2d")
ALGORITHMS = ("svdquant",)
SMOOTHINGS = ("activation", "identity")
RECIPE_KEYS = ("name", "description", "global", "layer_types", "names", "exclude", "exclude_mode", "share_groups", "algorithms", "calibration")
EXCLUDE_MODES = ("add", "replace")
CALIBRATION_KEYS = ("limit", "every", "timestep_min", "timestep_max", "uniform_steps", "max_per_step", "holdout")
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes; a larger file is no recipe


@dataclass(frozen=True)
class SVDQuantConfig:
    """SVDQuant (Li et al., 2024, arXiv 2411.05007): smoothing + a 16-bit low-rank branch.

    rank: rank of the low-rank branch. smoothing: `activation` (the paper's s_j = max|X_j|^alpha /
    max|W_j|^(1-alpha), from calibration statistics) or `identity` (s = 1: the low-rank branch of
    the weight alone, which needs no calibration when the inputs are dynamic; the calibration-free
    SVDQuant baseline). alpha: smoothing strength (activation smoothing only). search_alpha:
    choose alpha per layer from `alpha_grid` by the layer's output error on cached calibration
    inputs. svd: `lowrank` (torch.svd_lowrank, randomized, `niter` power iterations, `oversample`
    extra sketch columns, seeded) or `full` (torch.linalg.svd). refine_iters: rounds re-fitting
    the branch to W' − deq(Q(R)) (`algorithms.svdquant.refine_low_rank`; 0 = the plain split).
    exclude: fnmatch patterns of layers that get no SVD branch (added to the model preset's
    svd_exclude).
    """

    rank: int = 32
    smoothing: str = "activation"
    alpha: float = 0.5
    search_alpha: bool = False
    alpha_grid: tuple[float, ...] = (0.25, 0.4, 0.5, 0.6, 0.75)
    svd: str = "lowrank"
    niter: int = 4
    oversample: int = 0
    refine_iters: int = 0
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"svdquant rank {self.rank} is not allowed", "use rank >= 1 (default 32)")
        if not 0.0 <= self.alpha <= 1.0 or not all(0.0 <= a <= 1.0 for a in self.alpha_grid):
            raise ConfigError(f"svdquant alpha {self.alpha} / alpha_grid {self.alpha_grid} outside [0, 1]", "use values in [0, 1]")
        if self.smoothing not in SMOOTHINGS:
            raise ConfigError(f"svdquant smoothing {self.smoothing!r} is not allowed", "use activation (calibrated) or identity (s = 1)")
        if self.smoothing == "identity" and self.search_alpha:
            raise ConfigError("svdquant search_alpha needs activation smoothing, but smoothing is identity",
                              "drop search_alpha or use smoothing: activation")
        if self.svd not in ("lowrank", "full"):
            raise ConfigError(f"svdquant svd {self.svd!r} is not allowed", "use lowrank or full")
        if self.niter < 0:
            raise ConfigError(f"svdquant niter {self.niter} is negative", "use niter >= 0")
        if self.oversample < 0 or self.refine_iters < 0:
            raise ConfigError(f"svdquant oversample {self.oversample} / refine_iters {self.refine_iters} is negative",
                              "use oversample >= 0 and refine_iters >= 0")


@dataclass(frozen=True)
class CalibrationSelection:
    """Which calibration samples a recipe uses (see `SampleSelection` for the rules), and how
    many are held out for the quality report."""

    limit: int | None = None
    every: int = 1
    timestep_min: float | None = None
    timestep_max: float | None = None
    uniform_steps: int | None = None
    max_per_step: int | None = None
    holdout: int = 4

    def __post_init__(self) -> None:
        if self.holdout < 1:
            raise ConfigError(f"calibration holdout {self.holdout} is not allowed", "hold out at least 1 sample")


@dataclass(frozen=True)
class Recipe:
    """A validated quantization recipe (see the module docstring for the file format)."""

    name: str
    global_spec: LayerSpec
    description: str = ""
    layer_types: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    names: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    svdquant: SVDQuantConfig | None = None
    calibration: CalibrationSelection = field(default_factory=CalibrationSelection)
    source: dict[str, Any] = field(default_factory=dict)
    exclude_mode: str = "add"
    share_groups: str = "none"

    def layer_spec(self, name: str, layer_type: str) -> LayerSpec:
        """The spec of one layer: global, then its type override, then matching name overrides."""
        spec = self.global_spec
        if layer_type in self.layer_types:
            spec = merge_layer_spec(spec, self.layer_types[layer_type], f"recipe {self.name}: layer_types.{layer_type}")
        for pattern, override in self.names.items():
            if fnmatch.fnmatchcase(name, pattern):
                spec = merge_layer_spec(spec, override, f"recipe {self.name}: names.{pattern}")
        return spec


def load_recipe_file(path: Path) -> Recipe:
    """The validated recipe in a YAML file (looking recipes up by name is `diffquant.recipes`)."""
    return recipe_from_dict(load_yaml_file(path, "recipe"), default_name=path.stem)


def load_yaml_file(path: Path, what: str, max_bytes: int = MAX_RECIPE_BYTES) -> Any:
    """`yaml.safe_load` of a small UTF-8 file, with a size limit and aliases refused: a 447-byte
    alias bomb would otherwise expand to gigabytes."""
    size = path.stat().st_size
    if size > max_bytes:
        raise ConfigError(f"{what} {path} is {size} bytes, more than the {max_bytes} allowed", f"pass a {what} file, not some other file")
    try:
        return yaml.load(path.read_bytes().decode("utf-8"), Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text ({exc})", "save it as UTF-8") from exc
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{what} {path} is not valid YAML ({first})", "fix the file") from exc


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors' aliases (`*name`): a recipe never needs them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"YAML alias *{event.anchor} at line {event.start_mark.line + 1} is not allowed", "write the value out in full")
        return super().compose_node(parent, index)


def recipe_from_dict(raw: Any, default_name: str = "recipe") -> Recipe:
    """Validate a recipe mapping; every unknown key or value is an error that lists what is allowed."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"recipe {default_name} is not a mapping", "write key: value pairs")
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"recipe {default_name}: name is {name!r}, allowed is a non-empty string", "write name: my_recipe")
    _check_keys(raw, RECIPE_KEYS, f"recipe {name}")
    _check_recipe_types(raw, name)
    if raw.get("global") is None:
        raise ConfigError(f"recipe {name} has no global spec", "add global: {weight: {dtype: int8}}")
    global_spec = LayerSpec.from_dict(raw["global"], f"recipe {name}: global")
    layer_types = dict(raw.get("layer_types") or {})
    _check_keys(layer_types, LAYER_TYPES, f"recipe {name}: layer_types")
    names = dict(raw.get("names") or {})
    recipe = Recipe(
        name=name,
        description=str(raw.get("description", "")),
        global_spec=global_spec,
        layer_types=layer_types,
        names=names,
        exclude=tuple(raw.get("exclude") or ()),
        exclude_mode=_exclude_mode(raw.get("exclude_mode", "add"), name),
        share_groups=_share_groups(raw.get("share_groups", "none"), name),
        svdquant=_algorithms(raw.get("algorithms") or [], name),
        calibration=_calibration(raw.get("calibration") or {}, name),
        source=dict(raw),
    )
    # Resolve every override once so that a bad override fails at load time, not mid-run.
    for layer_type in layer_types:
        recipe.layer_spec("", layer_type)
    for pattern in names:
        recipe.layer_spec(pattern, "Linear")
    if recipe.svdquant is not None:
        _check_svdquant_inputs(recipe)
    return recipe


def _algorithms(items: Any, name: str) -> SVDQuantConfig | None:
    if not isinstance(items, list):
        raise ConfigError(f"recipe {name}: algorithms must be a list", "write algorithms: [{name: svdquant, rank: 32}]")
    svd: SVDQuantConfig | None = None
    for item in items:
        if not isinstance(item, Mapping) or item.get("name") not in ALGORITHMS:
            raise ConfigError(f"recipe {name}: unknown algorithm {item!r}", f"allowed algorithms are {', '.join(ALGORITHMS)}")
        options = {k: v for k, v in item.items() if k != "name"}
        allowed = [f.name for f in dataclasses.fields(SVDQuantConfig)]
        _check_keys(options, allowed, f"recipe {name}: algorithm svdquant")
        for key in ("alpha_grid", "exclude"):
            if key in options:
                options[key] = tuple(options[key])
        svd = SVDQuantConfig(**options)
    return svd


def _exclude_mode(mode: Any, name: str) -> str:
    if mode not in EXCLUDE_MODES:
        raise ConfigError(f"recipe {name}: exclude_mode {mode!r} is not allowed",
                          "use add (the recipe's excludes join the model's) or replace (only the recipe's apply)")
    return mode


def _share_groups(mode: Any, name: str) -> str:
    if mode not in SHARE_MODES:
        raise ConfigError(f"recipe {name}: share_groups {mode!r} is not allowed",
                          "use none, qkv (q/k/v projections share scales and smoothing) or fused (qkv, plus a Flux single block's linear1)")
    return mode


def _calibration(raw: Any, name: str) -> CalibrationSelection:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"recipe {name}: calibration must be a mapping", f"allowed keys are {', '.join(CALIBRATION_KEYS)}")
    _check_keys(raw, CALIBRATION_KEYS, f"recipe {name}: calibration")
    if isinstance(raw.get("holdout"), int) and raw["holdout"] < 1:
        raise ConfigError(f"recipe {name}: calibration: holdout is {raw['holdout']}, allowed is an integer >= 1", "hold out at least 1 sample")
    return CalibrationSelection(**raw)


def _check_recipe_types(raw: Mapping[str, Any], name: str) -> None:
    """Check each field's type before the dataclasses see it: `symmetric: "false"` is a string,
    not a bool, and `exclude: "*attn*"` a string, not a list of patterns."""
    where = f"recipe {name}"
    if not isinstance(raw.get("description", ""), str):
        raise ConfigError(f"{where}: description is {_short(raw['description'])}, allowed is a string", "quote the description")
    for field_name in ("exclude",):
        value = raw.get(field_name)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise ConfigError(f"{where}: {field_name} is {_short(value)}, allowed is a list of patterns", f"write {field_name}: [\"*attn*\"]")
    for section in ("layer_types", "names"):
        value = raw.get(section)
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError(f"{where}: {section} is {_short(value)}, allowed is a mapping", f"write {section}: {{PATTERN: {{weight: {{...}}}}}}")
    specs: list[tuple[str, Any]] = [("global", raw.get("global"))]
    for section in ("layer_types", "names"):
        specs += [(f"{section}.{key}", value) for key, value in (raw.get(section) or {}).items()]
    for label, spec in specs:
        if isinstance(spec, Mapping):
            for part in ("weight", "input"):
                if isinstance(spec.get(part), Mapping):
                    _check_field_types(spec[part], TensorSpec, f"{where}: {label}.{part}")
    if isinstance(raw.get("calibration"), Mapping):
        _check_field_types(raw["calibration"], CalibrationSelection, f"{where}: calibration")
    for item in raw.get("algorithms") or []:
        if isinstance(item, Mapping):
            _check_field_types({k: v for k, v in item.items() if k != "name"}, SVDQuantConfig, f"{where}: algorithm svdquant")


_ANNOTATION_TYPES = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}


def _check_field_types(raw: Mapping[str, Any], cls: type, where: str) -> None:
    """Each value of `raw` must have the type its dataclass field is annotated with (`int | None`,
    `tuple[float, ...]`); numbers must be finite, and an int field takes no bool or float."""
    annotations = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for key, value in raw.items():
        annotation = annotations.get(key)
        if annotation is None:
            continue  # unknown keys are reported by the key check
        options = [part.strip() for part in annotation.split("|")]
        if value is None and "None" in options:
            continue
        if any(option.startswith("tuple[") for option in options):
            inner = options[0][len("tuple["):].split(",")[0].strip()
            if isinstance(value, list) and all(_has_type(item, inner) for item in value):
                continue
            raise ConfigError(f"{where}: {key} is {_short(value)}, allowed is a list of {inner}", f"write {key}: [...]")
        if not any(_has_type(value, option) for option in options):
            allowed = " or ".join("null" if o == "None" else {"bool": "true/false (unquoted)", "float": "a finite number"}.get(o, f"an {o}" if o == "int" else f"a {o}") for o in options)
            raise ConfigError(f"{where}: {key} is {_short(value)}, allowed is {allowed}", f"fix {key} in the recipe")


def _has_type(value: Any, annotation: str) -> bool:
    if annotation == "None":
        return value is None
    allowed = _ANNOTATION_TYPES.get(annotation)
    if allowed is None:
        return True
    if isinstance(value, bool) and annotation != "bool":
        return False
    if not isinstance(value, allowed):
        return False
    return not isinstance(value, float) or math.isfinite(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_svdquant_inputs(recipe: Recipe) -> None:
    """SVDQuant quantizes the smoothed input x / s. A static scale of it is known exactly from the
    per-channel abs-max the smoothing already needs (max_j absmax_j / s_j), so static inputs are
    allowed with the symmetric min_max observer; any other observer would need the distribution
    of x / s, which calibration does not keep."""
    spec = recipe.global_spec.input
    per_tensor = spec is not None and (spec.granularity == "per_tensor" or spec.dtype == "nvfp4")
    if spec is not None and not spec.dynamic and (spec.observer != "min_max" or not spec.symmetric or not per_tensor):
        raise ConfigError(
            f"recipe {recipe.name}: svdquant smooths inputs, so a static input scale must be the symmetric min_max range of x / s, per tensor",
            "set global.input.dynamic: true, or use a symmetric per_tensor (or nvfp4) static input with observer min_max",
        )


def _check_keys(raw: Mapping[str, Any], allowed: Any, where: str) -> None:
    unknown = sorted(str(k) for k in set(raw) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}", f"allowed keys are {', '.join(allowed)}")
