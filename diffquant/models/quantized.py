"""Put a quantized checkpoint into a model: the user's own pipeline, or one built from its preset.

`load_quantized(pipe_or_module, checkpoint, mode="auto")` replaces, in place, every layer the
checkpoint quantized by its QuantizedLinear / QuantizedConv2d (rebuilt by the one rebuild path,
`diffquant.quant.rebuild`), loads the checkpoint's other tensors, and gives each layer its
execution path (`diffquant.quant.kernels.select`). The model's architecture comes from the object
given, so a checkpoint loads wherever its base directory has moved; a model of another
architecture (class or config hash) is refused in one line. Quantized layers compute in the
dtype and on the device of the layers they replace, so a bf16 / fp16 / fp32 pipe on any device
takes the same checkpoint. Only the checkpoint's tensors stay resident: no float copy of a
quantized weight is kept (except by the `exact` path, which caches one per layer).

`load_quantized_submodule(checkpoint)` does the same into the preset's architecture built on the
meta device, for `generate`, `eval` and tests.

Example (a tiny SDXL twin, calibrated and quantized first):
    >>> import tempfile
    >>> from diffusers import DiffusionPipeline
    >>> from diffquant.models.tiny import tiny_pipeline_dir
    >>> from diffquant.stages.calibrate import CalibrationSettings, calibrate
    >>> from diffquant.stages.quantize import QuantizeSettings, quantize
    >>> work = Path(tempfile.mkdtemp())
    >>> _ = calibrate(CalibrationSettings(model="tiny-sdxl", out=work / "calib", num_prompts=2, steps=1), show_progress=False)
    >>> _ = quantize(QuantizeSettings(calib=work / "calib", recipe="fp8", out=work / "q", device="cpu", holdout=1), show_progress=False)
    >>> pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir("sdxl"))
    >>> report = load_quantized(pipe, work / "q", mode="dequant")
    >>> print(report)
    dequant: 118 layers (118 dequant)
    >>> report.resident_bytes == report.checkpoint_tensor_bytes
    True
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffquant.artifacts.checkpoint import load_checkpoint_tensors, read_checkpoint_manifest
from diffquant.artifacts.checkpoint_records import CheckpointManifest, LayerRecord
from diffquant.errors import ArtifactError, ConfigError
from diffquant.artifacts.fingerprint import module_fingerprint
from diffquant.models.presets import ModelPreset
from diffquant.models.submodule import empty_submodule
from diffquant.quant.kernels.select import ExecutionReport, set_execution
from diffquant.quant.modules import QuantizedLayer
from diffquant.quant.quantizer import swap_layers
from diffquant.quant.rebuild import layer_from_record

MANIFEST_ATTRIBUTE = "_diffquant_manifest"


@dataclass
class LoadReport:
    """What `load_quantized` did: the target it filled, each layer's execution path, and the
    bytes of the target's tensors after loading against the checkpoint's tensor bytes."""

    target: str
    execution: ExecutionReport
    resident_bytes: int
    checkpoint_tensor_bytes: int

    def __str__(self) -> str:
        return str(self.execution)


def load_quantized(pipe_or_module: Any, checkpoint: str | Path, mode: str = "auto") -> LoadReport:
    """Load `checkpoint` into a diffusers pipeline (its unet / transformer) or a submodule, in place.

    mode: `auto` (default), `native`, `dequant` or `exact` (see `diffquant.quant.kernels.select`).
    Returns a LoadReport whose `str()` is the one-line path summary.
    """
    checkpoint = Path(checkpoint)
    manifest = read_checkpoint_manifest(checkpoint)
    target, module = _target_module(pipe_or_module, manifest)
    check_architecture(module, manifest, checkpoint)
    tensors = load_checkpoint_tensors(checkpoint, "cpu")
    checkpoint_bytes = _tensor_bytes(tensors.values())
    install(module, manifest, tensors, place_like_original=True)
    execution = set_execution(module, mode)
    guard_save_pretrained(module)
    if module is not pipe_or_module:
        guard_save_pretrained(pipe_or_module)  # refuse before diffusers writes any component
    return LoadReport(target, execution, module_tensor_bytes(module), checkpoint_bytes)


def save_quantized(module: torch.nn.Module, out: str | Path, overwrite: bool = False) -> Path:
    """Write the quantized checkpoint of `module` (one that `load_quantized` filled) to `out`.

    The state dict of a quantized module is its checkpoint (stored tensors under their names, the
    other tensors as they are now), and the manifest is the one it was loaded with; the result
    loads back with `load_quantized`. Returns `out`.
    """
    from diffquant.artifacts.checkpoint import prepare_checkpoint_dir, write_checkpoint

    manifest = getattr(module, MANIFEST_ATTRIBUTE, None)
    if manifest is None:
        raise ConfigError(f"{type(module).__name__} holds no diffquant checkpoint", "load one with diffquant.load_quantized(module, DIR) first")
    out = Path(out)
    prepare_checkpoint_dir(out, overwrite)
    write_checkpoint(out, module.state_dict(), CheckpointManifest.from_json(manifest).replace(files=None))
    return out


def load_quantized_submodule(checkpoint: Path, device: str = "cpu", preset: ModelPreset | None = None,
                             mode: str = "exact") -> tuple[torch.nn.Module, CheckpointManifest]:
    """(the checkpoint's submodule, rebuilt into its preset's architecture on `device`, manifest).

    `mode` defaults to `exact`, the path whose outputs equal stage two's in-memory model bit for bit.
    """
    from diffquant.models.presets import preset_of_artifact

    manifest = read_checkpoint_manifest(checkpoint)
    preset = preset or preset_of_artifact(manifest.model)
    module = empty_submodule(preset, manifest.model["torch_dtype"])
    install(module, manifest, load_checkpoint_tensors(checkpoint, "cpu"), place_like_original=False)
    module = module.to(device).eval()
    set_execution(module, mode)
    guard_save_pretrained(module)
    return module, manifest


def install(module: torch.nn.Module, manifest: CheckpointManifest, tensors: dict[str, torch.Tensor], place_like_original: bool) -> None:
    """Swap in every quantized layer of `manifest` and load the other tensors of `tensors` (copied:
    the module owns its memory, and the caller's dict is left as it was).

    place_like_original: give each quantized layer the device and compute dtype of the layer it
    replaces, and cast the other tensors to the dtype of the parameter they load into (a user's
    fp16 pipe stays fp16); otherwise keep the checkpoint's dtypes.
    """
    records = manifest.layers
    # Copies of their own (fresh, 64-byte aligned): a tensor still viewing the checkpoint's memory
    # map keeps the whole file resident beside the copies (measured by RSS: 2x the checkpoint).
    tensors = {key: tensor.clone() if tensor.device.type == "cpu" else tensor for key, tensor in tensors.items()}
    modules = dict(module.named_modules())
    layers: dict[str, QuantizedLayer] = {}
    for record in records:
        original = modules.get(record.name)
        _check_replaces(record, original)
        layer = layer_from_record(record, tensors)
        if place_like_original:
            device, dtype = _placement_of(original)
            if device.type != "meta":
                layer = layer.to(device=device, dtype=dtype)
        layers[record.name] = layer.train(False)
    swap_layers(module, layers)
    expected = dict(module.state_dict(keep_vars=True))
    quantized_keys = {key for name in layers for key in expected if key.startswith(name + ".")}
    others = {key: value for key, value in expected.items() if key not in quantized_keys}
    unexpected = sorted(set(tensors) - set(others))
    missing = sorted(key for key, value in others.items() if key not in tensors)
    if unexpected or missing:
        example = (unexpected or missing)[0]
        raise ArtifactError(
            f"checkpoint does not fit {type(module).__name__}: {len(unexpected)} unexpected and {len(missing)} missing tensors (e.g. {example})",
            "load it into the model it was quantized from",
        )
    state = {}
    for key, tensor in tensors.items():
        current = others[key]
        if tuple(current.shape) != tuple(tensor.shape):
            raise ArtifactError(f"checkpoint tensor {key} has shape {list(tensor.shape)}, the model's has {list(current.shape)}",
                                "load it into the model it was quantized from")
        if place_like_original and current.device.type != "meta":
            tensor = tensor.to(device=current.device, dtype=current.dtype if current.is_floating_point() else tensor.dtype)
        state[key] = tensor
    module.load_state_dict(state, strict=False, assign=True)
    setattr(module, MANIFEST_ATTRIBUTE, manifest.to_json())


def check_architecture(module: torch.nn.Module, manifest: CheckpointManifest, checkpoint: Path) -> None:
    """Refuse, in one line, a module whose class or config hash differs from the checkpoint's model."""
    model = manifest.model
    found = module_fingerprint(module)
    expected = {"class": model.get("target_class"), "config_sha256": model.get("target_config_sha256")}
    if found != expected:
        what = "class" if found["class"] != expected["class"] else "config (config hash)"
        raise ConfigError(
            f"checkpoint {checkpoint} was made for {expected['class']} of model {model.get('name')!r}; "
            f"the {type(module).__name__} given differs in its {what}",
            "load it into the pipeline it was quantized from, or quantize this model",
        )


def module_tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of `module` (each tensor counted once)."""
    seen: set[int] = set()
    tensors = []
    for _, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors.append(tensor)
    return _tensor_bytes(tensors)


def guard_save_pretrained(owner: Any) -> None:
    """Make `owner.save_pretrained` (a submodule's, or its pipeline's) refuse in one line: diffusers
    would write quantized tensors under float names that its loader cannot read back."""
    if not hasattr(owner, "save_pretrained"):
        return

    def refuse(self: Any, *args: Any, **kwargs: Any) -> None:
        raise ConfigError(
            f"{type(self).__name__} holds diffquant quantized layers, which diffusers' save_pretrained cannot write in a form it reloads",
            "save the checkpoint with diffquant.save(module, DIR) and load it with diffquant.load_quantized(pipe, DIR)",
        )

    owner.save_pretrained = types.MethodType(refuse, owner)


def _target_module(pipe_or_module: Any, manifest: CheckpointManifest) -> tuple[str, torch.nn.Module]:
    target = manifest.model.get("target", "")
    if isinstance(pipe_or_module, torch.nn.Module):
        return target, pipe_or_module
    module = getattr(pipe_or_module, target, None) if target else None
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(
            f"{type(pipe_or_module).__name__} has no submodule {target!r}, the one this checkpoint quantized",
            f"pass the pipeline whose {target or 'target'} was quantized, or the submodule itself",
        )
    return target, module


def _check_replaces(record: LayerRecord, original: torch.nn.Module | None) -> None:
    expected_type = {"Linear": torch.nn.Linear, "Conv2d": torch.nn.Conv2d}[record.type]
    if not isinstance(original, expected_type):
        found = "nothing" if original is None else type(original).__name__
        raise ArtifactError(f"checkpoint layer {record.name} is a {record.type}, the model has {found} there",
                            "load it into the model it was quantized from")
    shape = tuple(original.weight_shape if isinstance(original, QuantizedLayer) else original.weight.shape)
    if shape != tuple(record.shape):
        raise ArtifactError(f"checkpoint layer {record.name} has weight shape {list(record.shape)}, the model's is {list(shape)}",
                            "load it into the model it was quantized from")


def _placement_of(layer: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, compute dtype) of a float layer, or of a quantized one being replaced again."""
    if isinstance(layer, QuantizedLayer):
        return layer._device(), layer.compute_dtype
    return layer.weight.device, layer.weight.dtype


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
