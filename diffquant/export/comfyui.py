"""`comfyui`: one safetensors file in ComfyUI's native mixed-precision layout, original key names.

ComfyUI (`comfy/ops.py` `mixed_precision_ops`, `comfy/quant_ops.py` `QUANT_ALGOS`) reads a
quantized Linear `<m>` from `<m>.weight` plus scales, and its format from `<m>.comfy_quant`, a
uint8 tensor holding UTF-8 JSON `{"format": ...}`; the same per-layer dicts are also written to the
header key `_quantization_metadata` as `{"format_version": "1.0", "layers": {<m>: {...}}}`, the
other carrier ComfyUI reads. The weights are dequantized by comfy-kitchen's layouts:

| diffquant spec | `format` | tensors (dtype, shape) | comfy-kitchen dequantization |
|---|---|---|---|
| fp8_e4m3 / fp8_e5m2 per_tensor | `float8_e4m3fn` / `float8_e5m2` | `weight` F8 [N, K]; `weight_scale` F32 []; `input_scale` F32 [] (static inputs) | `float(q) * s` (TensorCoreFP8Layout) |
| int8 symmetric per_tensor / per_channel | `int8_tensorwise` | `weight` I8 [N, K]; `weight_scale` F32 [] or [N, 1] | `float(q) * s` (TensorWiseINT8Layout) |
| nvfp4 | `nvfp4` | `weight` U8 [N16, K16/2], even element in the HIGH nibble; `weight_scale` F8_E4M3 [128 * ceil(N/128), 4 * ceil(K/64)] in cuBLAS's tiled order; `weight_scale_2` F32 []; `input_scale` F32 [] (static inputs) | `e2m1(c) * (s2 * float(s))` (TensorCoreNVFP4Layout) |

N16 / K16: the real size rounded up to 16 (comfy-kitchen pads the weight with zeros; padded
blocks get block scale 0, as its own quantizer writes them). The tiled block-scale layout
(https://docs.nvidia.com/cuda/cublas/#d-block-scaling-factors-layout): the [N, K/16] scale
matrix, zero-padded to multiples of (128, 4), is cut into 128 x 4 tiles stored one after another
in row-major tile order (512 elements each), and inside a tile the scale of (row r, column c)
is element (r % 32) * 16 + (r // 32) * 4 + c; the stored tensor keeps the padded matrix's shape. `weight_scale_2` is multiplicative (amax / 2688),
as in diffquant. `input_scale` is the static activation scale: fp8 amax / 448, nvfp4 the per-tensor
scale amax / 2688 (diffquant's `input_scale_2`); without it ComfyUI computes both per call, which
is what diffquant's dynamic inputs do.

Refused, with a recipe that fits: int8 with a static input scale (ComfyUI's int8_tensorwise
quantizes activations per row at run time and reads no input_scale: int8_weight_only), asymmetric
or 4-bit integer weights, mxfp4, SVDQuant branches, per-channel fp8 (one weight scale per tensor).
Conv2d layers: ComfyUI quantizes only Linear layers, so a quantized Conv2d is refused unless the
option `conv="dequantize"` is given, which writes its dequantized weight in the layer's dtype and
says so in the report. Flux is written in BFL's names with qkv / linear1 fused (`common.fuse_group`
requantizes a group whose parts' tensor-wide scales differ and reports the SQNR), SD/SDXL UNets in
LDM names (`keys.py`); `prefix` (default none, a "diffusion model" file) is put in front of every key.

Example:
    >>> swizzle_block_scales(torch.arange(8.0).reshape(2, 4)).shape
    torch.Size([128, 4])
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
from diffquant.quant.formats.pack import unpack_nibbles

FORMATS = {"fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2", "int8": "int8_tensorwise", "nvfp4": "nvfp4"}
CONV_MODES = ("refuse", "dequantize")


def export(checkpoint: Path, out: Path, conv: str = "refuse", prefix: str = "", **options: Any) -> ExportReport:
    """Write `checkpoint` to the single file `out` (see the module docstring)."""
    if options:
        raise ConfigError(f"comfyui takes the options conv and prefix, not {', '.join(sorted(options))}", "drop them")
    if conv not in CONV_MODES:
        raise ConfigError(f"comfyui option conv={conv!r} is not allowed", f"use one of {', '.join(CONV_MODES)}")
    contents = read_checkpoint(checkpoint)
    convs = [r for r in contents.layers.values() if r.type == "Conv2d"]
    if convs and conv == "refuse":
        raise ConfigError(
            f"recipe {contents.recipe}: ComfyUI quantizes only Linear layers, and {len(convs)} Conv2d layers are quantized (e.g. {convs[0].name})",
            "exclude them in the recipe (exclude: ['*conv*', '*samplers*']) or pass conv='dequantize'",
        )
    svd = [record for record in contents.layers.values() if record.svd is not None]
    for record in svd or contents.layers.values():
        if record.type == "Linear":
            _check_layer(record.name, record.weight, record.input, record.svd is not None, contents.recipe)
    keymap = original_key_map(contents.family, [*contents.tensors, *(f"{n}.weight" for n in contents.layers)])
    keymap.prefix = prefix
    layers, tensors, notes = original_layout(contents, keymap)
    report = ExportReport(format="comfyui", out=Path(out), notes=notes)
    layer_confs: dict[str, dict[str, Any]] = {}
    for layer in layers:
        if layer.record.type == "Conv2d":
            tensors[f"{layer.key}.weight"] = contents.dequantized(layer.record, getattr(torch, layer.record.dtype))
            report.layers["dequantized Conv2d"] = report.layers.get("dequantized Conv2d", 0) + 1
            continue
        conf, layer_tensors = comfy_tensors(layer)
        tensors.update(layer_tensors)
        layer_confs[layer.key] = conf
        tensors[f"{layer.key}.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
        report.layers[conf["format"]] = report.layers.get(conf["format"], 0) + 1
    if "dequantized Conv2d" in report.layers:
        report.notes.append(f"{report.layers['dequantized Conv2d']} quantized Conv2d layers written dequantized (ComfyUI has no quantized Conv2d)")
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layer_confs}, sort_keys=True),
                "diffquant.export": json.dumps({"format": "comfyui", "recipe": contents.recipe}, sort_keys=True)}  # fmt: skip
    write_safetensors_atomic(Path(out), tensors, metadata)
    report.files.append(str(out))
    return report


def comfy_tensors(layer: OriginalLayer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The `comfy_quant` dict and the tensors of one quantized Linear (see the module docstring)."""
    k, spec = layer.key, layer.spec
    conf = {"format": FORMATS[spec.dtype]}
    if spec.dtype == "nvfp4":
        codes = unpack_nibbles(layer.stored["weight_packed"])
        out = {f"{k}.weight": pack_high_first(_pad_to_16(codes)),
               f"{k}.weight_scale": swizzle_block_scales(layer.stored["weight_scale"]),
               f"{k}.weight_scale_2": layer.stored["weight_scale_2"].float().reshape(())}  # fmt: skip
        if "input_scale_2" in layer.inputs:
            out[f"{k}.input_scale"] = layer.inputs["input_scale_2"].float().reshape(())
        return conf, out
    out = {f"{k}.weight": layer.stored["weight"], f"{k}.weight_scale": layer.stored["weight_scale"].float()}
    if "input_scale" in layer.inputs:
        out[f"{k}.input_scale"] = layer.inputs["input_scale"].float().reshape(())
    return conf, out


