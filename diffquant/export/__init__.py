"""Exporters: a diffquant checkpoint rewritten in the layout another runtime loads natively.

One module per runtime (`comfyui.py`, `diffusers_bfl.py`, `modelopt_layout.py`, `gguf_file.py`, `quark_layout.py`,
`torchao_layout.py`, `nunchaku_lite.py`, `nunchaku_flux.py`), each with a function

    export(checkpoint: Path, out: Path, **options) -> ExportReport

that reads the checkpoint (`diffquant.artifacts.checkpoint`), writes `out` under a temporary name
and renames it when complete, and refuses, in one line naming a recipe that fits, anything its
format cannot carry (never drops it). `export_checkpoint` dispatches by format name; the CLI's
`diffquant export CHECKPOINT --to FORMAT --out PATH` calls it.

Shared by the exporters: `common.py` (`read_checkpoint` -> `CheckpointContents`: records, stored
tensors, dequantized weights; `original_layout`: layers under original key names with fused groups
stacked or requantized; `write_safetensors_atomic`) and `keys.py` (`original_key_map`: the inverse
of diffusers' single-file converters for Flux and SD/SDXL UNets; `qkv_groups`).

Example:
    >>> sorted(EXPORT_FORMATS)[:3]
    ['comfyui', 'diffusers-bfl', 'gguf']
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffquant.errors import ConfigError

# Format name -> module implementing `export`; modules are imported on use, so a format whose
# runtime library is absent (gguf) costs nothing to the others.
EXPORT_FORMATS: dict[str, str] = {
    "comfyui": "diffquant.export.comfyui",
    "diffusers-bfl": "diffquant.export.diffusers_bfl",
    "nunchaku-lite": "diffquant.export.nunchaku_lite",
    "nunchaku-flux": "diffquant.export.nunchaku_flux",
    "modelopt": "diffquant.export.modelopt_layout",
    "gguf": "diffquant.export.gguf_file",
    "quark": "diffquant.export.quark_layout",
    "torchao": "diffquant.export.torchao_layout",
}

# Formats whose exporter needs the target's diffusers config (`config=` option); the export
# stage loads it from the checkpoint's model preset.
NEEDS_CONFIG = frozenset({"modelopt"})


@dataclass
class ExportReport:
    """What an export wrote: the format, the output path, the layers per stored format, and notes
    (requantization error added, tensors renamed) for the summary."""

    format: str
    out: Path
    layers: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def summary_rows(self) -> list[tuple[str, Any]]:
        rows: list[tuple[str, Any]] = [("format", self.format), ("out", str(self.out))]
        rows += [(f"layers {kind}", count) for kind, count in sorted(self.layers.items())]
        rows += [("note", note) for note in self.notes]
        return rows


def export_checkpoint(checkpoint: Path, to: str, out: Path, **options: Any) -> ExportReport:
    """Export `checkpoint` as `to` into `out` (see the module docstring)."""
    if to not in EXPORT_FORMATS:
        raise ConfigError(f"export format {to!r} is unknown", f"use one of {', '.join(sorted(EXPORT_FORMATS))}")
    module = importlib.import_module(EXPORT_FORMATS[to])
    return module.export(Path(checkpoint), Path(out), **options)
