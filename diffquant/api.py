"""The Python front end: calibrate the pipeline you hold, quantize the module you hold.

`calibrate(pipe, pipe.unet, prompts, out)` runs `pipe(...)` itself over the prompts, any pipeline
whose call drives the target (text-to-image, img2img and inpaint with `image=` / `mask_image=`,
ControlNet with `control_image=` / `image=`, text-to-video, a subclass of your own), and streams every call of the target
into a calibration artifact. Arguments that differ per prompt (an init image, a mask, a control
image) go in `prompt_kwargs`, a list of one dict per prompt or a function of the prompt index;
the other keywords are passed to every call. The artifact records the live pipe (its class,
scheduler, the target's config hash and a sha256 of all its weights), and calling again with the
same arguments resumes an interrupted run or returns the finished one at once; other arguments
into the same `out` are refused unless `overwrite=True`.

`quantize(module, artifact, recipe)` quantizes that module in place from the artifact, after
checking that it is the module calibrated (class, config, weights), and returns it; `out=` also
writes the checkpoint, and `diffquant.save(module, dir)` writes one later. The recipe is a shipped
name, a YAML path, a mapping in the YAML's shape, or a `Recipe` object, validated by the same
rules. Selection keywords (`limit`, `every`, `timestep_min`, `timestep_max`, `uniform_steps`,
`max_per_step`, `holdout`; `holdout=0` turns the quality report off) override the recipe's
`calibration` block, as on the command line, and activation statistics are cached beside the
artifact as there.

Example (a tiny random-weight SDXL, a different scheduler, one weight scaled in place):
    >>> import tempfile, torch
    >>> from diffusers import DiffusionPipeline, EulerAncestralDiscreteScheduler
    >>> from diffquant.models.tiny import tiny_pipeline_dir
    >>> pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir("sdxl"))
    >>> pipe.set_progress_bar_config(disable=True)
    >>> pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    >>> with torch.no_grad():
    ...     _ = pipe.unet.conv_in.weight.mul_(1.5)
    >>> work = tempfile.TemporaryDirectory()
    >>> artifact = calibrate(pipe, pipe.unet, ["a cat", "a dog", "a red cube"], f"{work.name}/calib",
    ...                      num_inference_steps=3, height=64, width=64, show_progress=False)
    >>> artifact.manifest["num_samples"], artifact.manifest["model"]["family"]
    (9, 'sdxl')
    >>> unet = quantize(pipe.unet, artifact, "int8_w8a8", holdout=2)
    >>> type(unet.down_blocks[1].attentions[0].proj_in).__name__
    'QuantizedLinear'
    >>> pipe("a cat", num_inference_steps=3, height=64, width=64).images[0].size
    (64, 64)
    >>> work.cleanup()
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from diffquant.artifacts.calibration_reader import CalibrationArtifact
from diffquant.artifacts.sample_split import SELECTION_FIELDS
from diffquant.errors import ConfigError
from diffquant.models.live import target_name
from diffquant.models.quantized import MANIFEST_ATTRIBUTE, guard_save_pretrained
from diffquant.prompts import PromptSet, load_prompts
from diffquant.quant.recipe import Recipe, recipe_from_dict
from diffquant.recipes import load_recipe
from diffquant.quant.spec import LayerSpec
from diffquant.stages.calibrate import DEFAULT_SHARD_SIZE_MB, CalibrationResult, calibrate_pipe
from diffquant.stages.quantize import QuantizeSettings, quantize_module

SELECTION_KEYS = (*SELECTION_FIELDS, "holdout")
PromptKwargs = Sequence[Mapping[str, Any]] | Callable[[int], Mapping[str, Any]]


def calibrate(
    pipe: Any,
    target: torch.nn.Module | str,
    prompts: Sequence[str] | str | PromptSet,
    out: str | os.PathLike[str] | None = None,
    *,
    num_inference_steps: int = 20,
    seed: int = 0,
    prompt_kwargs: PromptKwargs | None = None,
    overwrite: bool = False,
    shard_size_mb: float = DEFAULT_SHARD_SIZE_MB,
    show_progress: bool = True,
    **pipe_kwargs: Any,
) -> CalibrationResult:
    """Capture `target`'s inputs while `pipe` runs over `prompts` (see the module docstring).

    target: the submodule (`pipe.unet`, `pipe.transformer`) or its component name. prompts: a list
    of strings, a text file, a caption TSV or `"builtin"`. out: the artifact directory or store URL
    (default `artifacts/calib/<model>-<hash of the arguments>`). Prompt i runs with the generator
    seeded from (seed, i), so a resumed run reproduces it. A `prompt_kwargs` function is called
    once per prompt before the run (its arguments are hashed into the run's identity) and once
    during it. Returns the CalibrationResult (`.out`,
    `.manifest`), which `quantize` takes as its artifact.
    """
    name, _ = target_name(pipe, target)
    prompt_set = prompts if isinstance(prompts, PromptSet) else load_prompts(prompts)
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ConfigError(f"num_inference_steps={num_inference_steps!r} is not allowed", "pass a whole number >= 1, e.g. 20")
    per_prompt = _per_prompt(prompt_kwargs, len(prompt_set))
    return calibrate_pipe(pipe, name, prompt_set, out, steps=num_inference_steps, seed=seed, pipeline_kwargs=pipe_kwargs,
                          prompt_kwargs=per_prompt, overwrite=overwrite, shard_size_mb=shard_size_mb, show_progress=show_progress)


def quantize(
    module: torch.nn.Module,
    artifact: CalibrationResult | str | os.PathLike[str],
    recipe: str | os.PathLike[str] | Mapping[str, Any] | Recipe,
    *,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    use_stats_cache: bool = True,
    num_workers: int = 0,
    show_progress: bool = False,
    **selection: Any,
) -> torch.nn.Module:
    """Quantize `module` in place from `artifact` with `recipe`; returns `module`.

    The module must be the one calibrated: class, config hash and (for artifacts of a live pipe)
    the sha256 of its weights are checked first. The module computes on the device it is on.
    With `out`, the checkpoint is written there too. Either way `diffquant.save(module, dir)`
    writes it later, and `module._diffquant_manifest` holds its manifest: every layer's format and
    quality figures, sizes, and the stats cache's report.
    """
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"quantize() got a {type(module).__name__} to quantize", "pass the submodule, e.g. pipe.unet or pipe.transformer")
    unknown = sorted(set(selection) - set(SELECTION_KEYS))
    if unknown:
        raise ConfigError(f"quantize() takes no argument {', '.join(unknown)}", f"selection keywords are {', '.join(SELECTION_KEYS)}")
    resolved = resolve_recipe(recipe)
    location = artifact.out if isinstance(artifact, CalibrationResult) else artifact
    settings = QuantizeSettings(calib=location, recipe=resolved.name, out=None if out is None else Path(out), device=str(_device_of(module)),
                                overwrite=overwrite, num_workers=num_workers, use_stats_cache=use_stats_cache, **selection)
    result = quantize_module(module, CalibrationArtifact(location), resolved, settings, show_progress)
    setattr(module, MANIFEST_ATTRIBUTE, result.manifest)
    guard_save_pretrained(module)
    return module


def resolve_recipe(recipe: str | os.PathLike[str] | Mapping[str, Any] | Recipe) -> Recipe:
    """A validated Recipe from a shipped name, a YAML path, a mapping or a Recipe object.

    A Recipe object is written back into its YAML shape and validated as a file would be, so an
    object and a file fail with the same one-line errors.

    Example:
        >>> from diffquant.quant.spec import TensorSpec
        >>> typed = Recipe(name="w8", global_spec=LayerSpec(weight=TensorSpec("int8", "per_channel")), exclude=("*proj_out*",), exclude_mode="replace")
        >>> resolve_recipe(typed).layer_spec("mid_block.attn", "Linear").weight.describe()
        'int8 channel sym static/min_max'
        >>> resolve_recipe({"name": "w8", "global": {"weight": {"dtype": "int8"}}, "exclude_mode": "drop"})
        Traceback (most recent call last):
        ...
        diffquant.quant.errors.ConfigError: recipe w8: exclude_mode 'drop' is not allowed — use add (the recipe's excludes join the model's) or replace (only the recipe's apply)
    """
    if isinstance(recipe, Recipe):
        return recipe_from_dict(recipe_as_dict(recipe), default_name=str(recipe.name))
    if isinstance(recipe, Mapping):
        return recipe_from_dict(dict(recipe))
    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(os.fspath(recipe))
    raise ConfigError(f"recipe of type {type(recipe).__name__} is not allowed", "pass a recipe name, a YAML path, a mapping or a diffquant.Recipe")


def recipe_as_dict(recipe: Recipe) -> dict[str, Any]:
    """The YAML-shaped mapping of a Recipe object (what `recipe_from_dict` reads)."""
    spec = recipe.global_spec
    return {
        "name": recipe.name,
        "description": recipe.description,
        "global": spec.to_dict() if isinstance(spec, LayerSpec) else spec,
        "layer_types": dict(recipe.layer_types),
        "names": dict(recipe.names),
        "exclude": list(recipe.exclude),
        "exclude_mode": recipe.exclude_mode,
        **({"share_groups": recipe.share_groups} if recipe.share_groups != "none" else {}),
        "algorithms": [] if recipe.svdquant is None else [{"name": "svdquant", **_yaml_values(dataclasses.asdict(recipe.svdquant))}],
        "calibration": _yaml_values(dataclasses.asdict(recipe.calibration)),
    }


def _yaml_values(fields: dict[str, Any]) -> dict[str, Any]:
    """Dataclass fields as YAML would hold them: tuples (frozen records' sequences) as lists."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in fields.items()}


def _per_prompt(prompt_kwargs: PromptKwargs | None, count: int) -> Callable[[int], dict[str, Any]] | None:
    """prompt_kwargs as a function of the prompt index, checked: one mapping per prompt."""
    if prompt_kwargs is None:
        return None
    if callable(prompt_kwargs):
        function = prompt_kwargs
    elif isinstance(prompt_kwargs, Sequence) and not isinstance(prompt_kwargs, (str, bytes)):
        if len(prompt_kwargs) != count:
            raise ConfigError(f"prompt_kwargs has {len(prompt_kwargs)} entries for {count} prompts",
                              "give one dict per prompt, or a function of the prompt index")
        items = list(prompt_kwargs)
        function = items.__getitem__
    else:
        raise ConfigError(f"prompt_kwargs of type {type(prompt_kwargs).__name__} is not allowed",
                          "pass a list of one dict per prompt, or a function of the prompt index returning a dict")

    def checked(index: int) -> dict[str, Any]:
        value = function(index)
        if not isinstance(value, Mapping):
            raise ConfigError(f"prompt_kwargs for prompt {index} is a {type(value).__name__}, not a dict",
                              "return a dict of pipe(...) keywords, e.g. {'image': init_image}")
        return dict(value)

    return checked


def _device_of(module: torch.nn.Module) -> torch.device:
    hook = getattr(module, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return next((p.device for p in module.parameters() if not p.is_meta), torch.device("cpu"))
