"""Generate an image with a quantized checkpoint in its pipeline (or the unquantized reference).

The pipeline is loaded from the model preset, and the checkpoint goes into it through
`diffquant.load_quantized` (`diffquant.models.quantized`), the same call a user makes on a pipe
of their own: each quantized layer runs the execution path `mode` picks (`auto` by default).
The summary reports each path, and the resident bytes of the submodule beside the unquantized
one's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffquant.artifacts.atomic import write_atomic
from diffquant.artifacts.checkpoint import read_checkpoint_manifest
from diffquant.errors import ConfigError
from diffquant.models.live import check_call_kwargs
from diffquant.models.loading import get_target, load_pipeline, seeded_generator
from diffquant.models.presets import preset_of_artifact, resolve_model
from diffquant.models.quantized import LoadReport, load_quantized, module_tensor_bytes
from diffquant.quant.kernels.select import MODES as EXECUTION_MODES

RESERVED_CALL_KWARGS = frozenset({"prompt", "num_inference_steps", "generator"})

__all__ = ["EXECUTION_MODES", "GenerateResult", "generate_image", "save_image_atomic"]


@dataclass
class GenerateResult:
    """What `generate_image` did, for the summary: the model, the checkpoint and how it loaded."""

    model: str
    out: Path
    checkpoint: Path | None
    unquantized_bytes: int
    load: LoadReport | None
    random_weights: bool = False
    psnr_db: float | None = None


def generate_image(model: str | None, checkpoint: Path | None, prompt: str, out: Path, steps: int | None = None,
                   seed: int = 0, device: str = "cpu", mode: str = "auto",
                   call_kwargs: dict[str, Any] | None = None, compare_to: Path | None = None) -> GenerateResult:
    """Generate one image with the pipeline of `model`, its target replaced by the checkpoint's.

    Without a checkpoint the unquantized pipeline generates (the reference image). `mode` is the
    execution mode of the quantized layers; `call_kwargs` override the preset's `pipe(...)` keywords.
    With `compare_to` (a PNG of the same size, e.g. the reference image), the result carries the
    PSNR of the new image against it.
    """
    manifest = read_checkpoint_manifest(checkpoint) if checkpoint else None
    if model is None and manifest is None:
        raise ConfigError("generate needs --model or --checkpoint", "pass --model NAME, or --checkpoint DIR")
    preset = resolve_model(model) if model else preset_of_artifact(manifest.model)
    pipe = load_pipeline(preset, device=device)
    unquantized_bytes = module_tensor_bytes(get_target(pipe, preset))
    load = load_quantized(pipe, checkpoint, mode=mode) if checkpoint is not None else None
    check_call_kwargs(pipe, call_kwargs or {}, RESERVED_CALL_KWARGS, "--set")
    kwargs = {**preset.pipeline_kwargs, **(call_kwargs or {})}
    with torch.inference_mode():
        image = pipe(prompt, num_inference_steps=steps or preset.steps, generator=seeded_generator(seed, 0, device), **kwargs).images[0]
    save_image_atomic(image, out)
    return GenerateResult(preset.name, out, checkpoint, unquantized_bytes, load, random_weights=preset.is_tiny,
                          psnr_db=None if compare_to is None else image_psnr(image, compare_to))


def image_psnr(image: Any, reference: Path) -> float:
    """PSNR (dB) of a PIL image against the PNG at `reference`; refused in one line unless the sizes match."""
    from PIL import Image

    from diffquant.eval.metrics import psnr

    if not Path(reference).is_file():
        raise ConfigError(f"--compare {reference} does not exist", "generate the reference first (diffquant generate --model NAME --out PNG)")
    with Image.open(reference) as opened:
        other = opened.convert(image.mode)
    if other.size != image.size:
        raise ConfigError(f"--compare {reference} is {other.size[0]}x{other.size[1]}, the image {image.size[0]}x{image.size[1]}",
                          "compare images generated at the same size")
    return psnr(image, other)


def save_image_atomic(image: Any, out: Path) -> None:
    """Save a PIL image as PNG under a temporary name, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda tmp: image.save(tmp, format="PNG"))
