"""`diffusers-bfl`: a Flux transformer as one safetensors file in Black Forest Labs' fp8r / nvfp4 layout.

diffusers 0.42.1 loads it with
`FluxTransformer2DModel.from_single_file(path, config=..., quantization_config=BFLQuantizationConfig())`
(`diffusers/quantizers/bfl/`): keys are BFL's original names (`keys.original_key_map("flux")`),
and a quantized Linear `<m>` stores

| scheme | tensors (dtype, shape) | dequantization (bfl/utils.py) |
|---|---|---|
| fp8r | `<m>.weight` F8_E4M3 [N, K]; `<m>.weight_scale` F32 [N] | `float(q) * s[:, None]` |
| nvfp4 | `<m>.weight` U8 [N, K/2] (low nibble = even index); `<m>.weight_scale` F8_E4M3 [N, K/16]; `<m>.weight_scale_2` F32 []; `<m>.input_scale` F32 [] | `e2m1(c) * (float(s) * s2)` |

which is diffquant's own layout renamed (`weight_packed` -> `weight`, `input_scale_2` -> `input_scale`,
a per-tensor fp8 scale repeated per row, which is exact). The loader requires `input_scale` for
nvfp4 (the activation global scale amax / (6 * 448) that Blackwell kernels use), so nvfp4 needs
static inputs (recipe `nvfp4_static`). fp8r activations are quantized per row at run time by the
runtime; the fp8 recipe's static `input_scale` is written beside the weight (the loader accepts
and ignores it), and the report says so.

BFL fuses `img_attn.qkv`, `txt_attn.qkv` and `single_blocks.N.linear1`. fp8r scales are per row,
so those groups stack exactly; nvfp4 groups need one `weight_scale_2`, so parts with different
ones are requantized at export time (`common.fuse_group`) and the weight SQNR that costs is in the
report's notes.

Example:
    >>> sorted(SCHEMES)
    ['fp8r', 'nvfp4']
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from diffquant.errors import ConfigError
from diffquant.export import ExportReport
from diffquant.export.common import OriginalLayer, original_layout, read_checkpoint, write_safetensors_atomic
from diffquant.export.keys import original_key_map

SCHEMES = {"fp8r": "fp8_e4m3", "nvfp4": "nvfp4"}


def export(checkpoint: Path, out: Path, **options: Any) -> ExportReport:
    """Write `checkpoint` (a Flux transformer) to the single file `out` (see the module docstring)."""
    if options:
        raise ConfigError(f"diffusers-bfl takes no options, got {', '.join(sorted(options))}", "drop them")
    contents = read_checkpoint(checkpoint)
    if contents.family != "flux":
        raise ConfigError(
            f"diffusers-bfl carries Flux transformers, not {contents.family or 'this model'}",
            "export this checkpoint --to comfyui or --to modelopt",
        )
    svd = [record for record in contents.layers.values() if record.svd is not None]
    for record in svd or contents.layers.values():
        _check_layer(record.name, record.weight, record.input, record.svd is not None, contents.recipe)
    keymap = original_key_map("flux", [*contents.tensors, *(f"{n}.weight" for n in contents.layers)])
    layers, plain, notes = original_layout(contents, keymap)
    tensors = dict(plain)
    report = ExportReport(format="diffusers-bfl", out=Path(out), notes=notes)
    static_fp8 = False
    for layer in layers:
        scheme, layer_tensors = bfl_tensors(layer)
        tensors.update(layer_tensors)
        report.layers[scheme] = report.layers.get(scheme, 0) + 1
        static_fp8 |= scheme == "fp8r" and f"{layer.key}.input_scale" in layer_tensors
    if static_fp8:
        report.notes.append("fp8r: the static input_scale is written, but BFL's runtime quantizes activations per row at run time")
    metadata = {"diffquant.export": json.dumps({"format": "diffusers-bfl", "recipe": contents.recipe}, sort_keys=True)}
    write_safetensors_atomic(Path(out), tensors, metadata)
    report.files.append(str(out))
    return report


def bfl_tensors(layer: OriginalLayer) -> tuple[str, dict[str, torch.Tensor]]:
    """The scheme name and the BFL tensors of one quantized layer (see the module docstring)."""
    k = layer.key
    if layer.spec.dtype == "nvfp4":
        out = {f"{k}.weight": layer.stored["weight_packed"], f"{k}.weight_scale": layer.stored["weight_scale"],
               f"{k}.weight_scale_2": layer.stored["weight_scale_2"].float().reshape(()),
               f"{k}.input_scale": layer.inputs["input_scale_2"].float().reshape(())}  # fmt: skip
        return "nvfp4", out
    rows = layer.shape[0]
    scale = layer.stored["weight_scale"].float()
    out = {f"{k}.weight": layer.stored["weight"], f"{k}.weight_scale": scale.reshape(-1).expand(rows).contiguous() if scale.numel() == 1 else scale.reshape(rows)}
    if "input_scale" in layer.inputs:
        out[f"{k}.input_scale"] = layer.inputs["input_scale"].float().reshape(())
    return "fp8r", out


def _check_layer(name: str, weight: dict[str, Any], inputs: dict[str, Any] | None, svd: bool, recipe: str) -> None:
    dtype = weight.get("dtype")
    where = f"recipe {recipe}, layer {name}"
    if svd:
        raise ConfigError(f"{where}: BFL's layout has no SVDQuant low-rank branch", "quantize with recipe fp8 or nvfp4_static")
    if dtype == "fp8_e4m3" and weight.get("granularity") in ("per_tensor", "per_channel"):
        return
    if dtype == "nvfp4":
        if inputs is None or inputs.get("dynamic", False) or inputs.get("dtype") != "nvfp4":
            raise ConfigError(
                f"{where}: BFL's nvfp4 needs a static NVFP4 input scale (input_scale), the checkpoint has none",
                "quantize with recipe nvfp4_static",
            )
        return
    raise ConfigError(f"{where}: {dtype} {weight.get('granularity')} weights are neither fp8r nor nvfp4", "quantize with recipe fp8 or nvfp4_static")
