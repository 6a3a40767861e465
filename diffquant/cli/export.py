"""`diffquant export`: a checkpoint in the layout another runtime loads natively."""

from __future__ import annotations

from pathlib import Path

import click

from diffquant.cli.summary import print_table
from diffquant.errors import ConfigError
from diffquant.stages.export import EXPORT_FORMATS, export


@click.command("export")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--to", "to", type=click.Choice(sorted(EXPORT_FORMATS)), required=True, help="Target runtime layout.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output file or directory (the format decides).")
@click.option("--option", "option_pairs", multiple=True, metavar="KEY=VALUE",
              help="A format option, e.g. --option conv=dequantize (comfyui); repeatable.")
def export_command(checkpoint: Path, to: str, out: Path, option_pairs: tuple[str, ...]) -> None:
    """Write CHECKPOINT in the layout of a runtime (ComfyUI, diffusers, GGUF, ModelOpt, Quark, torchao).

    \b
    Example:
      diffquant export artifacts/quantized/flux-nvfp4 --to comfyui --out flux-nvfp4-comfy.safetensors
    """
    options: dict[str, str] = {}
    for pair in option_pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option {pair!r} is not KEY=VALUE", "write e.g. --option conv=dequantize")
        options[key] = value
    report = export(checkpoint, to, out, **options)
    print_table(["field", "value"], report.summary_rows())
    click.echo(f"exported: {report.out}")