def pack_high_first(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] -> bytes [N, K/2] with code[2k] in the high nibble (comfy-kitchen's order).

    Example:
        >>> pack_high_first(torch.tensor([[1, 2]], dtype=torch.uint8))
        tensor([[18]], dtype=torch.uint8)
    """
    return (codes[..., 0::2] << 4) | codes[..., 1::2]


def swizzle_block_scales(scales: torch.Tensor) -> torch.Tensor:
    """Block scales [R, C] -> cuBLAS's tiled layout, stored as [128 * ceil(R/128), 4 * ceil(C/4)] (zero-padded).

    The stored tensor has the padded shape; its elements, read in memory order, are the tiles.
    """
    rows, cols = scales.shape
    row_tiles, col_tiles = -(-rows // 128), -(-cols // 4)
    padded = torch.zeros(row_tiles * 128, col_tiles * 4, dtype=scales.dtype)
    padded[:rows, :cols] = scales
    # [tile_r, 4 (r // 32), 32 (r % 32), tile_c, 4 (c)] -> [tile_r, tile_c, r % 32, r // 32, c]
    tiles = padded.view(row_tiles, 4, 32, col_tiles, 4).permute(0, 3, 2, 1, 4)
    return tiles.reshape(row_tiles * 128, col_tiles * 4)


def _pad_to_16(codes: torch.Tensor) -> torch.Tensor:
    rows, cols = codes.shape
    pad_rows, pad_cols = -rows % 16, -cols % 16
    return torch.nn.functional.pad(codes, (0, pad_cols, 0, pad_rows)) if pad_rows or pad_cols else codes


def _check_layer(name: str, weight: dict[str, Any], inputs: dict[str, Any] | None, svd: bool, recipe: str) -> None:
    dtype, granularity = weight.get("dtype"), weight.get("granularity")
    where = f"recipe {recipe}, layer {name}"
    static = inputs is not None and not inputs.get("dynamic", False)
    if svd:
        raise ConfigError(f"{where}: ComfyUI's layouts have no SVDQuant low-rank branch", "quantize with recipe fp8, nvfp4 or int8_weight_only")
    if dtype in ("fp8_e4m3", "fp8_e5m2"):
        if granularity != "per_tensor":
            raise ConfigError(f"{where}: ComfyUI's float8 layout has one weight scale per tensor, not {granularity}", "quantize with recipe fp8")
        if inputs is not None and inputs.get("dtype") != dtype:
            raise ConfigError(f"{where}: ComfyUI quantizes a float8 layer's inputs to {dtype}, the recipe to {inputs.get('dtype')}", "quantize with recipe fp8")
        return
    if dtype == "int8" and weight.get("symmetric", True) and granularity in ("per_tensor", "per_channel"):
        if static or inputs is not None:
            raise ConfigError(
                f"{where}: ComfyUI's int8_tensorwise quantizes activations per row at run time and reads no input scale",
                "quantize with recipe int8_weight_only",
            )
        return
    if dtype == "nvfp4":
        if inputs is not None and inputs.get("dtype") != "nvfp4":
            raise ConfigError(f"{where}: ComfyUI quantizes an nvfp4 layer's inputs to nvfp4", "quantize with recipe nvfp4")
        return
    raise ConfigError(
        f"{where}: {dtype} {granularity}{'' if weight.get('symmetric', True) else ' asymmetric'} weights have no ComfyUI layout",
        "quantize with recipe fp8, nvfp4 or int8_weight_only",
    )
