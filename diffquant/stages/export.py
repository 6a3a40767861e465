"""Export: rewrite a quantized checkpoint in the layout of another runtime (`diffquant.export`).

The stage checks the checkpoint (manifest, weights present), loads the target's diffusers config
for the formats that write one (`NEEDS_CONFIG`), then hands it to the format's exporter, which
writes `out` atomically and refuses what its format cannot carry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffquant.artifacts.checkpoint import read_checkpoint_manifest
from diffquant.export import EXPORT_FORMATS, NEEDS_CONFIG, ExportReport, export_checkpoint
from diffquant.models.loading import resolve_source
from diffquant.models.presets import resolve_model
from diffquant.models.submodule import submodule_class

__all__ = ["EXPORT_FORMATS", "ExportReport", "export"]


def export(checkpoint: Path, to: str, out: Path, **options: Any) -> ExportReport:
    """Export `checkpoint` (a `diffquant quantize` output directory) as format `to` into `out`."""
    manifest = read_checkpoint_manifest(Path(checkpoint))
    if to in NEEDS_CONFIG and "config" not in options:
        options["config"] = target_config(manifest.model)
    return export_checkpoint(Path(checkpoint), to, Path(out), **options)


def target_config(model: dict[str, Any]) -> dict[str, Any]:
    """The quantized submodule's diffusers config (`config.json` content), from the model preset
    of a checkpoint's `model` record."""
    preset = resolve_model(model["name"], model.get("target"))
    config = submodule_class(preset).load_config(resolve_source(preset), subfolder=preset.target, revision=preset.revision)
    return dict(config)
