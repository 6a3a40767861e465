"""Shared pieces of the export tests: held-out samples on disk, reference outputs, SQNR."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from diffquant.artifacts.calibration_reader import CalibrationArtifact
from diffquant.artifacts.checkpoint_records import LayerRecord
from diffquant.export.common import CheckpointContents, sqnr_db
from diffquant.quant.weights import quantize_weight_in_range
from diffquant.quant.spec import TensorSpec
from diffquant.quant.modules import QuantizedLayer


def holdout_samples(result: Any) -> list[tuple[int, dict[str, Any]]]:
    """The held-out calibration samples of a QuantizeResult, as (id, kwargs)."""
    calibration = result.manifest["calibration"]
    artifact = CalibrationArtifact(Path(calibration["path"]))
    return [(i, artifact.sample(i)) for i in calibration["holdout_sample_ids"]]


def save_samples(samples: list[tuple[int, dict[str, Any]]], path: Path) -> None:
    """Top-level tensors to safetensors (`<id>/<kwarg>`), everything else to `<path>.json`."""
    tensors: dict[str, torch.Tensor] = {}
    consts: dict[str, dict[str, Any]] = {}
    for i, kwargs in samples:
        consts[str(i)] = {}
        for key, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{i}/{key}"] = value.clone()  # the artifact shares repeated tensors
            else:
                json.dumps(value)  # a kwarg that is neither a tensor nor JSON fails here, loudly
                consts[str(i)][key] = value
    save_file(tensors, str(path))
    Path(f"{path}.json").write_text(json.dumps({"ids": [i for i, _ in samples], "consts": consts}))


def weight_only(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a quantized model whose layers keep their quantized weights but take 16-bit inputs:
    what a runtime computes where it dequantizes the weight and has no low-precision kernel."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, QuantizedLayer):
            module.input_spec = None
    return model


def outputs(model: torch.nn.Module, samples: list[tuple[int, dict[str, Any]]]) -> dict[int, torch.Tensor]:
    with torch.no_grad():
        return {i: _main(model(**kwargs)).float() for i, kwargs in samples}


def output_sqnr(reference: dict[int, torch.Tensor], approx: dict[int, torch.Tensor]) -> float:
    ids = sorted(reference)
    return sqnr_db(torch.cat([reference[i].flatten() for i in ids]), torch.cat([approx[i].float().flatten() for i in ids]))


def _main(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample


def synthetic_contents(weights: dict[str, torch.Tensor], spec: TensorSpec) -> CheckpointContents:
    """In-memory checkpoint contents of Linear layers quantized by diffquant's codecs (min_max ranges)."""
    layers, tensors = {}, {}
    for name, weight in weights.items():
        w2 = weight.float()
        lo, hi = (w2.amin().reshape(1), w2.amax().reshape(1)) if spec.granularity == "per_tensor" else (w2.amin(1), w2.amax(1))
        if spec.dtype == "nvfp4":
            lo, hi = w2.amin().reshape(1), w2.amax().reshape(1)
        stored = quantize_weight_in_range(weight, spec, lo, hi).tensors
        names = {suffix: f"{name}.{suffix}" for suffix in stored}
        tensors.update({names[s]: t for s, t in stored.items()})
        layers[name] = LayerRecord(name=name, type="Linear", shape=tuple(weight.shape), dtype="float32", weight=spec.to_dict(), tensors=names)
    return CheckpointContents(Path("."), {"quantization_config": {"recipe": "test"}}, layers, tensors)
