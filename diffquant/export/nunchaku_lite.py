"""Export to diffusers' Nunchaku Lite backend (`quant_method: nunchaku_lite`, diffusers 0.42.1).

The output is one diffusers component folder: `config.json` (the model's config plus the compact
`quantization_config`) and `diffusion_pytorch_model.safetensors` under the standard diffusers
module names. diffusers replaces every listed target with its own `SVDQW4A4Linear` or
`AWQW4A16Linear` (diffusers/quantizers/nunchaku/utils.py) and requires the checkpoint's keys to be
exactly the patched model's parameters; the layouts are nunchaku's (`nunchaku_pack`).

| diffquant layer | backend section | tensors |
|---|---|---|
| int4 sym. g64 weights, dynamic int4 g64 inputs (w4a4, svdquant_w4a4) | `svdq_w4a4`, precision int4 | qweight (codes), wscales [K/64, N], smooth_factor, proj_down, proj_up, bias |
| nvfp4 weights, dynamic nvfp4 inputs (nvfp4) | `svdq_w4a4`, precision nvfp4 | qweight (E2M1 codes), wscales E4M3 [K/16, N], wtscale [1] = weight_scale_2, wcscales = 1 |
| int4 g64 weights, 16-bit inputs (w4a16) | `awq_w4a16` | qweight int32 [N/4, K/2] (TinyChat order), wscales, wzeros [K/64, N] |

Numerics. The codes are diffquant's, unchanged. What the backend holds in `compute_dtype`
(bfloat16 or float16; default the model's dtype where it is one of them, else bfloat16) is rounded to it once, to nearest: the int4
group scales (relative change <= 2^-8 in bf16, 2^-11 in fp16), `weight_scale_2` (as wtscale), the
smoothing factor, and `proj_down`, which is `lora_down / smooth_factor` transposed because the
kernel feeds the unsmoothed x to the low-rank branch (`quantize_w4a4_act_fuse_lora` computes
x @ proj_down before dividing x by smooth_factor), so (x / s) @ lora_down^T = x @ (lora_down / s)^T.
AWQ dequantizes q_u * s + z with q_u = q + 8 and z = -8 s. Layers without an SVD branch get a
zero branch of the section's rank (16 when no layer has one), exact: it adds 0. A layer
quantized without smoothing gets smooth_factor = 1.

Tiles: nunchaku's W4A4 kernels take N and K in multiples of 128 and the rank in multiples of 16
(AWQ: N in multiples of 4, K of 64), and diffusers allocates the unpadded shapes, so a quantized layer off those tiles is refused, or, with
`dense_unfit=True`, written as a plain Linear holding diffquant's dequantized weight (its inputs
are then not quantized; the report says which). Refused: static input scales, int8 / fp8 / mxfp4
weights, groups other than 64 (int4) or 16 (nvfp4), asymmetric W4A4, an SVD branch on a
weight-only layer (AWQ has none), Conv2d.

nunchaku's own single-file Flux layout (ComfyUI-nunchaku, SGLang's `nunchaku-svdq`), with its
renames, fused q/k/v, split proj_out and AWQ modulation linears on top of this packing, is
`nunchaku_flux` (`--to nunchaku-flux`).

Example:
    >>> nunchaku_config("bfloat16", {"svdq_w4a4": ("int4", 64, 32, ["proj"])})["svdq_w4a4"]["rank"]
    32
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from diffquant.artifacts.atomic import partial_path, publish, write_json_atomic
from diffquant.artifacts.checkpoint_records import LayerRecord
from diffquant.errors import ConfigError
from diffquant.export import ExportReport
from diffquant.export.nunchaku_pack import K_ALIGN, RANK_ALIGN, WARP_N, pack_awq_int4, pack_int4_weight, pack_lowrank, pack_micro_scales, pack_scales
from diffquant.export.stored import StoredCheckpoint, component_config, unpack_int4

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
CONFIG_FILE = "config.json"
FITS = "svdquant_w4a4, w4a4, nvfp4 or w4a16"


def export(checkpoint: Path, out: Path, config: Path | None = None, compute_dtype: str | None = None, dense_unfit: bool = False) -> ExportReport:
    """Write `checkpoint` as a Nunchaku Lite component folder `out` (see the module docstring).

    config: the folder holding the model's `config.json` (default: the checkpoint's model source).
    """
    source = StoredCheckpoint.read(checkpoint)
    model_dtype = source.manifest["model"].get("torch_dtype")
    dtype_name = compute_dtype or (model_dtype if model_dtype in ("bfloat16", "float16") else "bfloat16")
    if dtype_name not in ("bfloat16", "float16"):
        raise ConfigError(f"Nunchaku Lite compute_dtype {dtype_name!r} is not allowed", "use bfloat16 or float16")
    dtype = getattr(torch, dtype_name)
    report = ExportReport(format="nunchaku-lite", out=Path(out))
    kinds = {record.name: _section(source, record) for record in source.layers}
    fits = {record.name: _fits(record, kinds[record.name][0]) for record in source.layers}
    unfit = [r for r in source.layers if not fits[r.name]]
    if unfit and not dense_unfit:
        first = unfit[0]
        raise ConfigError(
            f"{len(unfit)} quantized layers are off nunchaku's tiles (N, K multiples of {WARP_N}; e.g. {first.name} {list(first.shape)})",
            "pass dense_unfit=True to write them as plain dequantized Linear layers, or exclude them in the recipe",
        )
    ranks = {r.svd.rank for r in source.layers if r.svd is not None and fits[r.name]}
    if len(ranks) > 1:
        raise ConfigError(f"the SVD ranks {sorted(ranks)} differ between layers; the backend takes one rank per section", "quantize with one svdquant rank")
    rank = ranks.pop() if ranks else RANK_ALIGN
    if rank % RANK_ALIGN:
        raise ConfigError(f"SVD rank {rank} is not a multiple of {RANK_ALIGN}", f"quantize with a rank that is a multiple of {RANK_ALIGN}")

    owned = {key for record in source.layers for key in record.tensor_names()}
    tensors = {name: tensor for name, tensor in source.tensors.items() if name not in owned}
    sections: dict[str, tuple[str, int, int, list[str]]] = {}
    for record in source.layers:
        if not fits[record.name]:
            tensors[f"{record.name}.weight"] = source.dequantized(record, source.compute_dtype).contiguous()
            if record.bias is not None:
                tensors[f"{record.name}.bias"] = source.tensors[record.bias]
            report.layers["dense (off the 128 tiles)"] = report.layers.get("dense (off the 128 tiles)", 0) + 1
            continue
        section, precision, group = kinds[record.name]
        packed = _svdq_tensors(source, record, precision, rank, dtype) if section == "svdq_w4a4" else _awq_tensors(source, record, dtype)
        tensors.update({f"{record.name}.{suffix}": value.contiguous() for suffix, value in packed.items()})
        entry = sections.setdefault(section, (precision, group, rank if section == "svdq_w4a4" else 0, []))
        if entry[:2] != (precision, group):
            raise ConfigError(f"layer {record.name} is {precision} g{group} but section {section} already holds {entry[0]} g{entry[1]}", "quantize with one weight format")
        entry[3].append(record.name)
        report.layers[f"{section} {precision}"] = report.layers.get(f"{section} {precision}", 0) + 1
    dense = [r.name for r in source.layers if not fits[r.name]]
    if dense:
        report.notes.append(f"written dense, inputs not quantized (off the tiles): {', '.join(dense)}")
    if not sections:
        raise ConfigError("no quantized layer fits nunchaku's tiles, so the Nunchaku Lite backend would have nothing to load", "quantize a model whose Linear layers are multiples of 128 wide")

    model_config = component_config(source, config)
    model_config["quantization_config"] = nunchaku_config(dtype_name, sections)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(out / WEIGHTS_FILE)
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    publish(tmp, out / WEIGHTS_FILE)
    write_json_atomic(out / CONFIG_FILE, model_config)
    report.files += [CONFIG_FILE, WEIGHTS_FILE]
    report.notes.append(f"compute_dtype {dtype_name}: scales, smooth_factor and proj_down rounded to it once")
    return report


def nunchaku_config(compute_dtype: str, sections: dict[str, tuple[str, int, int, list[str]]]) -> dict[str, Any]:
    """The compact `quantization_config` (NunchakuLiteQuantizationConfig's fields)."""
    config: dict[str, Any] = {"quant_method": "nunchaku_lite", "compute_dtype": compute_dtype}
    for section, (precision, group, rank, targets) in sections.items():
        config[section] = {"precision": precision, "group_size": group, "targets": list(targets)}
        if section == "svdq_w4a4":
            config[section]["rank"] = rank
    return config


def _section(source: StoredCheckpoint, record: LayerRecord) -> tuple[str, str, int]:
    """(backend section, precision, group size) of a layer, or ConfigError naming a recipe that fits."""
    weight, inputs = record.weight, record.input
    here = f"layer {record.name} ({source.recipe_name})"
    if record.type != "Linear":
        raise ConfigError(f"{here} is a {record.type}; Nunchaku Lite replaces only Linear layers", "exclude Conv2d layers in the recipe")
    if inputs is not None and not inputs.get("dynamic"):
        raise ConfigError(f"{here} has static input scales, which Nunchaku Lite cannot carry (its activations are dynamic)", f"quantize with {FITS}")
    if weight["dtype"] == "int4" and weight.get("group_size") == 64 and weight.get("symmetric", True) and "weight_zero_point" not in record.tensors:
        if inputs is None:
            if record.svd is not None:
                raise ConfigError(f"{here} has an SVD low-rank branch but 16-bit inputs; the AWQ W4A16 layout has no low-rank branch", "quantize with svdquant_w4a4 or w4a16")
            return "awq_w4a16", "int4", 64
        if inputs["dtype"] == "int4" and inputs.get("group_size") == 64 and inputs.get("symmetric", True):
            if inputs.get("shift") is not None:
                raise ConfigError(f"{here} quantizes its inputs shifted by {inputs['shift']} onto unsigned int4, which Nunchaku Lite's "
                                  "SVDQW4A4Linear does not (it runs signed int4 inputs)", "export --to nunchaku-flux, or quantize with svdquant_w4a4")
            if inputs.get("scale_rule", "qmax") != "qmax":
                # nunchaku's W4A4 kernel scales activations by amax / 7 (QVALUE_MAX = 7) at run time.
                raise ConfigError(f"{here} quantizes its int4 inputs with scale_rule {inputs['scale_rule']!r}, but nunchaku's kernel "
                                  "scales them by amax / 7 at run time, so the export would not compute what was measured",
                                  "quantize the inputs with scale_rule: qmax (the default of svdquant_w4a4)")
            return "svdq_w4a4", "int4", 64
    if weight["dtype"] == "nvfp4" and inputs is not None and inputs["dtype"] == "nvfp4":
        return "svdq_w4a4", "nvfp4", 16
    if record.svd is not None and weight["dtype"] == "nvfp4" and inputs is None:
        raise ConfigError(f"{here} is nvfp4 weight-only with an SVD branch; Nunchaku Lite's nvfp4 is W4A4", "quantize with nvfp4 or svdquant_w4a4")
    raise ConfigError(f"{here} stores {weight['dtype']} weights with {inputs['dtype'] if inputs else '16-bit'} inputs, which Nunchaku Lite has no kernel for", f"quantize with {FITS}")


def _fits(record: LayerRecord, section: str) -> bool:
    """W4A4 takes whole MMA tiles; the AWQ kernels take N in 4-row and K in 64-code steps."""
    if section == "awq_w4a16":
        return record.out_features % 4 == 0 and record.in_features % 64 == 0
    return record.out_features % WARP_N == 0 and record.in_features % K_ALIGN == 0


def _svdq_tensors(source: StoredCheckpoint, record: LayerRecord, precision: str, rank: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    stored = source.stored(record)
    out, k = record.out_features, record.in_features
    if precision == "int4":
        codes = unpack_int4(stored["weight_packed"], signed=True)
        tensors = {"wscales": pack_scales(stored["weight_scale"].to(dtype))}
    else:
        codes = unpack_int4(stored["weight_packed"], signed=False)
        tensors = {
            "wscales": pack_micro_scales(stored["weight_scale"]),
            "wcscales": pack_scales(torch.ones(out, 1, dtype=dtype)),
            "wtscale": stored["weight_scale_2"].reshape(1).to(dtype),
        }
    tensors["qweight"] = pack_int4_weight(codes)
    if record.svd is not None:
        svd = {suffix: source.tensors[key] for suffix, key in record.svd.tensors.items()}
        smooth = svd["smooth_factor"].float()
        down = (svd["lora_down"].float() / smooth.reshape(1, -1)).to(dtype)
        up = svd["lora_up"].to(dtype)
        if down.shape[0] != rank:
            raise ConfigError(f"layer {record.name} has rank {down.shape[0]}, the section {rank}", "quantize with one svdquant rank")
    else:
        smooth = torch.ones(k)
        down, up = torch.zeros(rank, k, dtype=dtype), torch.zeros(out, rank, dtype=dtype)
    tensors["smooth_factor"] = pack_scales(smooth.to(dtype).reshape(k, 1))
    tensors["proj_down"] = pack_lowrank(down, down=True)
    tensors["proj_up"] = pack_lowrank(up, down=False)
    if record.bias is not None:
        tensors["bias"] = pack_scales(source.tensors[record.bias].to(dtype).reshape(out, 1))
    return tensors


def _awq_tensors(source: StoredCheckpoint, record: LayerRecord, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    bias = source.tensors[record.bias] if record.bias is not None else None
    return awq_tensors(source.int_codes(record), source.stored(record)["weight_scale"], bias, dtype)


def awq_tensors(codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`awq_w4a16` tensors of signed int4 codes [N, K] with group-64 scales [N, K/64] (and a bias [N])."""
    scale = scale.to(dtype)
    tensors = {
        "qweight": pack_awq_int4(codes + 8),
        "wscales": scale.t().contiguous(),
        "wzeros": (-8 * scale.float()).to(dtype).t().contiguous(),
    }
    if bias is not None:
        tensors["bias"] = bias.to(dtype)
    return tensors
