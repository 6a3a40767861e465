"""Load only the target submodule of a pipeline (stage two needs no text encoders or VAE).

The submodule's class comes from the pipeline's `model_index.json`; weights load through the
class's own `from_pretrained(source, subfolder=target)`, the path a hub id takes too.
`empty_submodule` builds the same architecture on the meta device, for reloading a checkpoint
without materialising the original weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from diffquant.errors import ConfigError, DiffquantError
from diffquant.models.loading import loader_error, resolve_source
from diffquant.models.presets import ModelPreset


def submodule_class(preset: ModelPreset) -> type[torch.nn.Module]:
    """The diffusers/transformers class of `preset.target`, read from model_index.json."""
    import diffusers
    import transformers

    source = resolve_source(preset)
    index = _model_index(source, preset)
    entry = index.get(preset.target)
    if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
        components = sorted(k for k, v in index.items() if isinstance(v, list) and v[1] is not None)
        raise ConfigError(
            f"pipeline {preset.source} has no component {preset.target!r}",
            f"set the target to one of {', '.join(components)}",
        )
    library, class_name = entry
    module = {"diffusers": diffusers, "transformers": transformers}.get(library)
    cls = getattr(module, class_name, None) if module else None
    if cls is None:
        raise ConfigError(f"component {preset.target!r} has class {library}.{class_name}, which is not importable", "upgrade diffusers")
    return cls


def load_submodule(preset: ModelPreset, device: str = "cpu", torch_dtype: str | None = None, device_map: str | None = None,
                   max_memory: dict[str, str] | None = None, offload_folder: str | None = None) -> torch.nn.Module:
    """`cls.from_pretrained(source, subfolder=target)` in the preset's dtype, in eval mode.

    Without `device_map` the module moves to `device`. With it (`auto`, `balanced`, ...), accelerate
    places it over the devices within `max_memory` (e.g. {"0": "20GiB", "cpu": "64GiB"}), offloading
    the rest to `offload_folder` on disk; see `diffquant.models.placement`.
    """
    cls = submodule_class(preset)
    source = resolve_source(preset)
    placement = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder} if device_map else {}
    try:
        module = cls.from_pretrained(
            source,
            subfolder=preset.target,
            torch_dtype=getattr(torch, torch_dtype or preset.torch_dtype),
            variant=preset.variant,
            revision=preset.revision,
            **placement,
        )
    except DiffquantError:
        raise
    except Exception as exc:  # noqa: BLE001 - one line, chained
        raise loader_error(preset, source, exc) from exc
    return (module if device_map else module.to(device)).eval()


def empty_submodule(preset: ModelPreset, torch_dtype: str | None = None) -> torch.nn.Module:
    """The target's architecture with parameters on the meta device (no memory, no init cost)."""
    from accelerate import init_empty_weights

    cls = submodule_class(preset)
    source = resolve_source(preset)
    config = cls.load_config(source, subfolder=preset.target, revision=preset.revision)
    with init_empty_weights():
        module = cls.from_config(config)
    # nn.Module.to, not ModelMixin.to: the latter warns about fp32-pinned modules that do not
    # matter here, since every tensor is about to be replaced by the checkpoint's.
    return torch.nn.Module.to(module, getattr(torch, torch_dtype or preset.torch_dtype)).eval()


def _model_index(source: str, preset: ModelPreset) -> dict[str, Any]:
    path = Path(source) / "model_index.json"
    if path.is_file():
        return json.loads(path.read_text())
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(source, revision=preset.revision))
    except Exception as exc:  # noqa: BLE001 - one line, chained
        raise loader_error(preset, source, exc) from exc
