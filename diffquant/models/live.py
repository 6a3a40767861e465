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
  arrays), so a resumed run is refused when its per-prompt images differ.

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

import hashlib
import inspect
import json
from typing import Any, Iterable

import torch

from diffquant.errors import ArtifactError, ConfigError
from diffquant.models.presets import family_of

STATE_HASH_VERSION = "diffquant-state-v1"
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
    """sha256 (hex) over the full state dict of `module`, one tensor at a time (see the module docstring)."""
    hasher = hashlib.sha256(f"{STATE_HASH_VERSION}\n".encode())
    state = module.state_dict(keep_vars=False)
    for name in sorted(state):
        tensor = state[name]
        hasher.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{tuple(tensor.shape)}\n".encode())
        if tensor.is_meta or tensor.numel() == 0:
            continue
        hasher.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
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
    """`kwargs` with every value that is not plain JSON replaced by {"sha256": value_sha256(value)}."""
    return {key: value if _is_plain_json(value) else {"sha256": value_sha256(value)} for key, value in kwargs.items()}


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
