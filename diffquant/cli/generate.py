"""`diffquant generate`: an image from a quantized checkpoint (or the unquantized reference)."""

from __future__ import annotations

from pathlib import Path

import click

from diffquant.artifacts.checkpoint import checkpoint_verification
from diffquant.paths import resolve_device
from diffquant.stages.generate import generate_image


@click.command("generate")
@click.option("--model", default=None, help="Model preset [default: the one the checkpoint was quantized from].")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None, help="Quantized checkpoint directory; without it the unquantized model generates.")
@click.option("--prompt", required=True, help="Text prompt.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="PNG file to write.")
@click.option("--steps", type=int, default=None, help="Denoising steps [default: the preset's].")
@click.option("--seed", type=int, default=0, help="Generator seed.")
@click.option("--device", default="auto", help="Device to generate on: auto (cuda if available), cpu, cuda, ...")
@click.option("--native", is_flag=True, help="Run quantized Linear layers with real int8/fp8 kernels where the device has them.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the checkpoint's weights.")
def generate_command(model: str | None, checkpoint: Path | None, prompt: str, out: Path, steps: int | None, seed: int, device: str, native: bool,
                     no_verify: bool) -> None:
    """Generate an image with the checkpoint's quantized submodule in its pipeline.

    \b
    Example:
      diffquant generate --checkpoint artifacts/quantized/check-w8a8 --prompt "a cat on a windowsill" --out cat.png
    """
    with checkpoint_verification(not no_verify):
        info = generate_image(model, checkpoint, prompt, out, steps, seed, resolve_device(device), native)
    extra = f", native: {info['native']}" if info["native"] else ""
    click.echo(f"wrote {out} (model {info['model']}, checkpoint {info['checkpoint'] or 'none: unquantized'}{extra})")
