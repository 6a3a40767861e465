"""Export to torchao's safetensors layout, as diffusers' `TorchAoConfig` backend loads it
(`from_pretrained` of a component folder; torchao 0.18, diffusers 0.42.1).

diffusers saves a torchao-quantized model by flattening each tensor subclass into plain tensors
(`<m>._weight_qdata`, `<m>._weight_scale`, ...) plus a JSON description of the subclass in the
safetensors header (`torchao.prototype.safetensors.flatten_tensor_state_dict`), and reloads it
with `unflatten_tensor_state_dict`. This export builds the same subclasses from diffquant's codes
with torchao's own constructors and flattens them with torchao's own function, so the file is
byte for byte what `save_pretrained` would write for those tensors:

| diffquant | torchao tensor | `quant_type` |
|---|---|---|
| int8 symmetric, per-tensor or per-channel (int8_weight_only) | `Int8Tensor` qdata I8 [N, K], scale F32 [N, 1], zero_point I8 [N, 1] = 0, block [1, K] | `Int8WeightOnlyConfig` (PerRow) |
| fp8 e4m3 weight-only, per-tensor or per-channel | `Float8Tensor` qdata F8_E4M3 [N, K], scale F32 [N, 1], block [1, K] | `Float8WeightOnlyConfig` (PerRow) |

A per-tensor scale is repeated on every row: the same values dequantize. torchao dequantizes
`(q - 0) * scale` in float32 and rounds once to the model dtype, as diffquant does, so the
weights are bit-identical. The int8 forward is not: for a per-row `Int8Tensor` torchao computes
bf16(bf16(x @ q^T) * bf16(s)) instead of a matmul with the dequantized weight, which moves the
output SQNR by 0.58 dB on tiny-flux. No choice of stored scale removes that (the bf16 roundings
are of the product and of the accumulation, not of s alone); the exporter-side fix is the
subclass: `int8_tensor="IntxUnpackedToInt8Tensor"` writes `IntxUnpackedToInt8Tensor` (same qdata,
scale F32 [N, 1], zero_point I8 [N, 1] = 0, block [1, K]) under `IntxWeightOnlyConfig(int8,
PerAxis(0))`, whose linear dequantizes (q - 0) * s to the model dtype and calls F.linear:
diffquant's forward, same output SQNR (tiny-flux), at the cost of torchao's int8 matmul. Its
scale is reloaded in the model's dtype (diffusers casts it), so the weights equal diffquant's
where the stored scale is a value of that dtype: the INT8 recipes' `scale_dtype: model` makes it
one (a float32 scale would move each weight by up to |q| 2^-9 s in a bf16 model).
Refused, in one line naming a recipe that fits: any quantized input
(torchao's int8 / fp8 activation configs quantize dynamically, per token, and diffquant's w8a8
recipes freeze a static scale), int4 (torchao 0.18's `Int4PlainInt32Tensor.from_hp` raises
"does not support device 'cpu'", and its int4 layouts take asymmetric uint4 codes with a
zero point per group, so no CPU check could cover it), mxfp4 / nvfp4, per-group int8,
zero points, SVDQuant branches, Conv2d (diffusers' torchao path quantizes Linear layers).

Example:
    >>> TORCHAO_CONFIGS["int8"]
    'Int8WeightOnlyConfig'
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffquant.artifacts.atomic import partial_path, publish, write_json_atomic
from diffquant.artifacts.checkpoint_records import LayerRecord
from diffquant.errors import ConfigError
from diffquant.export import ExportReport
from diffquant.export.stored import StoredCheckpoint, component_config, refuse_inputs, refuse_svd

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
TORCHAO_CONFIGS = {"int8": "Int8WeightOnlyConfig", "fp8_e4m3": "Float8WeightOnlyConfig"}
FITS = "int8_weight_only"
INT8_TENSORS = ("Int8Tensor", "IntxUnpackedToInt8Tensor")


def export(checkpoint: Path, out: Path, config: Path | None = None, int8_tensor: str = "Int8Tensor") -> ExportReport:
    """Write `checkpoint` as a torchao-quantized diffusers component folder `out` (module docstring).

    int8_tensor: the torchao subclass of int8 weights, `Int8Tensor` (int8 matmul) or
    `IntxUnpackedToInt8Tensor` (dequantizes first: the forward diffquant computes).
    """
    from diffusers import TorchAoConfig
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
    import torchao.quantization as tq

    if int8_tensor not in INT8_TENSORS:
        raise ConfigError(f"int8_tensor={int8_tensor!r} is not a torchao int8 weight tensor this export writes", f"pass one of {', '.join(INT8_TENSORS)}")
    source = StoredCheckpoint.read(checkpoint)
    refuse_inputs(source, "torchao's weight-only layouts (its activation configs are dynamic, per token)", FITS)
    refuse_svd(source, "torchao's layout", FITS)
    kinds = {r.weight["dtype"] for r in source.layers}
    for record in source.layers:
        _check(source, record)
    if len(kinds) != 1:
        raise ConfigError(f"recipe {source.recipe_name} mixes {sorted(kinds)} weights; a torchao config holds one", f"quantize with {FITS}")
    kind = kinds.pop()
    report = ExportReport(format="torchao", out=Path(out))
    owned = {key for record in source.layers for key in record.tensor_names()}
    state: dict[str, torch.Tensor] = {name: tensor for name, tensor in source.tensors.items() if name not in owned}
    dtype = source.compute_dtype
    for record in source.layers:
        stored = source.stored(record)
        n, k = record.out_features, record.in_features
        scale = stored["weight_scale"].float().reshape(-1, 1).expand(n, 1).contiguous()
        qdata = stored["weight"].reshape(n, k).contiguous()
        if kind == "int8" and int8_tensor == "IntxUnpackedToInt8Tensor":
            weight = tq.IntxUnpackedToInt8Tensor(qdata, scale, torch.zeros(n, 1, dtype=torch.int8), torch.int8, (1, k), dtype, None)
        elif kind == "int8":
            weight = tq.Int8Tensor(qdata, scale, [1, k], dtype, zero_point=torch.zeros(n, 1, dtype=torch.int8))
        else:
            weight = tq.Float8Tensor(qdata, scale, block_size=[1, k], dtype=dtype)
        state[f"{record.name}.weight"] = weight
        if record.bias is not None:
            state[f"{record.name}.bias"] = source.tensors[record.bias]
        report.layers[TORCHAO_CONFIGS[kind]] = report.layers.get(TORCHAO_CONFIGS[kind], 0) + 1
    tensors, metadata = flatten_tensor_state_dict(state)
    if kind == "int8" and int8_tensor == "IntxUnpackedToInt8Tensor":
        quant = tq.IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=tq.PerAxis(0))
    elif kind == "int8":
        quant = tq.Int8WeightOnlyConfig(version=2)
    else:
        quant = tq.Float8WeightOnlyConfig()
    skipped = sorted(entry["name"] for entry in source.manifest.get("skipped", []))
    model_config = component_config(source, config)
    model_config["quantization_config"] = TorchAoConfig(quant, modules_to_not_convert=skipped).to_dict()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(out / WEIGHTS_FILE)
    from safetensors.torch import save_file

    save_file({key: value.contiguous() for key, value in tensors.items()}, str(tmp), metadata={"format": "pt", **metadata})
    publish(tmp, out / WEIGHTS_FILE)
    write_json_atomic(out / "config.json", model_config)
    report.files += ["config.json", WEIGHTS_FILE]
    return report


def _check(source: StoredCheckpoint, record: LayerRecord) -> None:
    here = f"layer {record.name} ({source.recipe_name})"
    if record.type != "Linear":
        raise ConfigError(f"{here} is a {record.type}; diffusers' torchao path quantizes Linear layers", "export a transformer model (Flux, SD3, PixArt)")
    weight = record.weight
    if weight["dtype"] not in TORCHAO_CONFIGS:
        why = " (torchao 0.18's int4 tensors have no CPU path)" if weight["dtype"] in ("int4", "uint4") else ""
        raise ConfigError(f"{here} stores {weight['dtype']} weights, which this torchao export does not map{why}", f"quantize with {FITS}")
    if weight.get("granularity") not in ("per_tensor", "per_channel") or "weight_zero_point" in record.tensors:
        raise ConfigError(f"{here} has {weight.get('granularity')} scales or zero points; torchao's weight-only configs here are symmetric per-row", f"quantize with {FITS}")
