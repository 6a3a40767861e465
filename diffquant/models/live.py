"""Describe a pipeline the user already holds: its target, family, scheduler and weights.

A live pipe may differ from anything a preset can name (another scheduler, a fine-tune, a fused
LoRA, an img2img or ControlNet class, a subclass), so a calibration artifact captured from one
records what can be read off the object itself:

- `target_name(pipe, target)`: the pipeline component that `target` (a module or a name) is;
- `detect_family(module)`: the preset family of a target, from its class and config
  (`diffquant.models.presets.family_of`), whose exclude patterns apply to it;
- `scheduler_record(pipe)`: the scheduler's class and public config;
- `state_sha256(module)`: sha256 over every tensor of the state dict, streamed one at a time in
  name order (name, dtype, shape, then the raw bytes), so an in-place edit of a single element
  changes it;
- `value_sha256(value)`: sha256 of pipeline arguments that are not JSON (PIL images, tensors,
  arrays), so a resumed run is refused when its per-prompt images differ;
- `describe_live_pipe(...)`: all of the above for one run, as the preset-shaped description and
  the `live` settings a calibration artifact records; `run_settings` and `new_manifest` make the
  artifact's records from a preset (the command line's) or such a description alike;
- `check_call_kwargs` / `check_set_kwargs`: one-line refusals of keywords `pipe(...)` cannot take.

Example:
    >>> layer = torch.nn.Linear(2, 2)
    >>> before = state_sha256(layer)
    >>> with torch.no_grad():
    ...     layer.weight[0, 0] += 1.0
    >>> state_sha256(layer) == before
    False
    >>> value_sha256({"strength": 0.5}) == value_sha256({"strength": 0.5})
    True
    >>> sequence_sha256(({"strength": s} for s in (0.5, 0.7)), 2) == value_sha256([{"strength": 0.5}, {"strength": 0.7}])
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from accelerate.utils import align_module_device, has_offloaded_params

from diffquant.artifacts.calibration_format import json_sha256
from diffquant.artifacts.calibration_records import CalibrationManifest, RunSettings, library_versions
from diffquant.artifacts.fingerprint import module_fingerprint, weights_fingerprint
from diffquant.errors import ArtifactError, ConfigError
from diffquant.models.presets import ModelPreset, family_of, resolve_model
from diffquant.prompts import PromptSet

STATE_HASH_VERSION = "diffquant-state-v1"


@dataclass(frozen=True)
class LivePipe:
    """What a calibration artifact records of a live pipe: a preset-shaped description (class,
    family and its excludes, dtype, target), where the target runs, and the `live` settings."""

    preset: ModelPreset
    device: str
    scheduler: dict[str, Any]
    live: dict[str, Any]


def describe_live_pipe(pipe: Any, target: str, steps: int, pipeline_kwargs: dict[str, Any],
                       prompt_kwargs: Callable[[int], dict[str, Any]] | None, num_prompts: int) -> LivePipe:
    """Describe `pipe` for a calibration of `pipe.<target>` (see the module docstring); a
    `prompt_kwargs` function is called once per prompt here, to hash what it returns."""
    module = getattr(pipe, target)
    check_offload_hooks(pipe, module)
    family = detect_family(module)
    base = resolve_model(family) if family else None
    source = str(getattr(pipe, "name_or_path", None) or getattr(pipe.config, "_name_or_path", "") or type(pipe).__name__)
    preset = ModelPreset(
        name=Path(source).name or type(pipe).__name__, family=family or "custom", source=source, pipeline_class=type(pipe).__name__,
        torch_dtype=str(module.dtype).removeprefix("torch."), target=target, steps=steps, pipeline_kwargs=jsonable_kwargs(pipeline_kwargs),
        quant_exclude=base.quant_exclude if base else (), svd_exclude=base.svd_exclude if base else (),
    )
    scheduler = scheduler_record(pipe)
    live = {
        "scheduler_class": scheduler.get("class"),
        "scheduler_config_sha256": json_sha256(scheduler.get("config")),
        **{f"target_{key}": value for key, value in module_fingerprint(module).items()},
        "target_state_sha256": state_sha256(module),
        "prompt_kwargs_sha256": sequence_sha256(map(prompt_kwargs, range(num_prompts)), num_prompts) if prompt_kwargs else None,
    }
    return LivePipe(preset, execution_device(pipe), scheduler, live)


def check_offload_hooks(pipe: Any, module: torch.nn.Module) -> None:
    """Refuse, in one line, accelerate offload hooks that execute on an indexed CPU device (`cpu:0`,
    what `enable_sequential_cpu_offload(device="cpu")` sets): accelerate cannot move an offloaded
    weight back to the meta device from there (a TypeError in `set_module_tensor_to_device`), so
    neither `pipe(...)` nor a fingerprint of the weights can run."""
    for child in module.modules():
        hook = getattr(child, "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        if getattr(hook, "offload", False) and device is not None and torch.device(device).type == "cpu" and torch.device(device).index is not None:
            raise ConfigError(
                f"{type(pipe).__name__}'s {type(module).__name__} is offloaded by accelerate hooks that execute on {device}, "
                "where accelerate cannot offload its weights again",
                "on a machine without a GPU use pipe.enable_model_cpu_offload(device='cpu'), or "
                "accelerate.cpu_offload(module, execution_device=torch.device('cpu'))",
            )


def execution_device(pipe: Any) -> str:
    """Where `pipe` computes: under accelerate's offload hooks the device weights are moved to."""
    return str(getattr(pipe, "_execution_device", None) or pipe.device)


