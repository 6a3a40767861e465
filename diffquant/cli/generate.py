"""`diffquant generate`: an image from a quantized checkpoint (or the unquantized reference)."""

from __future__ import annotations

from pathlib import Path

import click

from diffquant.artifacts.checkpoint import checkpoint_verification
from diffquant.cli.summary import human_bytes, print_table
from diffquant.paths import resolve_device
from diffquant.cli.params import parse_set_options
from diffquant.stages.generate import EXECUTION_MODES, generate_image


@click.command("generate")
@click.option("--model", default=None, help="Model preset [default: the one the checkpoint was quantized from].")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None, help="Quantized checkpoint directory; without it the unquantized model generates.")
@click.option("--prompt", required=True, help="Text prompt.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="PNG file to write.")
@click.option("--steps", type=int, default=None, help="Denoising steps [default: the preset's].")
@click.option("--seed", type=int, default=0, help="Generator seed.")
@click.option("--device", default="auto", help="Device to generate on: auto (cuda if available), cpu, cuda, ...")
@click.option("--mode", type=click.Choice(EXECUTION_MODES), default="auto",
              help="Execution path of the quantized layers: auto (fastest measured per layer), native kernels, dequant per call, or exact fake-quant.")
@click.option("--native", is_flag=True, help="Same as --mode native (kept for old scripts).")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the checkpoint's weights.")
@click.option("--set", "set_options", multiple=True, metavar="KEY=VALUE",
              help="Keyword of pipe(...) over the preset's, e.g. --set guidance_scale=5.0 --set height=512 (repeatable).")
@click.option("--compare", type=click.Path(path_type=Path), default=None, help="PNG to compare with (e.g. the reference image): prints the PSNR.")
def generate_command(model: str | None, checkpoint: Path | None, prompt: str, out: Path, steps: int | None, seed: int, device: str,
                     mode: str, native: bool, no_verify: bool, set_options: tuple[str, ...], compare: Path | None) -> None:
    """Generate an image with the checkpoint's quantized submodule in its pipeline.

    \b
    Example:
      diffquant generate --checkpoint artifacts/quantized/check-w8a8 --prompt "a cat on a windowsill" --out cat.png
      diffquant generate --model sdxl --prompt "a cat" --out cat.png --set guidance_scale=5.0 --set height=768 --set width=768
    """
    with checkpoint_verification(not no_verify):
        result = generate_image(model, checkpoint, prompt, out, steps, seed, resolve_device(device), "native" if native else mode,
                                call_kwargs=parse_set_options(set_options), compare_to=compare)
    if result.load is not None:
        rows = [["resident weights, unquantized", human_bytes(result.unquantized_bytes)],
                ["resident weights, quantized", human_bytes(result.load.resident_bytes)],
                ["checkpoint tensors", human_bytes(result.load.checkpoint_tensor_bytes)],
                ["execution", str(result.load.execution)]]
        rows += [[f"not native: {count} layers", reason] for reason, count in result.load.execution.reasons().most_common()]
        print_table(["field", "value"], rows)
    if result.psnr_db is not None:
        click.echo(f"PSNR against {compare}: {'inf (identical)' if result.psnr_db == float('inf') else f'{result.psnr_db:.2f} dB'}")
    noise = "; the tiny model's weights are random, so expect a 64 px noise image" if result.random_weights else ""
    click.echo(f"wrote {out} (model {result.model}, checkpoint {result.checkpoint or 'none: unquantized'}{noise})")
