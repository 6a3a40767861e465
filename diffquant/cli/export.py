"""`diffquant export`: a checkpoint in the layout another runtime loads natively."""

from __future__ import annotations

from pathlib import Path

import click

from diffquant.cli.summary import print_table

from diffquant.stages.export import EXPORT_FORMATS, export


@click.command("export")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--to", "to", type=click.Choice(sorted(EXPORT_FORMATS)), required=True, help="Target runtime layout.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output file or directory (the format decides).")
def export_command(checkpoint: Path, to: str, out: Path) -> None:
    """Write CHECKPOINT in the layout of a runtime (ComfyUI, diffusers, GGUF, ModelOpt, Quark, torchao).

    \b
    Example:
      diffquant export artifacts/quantized/flux-nvfp4 --to comfyui --out flux-nvfp4-comfy.safetensors
    """
    report = export(checkpoint, to, out)
    print_table(["field", "value"], report.summary_rows())
    click.echo(f"exported: {report.out}")