def run_settings(preset: ModelPreset, prompt_set: PromptSet, pipeline_kwargs: dict[str, Any], *, seed: int, device: str,
                 shard_size_bytes: int, shard_format: dict[str, str], num_processes: int = 1,
                 live: dict[str, Any] | None = None) -> RunSettings:
    """The settings record of a calibration run of `preset` (a shipped one, or a live pipe's description)."""
    return RunSettings(
        model=preset.name, source=preset.source, revision=preset.revision, pipeline_class=preset.pipeline_class,
        torch_dtype=preset.torch_dtype, variant=preset.variant, target=preset.target, prompts_sha256=prompt_set.sha256,
        num_prompts=len(prompt_set.prompts), steps=preset.steps, seed=seed, pipeline_kwargs=pipeline_kwargs, device=device,
        shard_size_bytes=shard_size_bytes, shard_format=shard_format, num_processes=num_processes, live=live,
    )


def new_manifest(settings: RunSettings, preset: ModelPreset, prompt_set: PromptSet, target: torch.nn.Module,
                 placement: dict[str, str | None] | None = None, scheduler: dict[str, Any] | None = None) -> CalibrationManifest:
    """The manifest of a fresh run: its settings, the model (with the target's fingerprints), the
    pipeline call, the placement, the prompts and the library versions. A live pipe's run (settings
    with `live`) also records the target's state hash, the `scheduler` and the per-prompt arguments' hash."""
    model = {
        "name": preset.name, "family": preset.family, "source": preset.source, "revision": preset.revision,
        "pipeline_class": preset.pipeline_class, "torch_dtype": preset.torch_dtype, "variant": preset.variant, "target": preset.target,
        "quant_exclude": list(preset.quant_exclude), "svd_exclude": list(preset.svd_exclude),
        **{f"target_{key}": value for key, value in module_fingerprint(target).items()},
        "target_weights_sha256": weights_fingerprint(target),
    }
    pipeline = {"steps": settings.steps, "seed": settings.seed, "kwargs": settings.pipeline_kwargs, "output_type": "latent"}
    if settings.live is not None:
        model["target_state_sha256"] = settings.live["target_state_sha256"]
        pipeline.update(scheduler=scheduler or {}, prompt_kwargs_sha256=settings.live["prompt_kwargs_sha256"])
    placement = placement or {}
    return CalibrationManifest.new(
        settings, model=model, pipeline=pipeline,
        # Placement changes where weights live, not what is computed, so it is no part of the settings.
        placement={"device_map": placement.get("device_map"), "offload": placement.get("offload")},
        prompts={"source": prompt_set.source, "count": len(prompt_set.prompts), "sha256": prompt_set.sha256, "list": list(prompt_set.prompts)},
        library_versions=library_versions(),
    )
def target_name(pipe: Any, target: torch.nn.Module | str) -> tuple[str, torch.nn.Module]:
    """(component name, module) of `target` in `pipe`: `pipe.unet` or `"unet"` alike."""
    components = {name: value for name, value in getattr(pipe, "components", {}).items() if isinstance(value, torch.nn.Module)}
    if isinstance(target, str):
        module = components.get(target, getattr(pipe, target, None))
        if isinstance(module, torch.nn.Module):
            return target, module
    elif isinstance(target, torch.nn.Module):
        name = next((name for name, value in components.items() if value is target), None)
        if name is not None:
            return name, target
    raise ConfigError(
        f"{type(pipe).__name__} has no component {target if isinstance(target, str) else type(target).__name__!r} to calibrate",
        f"pass one of its modules, e.g. pipe.{next(iter(components), 'unet')} ({', '.join(sorted(components)) or 'none'})",
    )


