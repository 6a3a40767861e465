"""Load a quantized checkpoint back into its pipeline and generate.

`load_quantized_submodule` rebuilds the submodule from the model preset (architecture only, on
the meta device) and the checkpoint alone: quantized layers from their stored tensors and the
manifest's specs, every other tensor from `model.safetensors`. No calibration data is needed, and
the result computes exactly what the in-memory quantized submodule computed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from diffquant.artifacts.atomic import PARTIAL_SUFFIX
from diffquant.artifacts.checkpoint import load_checkpoint_tensors, read_checkpoint_manifest
from diffquant.errors import ArtifactError, ConfigError
from diffquant.models.loading import get_target, load_pipeline, seeded_generator
from diffquant.models.presets import ModelPreset, resolve_model
from diffquant.models.submodule import empty_submodule
from diffquant.quant.modules import QuantizedConv2d, QuantizedLayer, QuantizedLinear
from diffquant.quant.quantizer import swap_layers
from diffquant.quant.spec import TensorSpec
from diffquant.stages.quantize import preset_of_artifact


def load_quantized_submodule(checkpoint: Path, device: str = "cpu", preset: ModelPreset | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(quantized submodule on `device`, checkpoint manifest)."""
    manifest = read_checkpoint_manifest(checkpoint)
    preset = preset or preset_of_artifact(manifest["model"])
    module = empty_submodule(preset, manifest["model"]["torch_dtype"])
    tensors = load_checkpoint_tensors(checkpoint, device)
    layers: dict[str, QuantizedLayer] = {}
    for entry in manifest["layers"]:
        layers[entry["name"]] = _rebuild_layer(entry, tensors)
    swap_layers(module, layers)
    missing, unexpected = module.load_state_dict(tensors, strict=False, assign=True)
    still_meta = [name for name, p in [*module.named_parameters(), *module.named_buffers()] if p.is_meta]
    if unexpected or still_meta:
        raise ArtifactError(
            f"checkpoint {checkpoint} does not fit {type(module).__name__}: "
            f"{len(unexpected)} unexpected and {len(still_meta)} missing tensors (e.g. {(unexpected or still_meta)[0]})",
            "load it with the model preset it was quantized from",
        )
    return module.to(device).eval(), manifest


def generate_image(model: str | None, checkpoint: Path | None, prompt: str, out: Path, steps: int | None = None,
                   seed: int = 0, device: str = "cpu", native: bool = False) -> dict[str, Any]:
    """Generate one image with the pipeline of `model`, its target replaced by the checkpoint's.

    Without a checkpoint the unquantized pipeline generates (the reference image). Returns what
    was done (model, checkpoint, native mode) for the summary.
    """
    manifest = read_checkpoint_manifest(checkpoint) if checkpoint else None
    if model is None and manifest is None:
        raise ConfigError("generate needs --model or --checkpoint", "pass --model NAME, or --checkpoint DIR")
    preset = resolve_model(model) if model else preset_of_artifact(manifest["model"])
    pipe = load_pipeline(preset, device=device)
    info: dict[str, Any] = {"model": preset.name, "checkpoint": str(checkpoint) if checkpoint else None, "native": None}
    if checkpoint is not None:
        quantized, _ = load_quantized_submodule(checkpoint, device, preset)
        if native:
            from diffquant.quant.native import convert_to_native

            info["native"] = convert_to_native(quantized)
        setattr(pipe, preset.target, quantized)
    get_target(pipe, preset)
    with torch.inference_mode():
        image = pipe(prompt, num_inference_steps=steps or preset.steps, generator=seeded_generator(seed, 0, device),
                     **preset.pipeline_kwargs).images[0]
    save_image_atomic(image, out)
    return info


def save_image_atomic(image: Any, out: Path) -> None:
    """Save a PIL image as PNG under a temporary name, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + PARTIAL_SUFFIX)
    image.save(tmp, format="PNG")
    os.replace(tmp, out)


def _rebuild_layer(entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> QuantizedLayer:
    def take(names: dict[str, str]) -> dict[str, torch.Tensor]:
        try:
            return {suffix: tensors.pop(full) for suffix, full in names.items()}
        except KeyError as exc:
            raise ArtifactError(f"checkpoint lacks tensor {exc.args[0]} of layer {entry['name']}", "re-run `diffquant quantize`") from exc

    stored = take(entry["tensors"])
    params = take(entry["input_tensors"]) or None
    lowrank = take(entry["svd"]["tensors"]) if entry.get("svd") else None
    bias = tensors.pop(entry["bias"]) if entry.get("bias") else None
    common = dict(
        weight_shape=torch.Size(entry["shape"]),
        weight_spec=TensorSpec(**entry["weight"]),
        stored=stored,
        bias=bias,
        compute_dtype=getattr(torch, entry["dtype"]),
        input_spec=TensorSpec(**entry["input"]) if entry.get("input") else None,
        input_params=params,
        lowrank=lowrank,
    )
    if entry["type"] == "Conv2d":
        return QuantizedConv2d(**common, conv=entry["conv"])
    return QuantizedLinear(**common)
