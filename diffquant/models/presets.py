"""Model presets: everything needed to load a pipeline and know which submodule to quantize.

A preset is one YAML file in `configs/models/`. `resolve_model` also accepts a local pipeline
directory or a hub id that is not a preset (then `--target` names the submodule).

Example:
    >>> preset = resolve_model("tiny-sdxl")
    >>> preset.target
    'unet'
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from diffquant.errors import ConfigError
from diffquant.paths import CONFIG_DIR
from diffquant.quant.recipe import load_yaml_file

TORCH_DTYPES = ("float32", "float16", "bfloat16")
TINY_SCHEME = "tiny://"
FAMILY_OF_CLASS = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux", "PixArtTransformer2DModel": "pixart"}


@dataclass(frozen=True)
class ModelPreset:
    """How to load one diffusion pipeline and which submodule diffquant quantizes.

    `source` is a hub id, a local directory, or `tiny://<family>` for the embedded tiny models.
    `quant_exclude` and `svd_exclude` are fnmatch patterns on module names of the target.
    """

    name: str
    family: str
    source: str
    pipeline_class: str
    torch_dtype: str
    target: str
    steps: int
    revision: str | None = None
    variant: str | None = None
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)
    quant_exclude: tuple[str, ...] = ()
    svd_exclude: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        if self.torch_dtype not in TORCH_DTYPES:
            raise ConfigError(
                f"model preset {self.name!r}: torch_dtype {self.torch_dtype!r} is not allowed",
                f"use one of {', '.join(TORCH_DTYPES)}",
            )
        if self.steps < 1:
            raise ConfigError(f"model preset {self.name!r}: steps must be >= 1", "fix the preset")

    @property
    def is_tiny(self) -> bool:
        return self.source.startswith(TINY_SCHEME)

    def with_overrides(self, **changes: Any) -> "ModelPreset":
        """A copy with some fields replaced (None values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def available_presets() -> list[str]:
    """Names of the presets shipped in configs/models, sorted."""
    return sorted(p.stem for p in (CONFIG_DIR / "models").glob("*.yaml"))


def load_preset(path: Path) -> ModelPreset:
    """Read and validate one preset file; unknown keys are an error that lists the allowed ones."""
    raw = load_yaml_file(path, "model preset")  # size-limited, YAML aliases refused, one-line errors
    if not isinstance(raw, dict):
        raise ConfigError(f"model preset {path} is not a mapping", "write key: value pairs")
    allowed = {f.name for f in dataclasses.fields(ModelPreset)}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(
            f"model preset {path}: unknown key(s) {', '.join(unknown)}",
            f"allowed keys are {', '.join(sorted(allowed))}",
        )
    raw.setdefault("name", path.stem)
    for key in ("quant_exclude", "svd_exclude"):
        raw[key] = tuple(raw.get(key) or ())
    raw["pipeline_kwargs"] = dict(raw.get("pipeline_kwargs") or {})
    try:
        return ModelPreset(**raw)
    except TypeError as exc:
        raise ConfigError(f"model preset {path}: {exc}", "add the missing keys") from exc


def resolve_model(model: str, target: str | None = None) -> ModelPreset:
    """A preset by name, or an ad-hoc preset for a local pipeline directory or a hub id.

    For a directory or hub id the pipeline class is read from `model_index.json` at load time
    (`DiffusionPipeline`), and `target` must name the submodule unless the directory has a
    `unet` or `transformer`.
    """
    preset_path = CONFIG_DIR / "models" / f"{model}.yaml"
    if preset_path.is_file():
        preset = load_preset(preset_path)
        return preset.with_overrides(target=target)
    local = Path(model)
    looks_like_hub_id = model.count("/") == 1 and not local.exists() and not model.startswith(".")
    if local.is_dir() or looks_like_hub_id:
        if target is None and local.is_dir():
            target = next((t for t in ("unet", "transformer") if (local / t).is_dir()), None)
        if target is None:
            raise ConfigError(
                f"model {model!r} is not a preset and its target submodule is unknown",
                "pass --target unet or --target transformer",
            )
        family = _directory_family(local, target) if local.is_dir() else None
        if family is not None:
            # A directory of a known family (a fine-tune, a local copy) gets that family's
            # settings: exclude patterns, dtype, steps and pipeline kwargs.
            base = load_preset(CONFIG_DIR / "models" / f"{family}.yaml")
            return dataclasses.replace(base, name=local.name, source=str(local.resolve()), pipeline_class="DiffusionPipeline", target=target,
                                       revision=None, variant=None, description=f"{local.name}: detected as {family} from {target}/config.json")
        return ModelPreset(
            name=local.name if local.is_dir() else model.replace("/", "--"),
            family="custom",
            source=str(local.resolve()) if local.is_dir() else model,
            pipeline_class="DiffusionPipeline",
            torch_dtype="float32" if local.is_dir() else "float16",
            target=target,
            steps=20,
        )
    raise ConfigError(
        f"unknown model {model!r}",
        f"use a preset ({', '.join(available_presets())}), a local pipeline directory, or a hub id",
    )


def family_of(class_name: str, config: dict[str, Any]) -> str | None:
    """The preset family of a target model from its class name and config, or None.

    SD3, Flux and PixArt have their own transformer classes; UNets are told apart by config: SDXL's
    adds `text_time` embeddings, SD 2.x projects attention with Linear layers (`use_linear_projection`)
    and cross-attends 1024-wide OpenCLIP text where SD 1.x uses 1x1 convolutions and 768-wide CLIP.

    Example:
        >>> family_of("UNet2DConditionModel", {"use_linear_projection": True}), family_of("FluxTransformer2DModel", {})
        ('sd21', 'flux')
    """
    if class_name in FAMILY_OF_CLASS:
        return FAMILY_OF_CLASS[class_name]
    if class_name != "UNet2DConditionModel":
        return None
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd21" if config.get("use_linear_projection") or config.get("cross_attention_dim") == 1024 else "sd15"


def _directory_family(directory: Path, target: str) -> str | None:
    import json

    try:
        config = json.loads((directory / target / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return family_of(str(config.get("_class_name", "")), config) if isinstance(config, dict) else None


def preset_of_artifact(model_info: dict[str, Any], pipeline: dict[str, Any] | None = None) -> ModelPreset:
    """The model an artifact (or checkpoint) records, as a preset.

    When a shipped preset of that name has the same source, it is used (its steps and pipeline
    kwargs serve generation), with the dtype and exclude patterns the artifact recorded; otherwise
    an equivalent preset is built from the record alone, generating with the steps and kwargs of
    `pipeline` (a calibration manifest's `pipeline` record) when given.
    """
    pipeline = pipeline or {}
    recorded = {key: tuple(model_info[key]) for key in ("quant_exclude", "svd_exclude") if key in model_info}
    try:
        named = resolve_model(model_info["name"], model_info["target"])
    except ConfigError:
        named = None
    if named is not None and named.source == model_info["source"]:
        return dataclasses.replace(named, torch_dtype=model_info["torch_dtype"], **recorded)
    return ModelPreset(
        name=model_info["name"], family=model_info.get("family", "custom"), source=model_info["source"],
        pipeline_class=model_info["pipeline_class"], torch_dtype=model_info["torch_dtype"], target=model_info["target"],
        steps=pipeline.get("steps", 20), pipeline_kwargs=dict(pipeline.get("kwargs", {})),
        revision=model_info.get("revision"), variant=model_info.get("variant"), **recorded,
    )