def check_call_kwargs(pipe: Any, kwargs: dict[str, Any], reserved: frozenset[str], how: str) -> None:
    """Refuse, in one line, keywords `pipe(...)` does not name or that diffquant sets itself (`reserved`).

    Named parameters only: pipelines that also take **kwargs drop unknown names silently. A
    subclass whose __call__ takes **kwargs passes them on to its base class's, whose names count.
    `how` says how the caller passes them (e.g. `--set KEY=VALUE`)."""
    taken = sorted(set(kwargs) & reserved)
    if taken:
        raise ConfigError(f"{how} {', '.join(taken)} is decided by diffquant itself", "drop it: steps and seed have their own options")
    parameters: list[str] = []
    for cls in type(pipe).__mro__:
        call = cls.__dict__.get("__call__")
        if call is None:
            continue
        signature = inspect.signature(call).parameters
        parameters += [name for name, p in signature.items() if p.kind is not inspect.Parameter.VAR_KEYWORD and name not in parameters and name != "self"]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values()) or cls.__module__.startswith("diffusers."):
            break
    unknown = sorted(set(kwargs) - set(parameters))
    common = [name for name in ("image", "mask_image", "control_image", "strength", "height", "width", "guidance_scale") if name in parameters]
    if unknown:
        raise ConfigError(f"{type(pipe).__name__}(...) takes no argument {', '.join(unknown)}",
                          f"pass keywords of {type(pipe).__name__}.__call__ with {how}, e.g. {', '.join(common or parameters[:6])}")


def check_set_kwargs(pipe: Any, kwargs: dict[str, Any]) -> None:
    """Refuse `--set` keywords that `pipe(...)` does not name, values whose type its annotation
    does not allow (`height=abc`, `guidance_scale=` for a float), and sizes the VAE cannot take."""
    # Named parameters only: pipelines that also take **kwargs drop unknown names silently.
    parameters = {name: p for name, p in inspect.signature(pipe.__call__).parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        raise ConfigError(
            f"{type(pipe).__name__} does not accept {', '.join(unknown)}",
            f"--set takes keywords of pipe(...), e.g. {', '.join(sorted(p for p in parameters if p in ('height', 'width', 'guidance_scale', 'max_sequence_length', 'negative_prompt')))}",
        )
    try:
        hints = typing.get_type_hints(pipe.__call__)
    except Exception:  # an annotation that does not evaluate: fall back to the raw ones
        hints = {name: p.annotation for name, p in parameters.items()}
    for name, value in kwargs.items():
        allowed = _simple_types(hints.get(name, inspect.Parameter.empty))
        if allowed is not None and not _value_fits(value, allowed):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise ConfigError(f"--set {name}={value!r} is a {type(value).__name__}, {type(pipe).__name__} takes {names}",
                              f"write e.g. --set {name}={_example(allowed)}")
    factor = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    for name in ("height", "width"):
        value = kwargs.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % factor):
            raise ConfigError(f"--set {name}={value!r} is not a positive multiple of {factor}", f"use e.g. --set {name}={factor * 32}")


