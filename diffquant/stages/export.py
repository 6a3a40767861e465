"""Export: rewrite a quantized checkpoint in the layout of another runtime (`diffquant.export`).

The stage checks the checkpoint (manifest, weights present), then hands it to the format's
exporter, which writes `out` atomically and refuses what its format cannot carry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffquant.artifacts.checkpoint import read_checkpoint_manifest
from diffquant.export import EXPORT_FORMATS, ExportReport, export_checkpoint

__all__ = ["EXPORT_FORMATS", "ExportReport", "export"]


def export(checkpoint: Path, to: str, out: Path, **options: Any) -> ExportReport:
    """Export `checkpoint` (a `diffquant quantize` output directory) as format `to` into `out`."""
    read_checkpoint_manifest(Path(checkpoint))
    return export_checkpoint(Path(checkpoint), to, Path(out), **options)