def _simple_types(annotation: Any) -> tuple[type, ...] | None:
    """The scalar types an annotation allows (int, float, str, bool, None), or None when it allows
    anything else too (lists, tensors, generators): then the pipeline checks the value itself."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return None
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    if not all(option in (int, float, str, bool, type(None)) for option in options):
        return None
    return tuple(options)


def _value_fits(value: Any, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return isinstance(value, allowed)


def _example(allowed: tuple[type, ...]) -> str:
    scalars = [t for t in allowed if t is not type(None)]
    return {int: "512", float: "5.0", str: "text", bool: "true"}.get(scalars[0], "VALUE") if scalars else "null"


def detect_family(module: torch.nn.Module) -> str | None:
    """The preset family of a target module (sdxl, sd15, sd21, sd3, flux, pixart), or None."""
    return family_of(type(module).__name__, dict(getattr(module, "config", {}) or {}))


def scheduler_record(pipe: Any) -> dict[str, Any]:
    """{"class", "config"} of `pipe.scheduler` (public keys, JSON-safe), or {} without one."""
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        return {}
    config = {key: value for key, value in dict(getattr(scheduler, "config", {}) or {}).items() if not key.startswith("_")}
    return {"class": type(scheduler).__name__, "config": json.loads(json.dumps(config, sort_keys=True, default=str))}


def check_calibrated_state(model: torch.nn.Module, model_info: dict[str, Any], artifact: str) -> None:
    """Refuse a model whose weights differ from those an artifact of a live pipe recorded
    (`model.target_state_sha256` of the artifact's manifest: a fine-tune, a fused LoRA or an edit
    since calibration); `artifact` names it in the message."""
    recorded = model_info.get("target_state_sha256")
    if recorded is not None and recorded != state_sha256(model):
        raise ArtifactError(
            f"calibration artifact {artifact} was captured from {model_info['target_class']} weights "
            "that differ from the model's now (fine-tuned, fused or edited since)",
            "quantize the module that was calibrated, or calibrate this one",
        )


def state_sha256(module: torch.nn.Module) -> str:
    """sha256 (hex) over the full state dict of `module`, one tensor at a time (see the module docstring).

    Under accelerate's offload hooks (`cpu_offload`, `enable_sequential_cpu_offload`, a `device_map`
    with disk or CPU offload) a parameter lies on the meta device between calls; each submodule
    is then onloaded (`align_module_device`) only while its own tensors are hashed, so the hash
    equals the unhooked module's and no more than one submodule's weights are onloaded at once.
    """
    owners: dict[str, tuple[torch.nn.Module, str]] = {}
    for prefix, child in module.named_modules(remove_duplicate=False):  # what state_dict() walks and names
        persistent = [key for key in child._buffers if key not in child._non_persistent_buffers_set]
        for key in [*child._parameters, *persistent]:
            if (child._parameters[key] if key in child._parameters else child._buffers[key]) is not None:
                owners[f"{prefix}.{key}" if prefix else key] = (child, key)
    hasher = hashlib.sha256(f"{STATE_HASH_VERSION}\n".encode())
    with contextlib.ExitStack() as onloaded:
        current: torch.nn.Module | None = None
        for name in sorted(owners):
            child, key = owners[name]
            if child is not current:
                onloaded.close()
                if has_offloaded_params(child):
                    onloaded.enter_context(align_module_device(child))
                current = child
            tensor = (child._parameters[key] if key in child._parameters else child._buffers[key]).detach()
            hasher.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{tuple(tensor.shape)}\n".encode())
            if tensor.is_meta or tensor.numel() == 0:
                continue
            hasher.update(tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def value_sha256(value: Any) -> str:
    """sha256 (hex) of a pipeline argument: nested lists / tuples / dicts of JSON scalars, tensors,
    numpy arrays and PIL images (mode, size and pixels)."""
    hasher = hashlib.sha256()
    _feed(hasher, value)
    return hasher.hexdigest()


def sequence_sha256(values: Iterable[Any], count: int) -> str:
    """sha256 (hex) of `count` pipeline arguments fed one at a time, so per-prompt images made by
    a function are never all held at once; equals `value_sha256(list(values))`."""
    hasher = hashlib.sha256(f"seq|{count}|".encode())
    fed = 0
    for value in values:
        _feed(hasher, value)
        fed += 1
    if fed != count:
        raise ConfigError(f"{fed} per-prompt arguments for {count} prompts", "give one dict per prompt")
    return hasher.hexdigest()


def jsonable_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` as JSON reads them back (tuples as lists, so a resumed run's settings compare equal),
    every value that is not plain JSON replaced by {"sha256": value_sha256(value)}."""
    return {key: json.loads(json.dumps(value)) if _is_plain_json(value) else {"sha256": value_sha256(value)} for key, value in kwargs.items()}


def _is_plain_json(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain_json(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _is_plain_json(item) for key, item in value.items())
    return False


def _feed(hasher: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu").contiguous()
        hasher.update(f"tensor|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif type(value).__module__ == "numpy" and hasattr(value, "tobytes"):
        hasher.update(f"ndarray|{value.dtype}|{tuple(getattr(value, 'shape', ()))}|".encode())
        hasher.update(value.tobytes())
    elif hasattr(value, "tobytes") and hasattr(value, "mode") and hasattr(value, "size"):  # a PIL image
        hasher.update(f"image|{value.mode}|{tuple(value.size)}|".encode())
        hasher.update(value.tobytes())
    elif isinstance(value, (list, tuple)):
        hasher.update(f"seq|{len(value)}|".encode())
        for item in value:
            _feed(hasher, item)
    elif isinstance(value, dict):
        hasher.update(f"map|{len(value)}|".encode())
        for key in sorted(value, key=str):
            hasher.update(f"{key}=".encode())
            _feed(hasher, value[key])
    elif value is None or isinstance(value, (bool, int, float, str)):
        hasher.update(f"json|{json.dumps(value)}|".encode())
    else:
        raise ConfigError(f"pipeline argument of type {type(value).__name__} cannot be recorded",
                          "pass tensors, numpy arrays, PIL images, or JSON values (numbers, text, lists)")
