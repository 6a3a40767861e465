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
| int8 symmetric, per-tensor or per-channel (int8_weight_only) | `IntxUnpackedToInt8Tensor` (default) or `Int8Tensor`: qdata I8 [N, K], scale F32 [N, 1], zero_point I8 [N, 1] = 0, block [1, K] | `IntxWeightOnlyConfig` (int8, PerAxis(0)) or `Int8WeightOnlyConfig` (PerRow) |
| int4 symmetric per-group (w4a16) | `IntxUnpackedToInt8Tensor`: qdata I8 [N, K] (one code per byte), scale F32 [N, K/g], zero_point I8 [N, K/g] = 0, block [1, g] | `IntxWeightOnlyConfig` (int4, PerGroup(g)) |
| fp8 e4m3 weight-only, per-tensor or per-channel | `Float8Tensor` qdata F8_E4M3 [N, K], scale F32 [N, 1], block [1, K] | `Float8WeightOnlyConfig` (PerRow) |
| int8 per-channel / per-tensor weights, dynamic per-token int8 inputs (int8_dynamic) | `Int8Tensor` as above, `act_quant_kwargs` = `QuantizeTensorToInt8Kwargs(PerRow(), SYMMETRIC)` | `Int8DynamicActivationInt8WeightConfig` (PerRow) |
| fp8 e4m3 per-tensor weights, dynamic per-tensor fp8 inputs (fp8_dynamic) | `Float8Tensor` qdata F8_E4M3 [N, K], scale F32 [1, 1], block [N, K], `act_quant_kwargs` = `QuantizeTensorToFloat8Kwargs(e4m3, PerTensor())`, `Float8MMConfig(use_fast_accum=True)` | `Float8DynamicActivationFloat8WeightConfig` (PerTensor) |

A per-tensor scale is repeated on every row: the same values dequantize. torchao dequantizes
`(q - 0) * scale` in float32 and rounds once to the model dtype, as diffquant does, so the
weights are bit-identical. The int8 forward is not: for a per-row `Int8Tensor` torchao computes
bf16(bf16(x @ q^T) * bf16(s)) instead of a matmul with the dequantized weight, which moves the
output SQNR by 0.58 dB on tiny-flux. No choice of stored scale removes that (the bf16 roundings
are of the product and of the accumulation, not of s alone); the exporter-side fix is the
subclass, and it is the default: `IntxUnpackedToInt8Tensor` (same qdata, scale F32 [N, 1],
zero_point I8 [N, 1] = 0, block [1, K]) under `IntxWeightOnlyConfig(int8, PerAxis(0))`, whose
linear dequantizes (q - 0) * s to the model dtype and calls F.linear: diffquant's forward, same
output SQNR (tiny-flux), at the cost of torchao's int8 matmul (`int8_tensor="Int8Tensor"` opts
into it, 0.58 dB). Its scale is reloaded in the model's dtype (diffusers casts it), so the weights
equal diffquant's where the stored scale is a value of that dtype: the INT8 recipes'
`scale_dtype: model` makes it one (a float32 scale would move each weight by up to |q| 2^-8 s in a
bf16 model); where a scale is not, the default falls back to `Int8Tensor` and the report says so.

Dynamic inputs. torchao quantizes each input at every call with its own functions, so the export
carries only the rule, and diffquant's recipe must be that rule exactly (`torchao_input_spec`):
- int8 (`Int8Tensor.from_hp(x, PerRow())` -> `choose_qparams_affine(SYMMETRIC, eps = float32 eps)`
  and `quantize_affine`): per token, s = max(fl_dtype(amax / 127.5), 2^-23), the division done in
  the activation's dtype (bf16: the float32 quotient rounded once to bf16), codes
  clamp(round_half_even(x · fl32(1 / s)), -128, 127). diffquant's spec: `granularity: per_token,
  scale_rule: half_span, scale_dtype: model, rounding: half_even_reciprocal` (the int8_dynamic
  recipe), which gives torchao's codes and scales bit for bit. The one difference left is the
  floor: diffquant raises s to 2^-126 and gives an all-zero token s = 1 (codes 0 either way), so
  only a token with 0 < amax < 127.5 · 2^-23 = 1.5e-5 would get other codes.
  torchao's forward (int8_tensor.py, CPU `_int_scaled_matmul_cpu`): acc = q_x @ q_w^T in int32
  (exact), y = bf16(f32(bf16(f32(acc) · s_x) · s_w) + b). The recipe's input spec `matmul:
  torchao` makes diffquant compute exactly that (`quant/kernels/torchao_matmul.py`, in the exact
  path and the native int8 kernel), so the outputs are torchao's: 47.01 dB on tiny-flux both
  (with the dequantized bf16 GEMM diffquant gave 47.26, 0.24 dB from torchao). A checkpoint
  quantized without it exports all the same, with a note that its figures used the other GEMM.
- fp8 (`Float8Tensor.from_hp(x, PerTensor())` -> `_choose_scale_float8`, `_quantize_affine_float8`):
  per tensor, s = fl_dtype(amax / 448) (no floor: an all-zero input gives s = 0 and NaN outputs in
  torchao, s = 1 and zeros in diffquant), codes fp8(clamp(x / s, -448, 448)). diffquant's spec:
  fp8_dynamic's `scale_dtype: model` on its dynamic per-tensor input, bit for bit otherwise.
  torchao's forward is `torch._scaled_mm(q_x, q_w^T, s_x, s_w, bias, out_dtype=bf16)`, which
  runs on the CPU in torch 2.13; fp8_dynamic's `matmul: torchao` computes the same (a float32
  GEMM of the operands scaled in float32, then the bias: bit for bit with the CPU op), so diffquant's exact path and native fp8
  kernel both give torchao's output SQNR (42.73 dB on tiny-flux, 0.000 dB apart; the dequantized
  bf16 GEMM, which rounds x̂ = q_x s_x and ŵ to bf16 first, gave 42.56 dB). Float8Tensor's PerRow needs per-row scales for
  both operands; diffquant's fp8 recipes have per-tensor ones, so only PerTensor is written.
  torchao skips fp8 layers whose in or out features are not multiples of 16, and they are refused.
int4 weight-only. torchao 0.18's `Int4WeightOnlyConfig` tensors have no CPU path
(`Int4PlainInt32Tensor.from_hp` raises "does not support device 'cpu'", and its int4 layouts
take asymmetric uint4 codes with a zero point per group), so int4 goes as torchao's
`IntxWeightOnlyConfig(int4, PerGroup(g))`, whose `IntxUnpackedToInt8Tensor` runs anywhere: it
dequantizes (q - 0) · s to the model dtype and calls F.linear, diffquant's forward. It holds one
code per byte, in the file and in memory: twice diffquant's packed nibbles, half a bf16 weight.
Its scales reload in the model dtype, so the weights are diffquant's where the stored scales are
values of it (`scale_dtype: model`); w4a16 keeps float32 scales (its equal-settings comparison
with Quark), which moves a bf16 weight by at most |q| 2^-8 s (bf16 rounds a scale to nearest,
within 2^-8 of it), and the report says so.
Refused, in one line naming a recipe that fits: static input scales (torchao's activation
configs quantize dynamically at each call: int8_dynamic / fp8_dynamic fit), dynamic inputs under
any other rule, int4 with inputs or zero points, mxfp4 / nvfp4, per-group int8, SVDQuant
branches, Conv2d (diffusers' torchao path quantizes Linear layers).

Example:
    >>> TORCHAO_CONFIGS["int8"], TORCHAO_CONFIGS["int8_dynamic"]
    ('Int8WeightOnlyConfig', 'Int8DynamicActivationInt8WeightConfig')
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffquant.artifacts.atomic import partial_path, publish, write_json_atomic
from diffquant.artifacts.checkpoint_records import LayerRecord
from diffquant.errors import ConfigError
from diffquant.export import ExportReport
from diffquant.export.stored import StoredCheckpoint, component_config, refuse_svd
from diffquant.quant.spec import HALF_DTYPES, TensorSpec

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
TORCHAO_CONFIGS = {"int8": "Int8WeightOnlyConfig", "fp8_e4m3": "Float8WeightOnlyConfig", "int4": "IntxWeightOnlyConfig",
                   "int8_dynamic": "Int8DynamicActivationInt8WeightConfig", "fp8_e4m3_dynamic": "Float8DynamicActivationFloat8WeightConfig"}
FITS = "int8_weight_only"
DYNAMIC_FITS = {"int8": "int8_dynamic", "fp8_e4m3": "fp8_dynamic"}
INT8_TENSORS = ("Int8Tensor", "IntxUnpackedToInt8Tensor")
RULE_FIELDS = ("dtype", "granularity", "group_size", "symmetric", "dynamic", "scale_rule", "rounding", "scale_dtype")
FP8_ALIGN = 16  # torchao's Float8 configs skip Linear layers whose in / out features are not multiples of 16 (`_fp8_mm_compat`)


def torchao_input_spec(weight_dtype: str, compute_dtype: str) -> TensorSpec:
    """The input quantizer torchao 0.18 runs at each call of a dynamic-activation layer with
    `weight_dtype` weights in a model of `compute_dtype` (module docstring), as a diffquant spec.

    Example:
        >>> torchao_input_spec("int8", "bfloat16").describe()
        'int8 token sym dynamic'
    """
    scale_dtype = compute_dtype if compute_dtype in HALF_DTYPES else None
    if weight_dtype == "int8":
        return TensorSpec("int8", "per_token", dynamic=True, scale_rule="half_span", rounding="half_even_reciprocal", scale_dtype=scale_dtype,
                          matmul="torchao")
    return TensorSpec("fp8_e4m3", "per_tensor", dynamic=True, scale_dtype=scale_dtype, matmul="torchao")


def export(checkpoint: Path, out: Path, config: Path | None = None, int8_tensor: str | None = None) -> ExportReport:
    """Write `checkpoint` as a torchao-quantized diffusers component folder `out` (module docstring).

    int8_tensor: the torchao subclass of int8 weight-only weights, `IntxUnpackedToInt8Tensor`
    (dequantizes first: the forward diffquant computes) or `Int8Tensor` (torchao's int8 path, bf16
    products and scales). By default the first, unless a scale is not a value of the model dtype
    (IntxUnpackedToInt8Tensor reloads its scales in it, so the weights would move): then
    `Int8Tensor`, whose weights stay exact; the report says which and why. Dynamic int8 layers are
    always `Int8Tensor` (torchao's only symmetric int8 dynamic-activation tensor).
    """
    from diffusers import TorchAoConfig
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
    import torchao.quantization as tq
    from torchao.quantization.quantize_.workflows import QuantizeTensorToFloat8Kwargs, QuantizeTensorToInt8Kwargs

    if int8_tensor is not None and int8_tensor not in INT8_TENSORS:
        raise ConfigError(f"int8_tensor={int8_tensor!r} is not a torchao int8 weight tensor this export writes", f"pass one of {', '.join(INT8_TENSORS)}")
    source = StoredCheckpoint.read(checkpoint)
    refuse_svd(source, "torchao's layout", FITS)
    kinds = {_kind(source, record) for record in source.layers}
    if len(kinds) != 1:
        raise ConfigError(f"recipe {source.recipe_name} mixes {sorted(kinds)} layers; a torchao config holds one", f"quantize with {FITS}, int8_dynamic or fp8_dynamic")
    kind = kinds.pop()
    groups = {record.weight.get("group_size") for record in source.layers}
    if kind == "int4" and len(groups) != 1:
        raise ConfigError(f"recipe {source.recipe_name} has int4 groups of {sorted(groups)}; a torchao IntxWeightOnlyConfig holds one group size",
                          "quantize every layer with the same group_size (w4a16: 64)")
    if int8_tensor is not None and kind not in ("int8", "int8_dynamic"):
        raise ConfigError(f"int8_tensor={int8_tensor!r} chooses the tensor of int8 weights, and recipe {source.recipe_name} stores {kind} layers",
                          "drop int8_tensor")
    if kind == "int8_dynamic" and int8_tensor not in (None, "Int8Tensor"):
        raise ConfigError(f"int8_tensor={int8_tensor!r} is weight-only in torchao (its int8 dynamic config quantizes inputs asymmetrically), "
                          f"and recipe {source.recipe_name} quantizes inputs", "drop int8_tensor (Int8Tensor) for int8_dynamic checkpoints")
    report = ExportReport(format="torchao", out=Path(out))
    dtype = source.compute_dtype
    if kind in ("int8_dynamic", "fp8_e4m3_dynamic"):
        other = [r.name for r in source.layers if (r.input or {}).get("matmul", "dequantized") != "torchao"]
        if other:
            report.notes.append(f"{len(other)} layers (first {other[0]}) were computed in diffquant with the dequantized GEMM; torchao runs the "
                                f"GEMM from the codes, so its outputs differ by that rounding (recipe {DYNAMIC_FITS[kind.removesuffix('_dynamic')]} "
                                "computes torchao's: input spec matmul: torchao)")
    # Layers whose scales IntxUnpackedToInt8Tensor (int8 weight-only, int4) would move by reloading them in the model dtype.
    off = [r.name for r in source.layers if not _holds_values_of(source.stored(r)["weight_scale"], dtype)] if kind in ("int8", "int4") else []
    if kind == "int8" and int8_tensor is None:
        int8_tensor = "Int8Tensor" if off else "IntxUnpackedToInt8Tensor"
        report.notes.append(f"int8 weights as {int8_tensor}: " + (
            f"{len(off)} layers' scales (first {off[0]}) are not {dtype} values, which IntxUnpackedToInt8Tensor would reload them as "
            "(Int8Tensor keeps the weights exact; its forward rounds x @ q and the scale to the model dtype)" if off else
            "it dequantizes before F.linear, the forward diffquant computes (int8_tensor='Int8Tensor' for torchao's int8 path)"))
    unpacked = kind == "int8" and int8_tensor == "IntxUnpackedToInt8Tensor"
    if (unpacked or kind == "int4") and off:
        report.notes.append(f"{len(off)} layers' {kind} scales (first {off[0]}) are not {dtype} values; IntxUnpackedToInt8Tensor reloads them in it, "
                            f"which moves each weight by at most |q| · {torch.finfo(dtype).eps / 2:g} · s (a recipe with "
                            "scale_dtype: model stores them exactly)")
    owned = {key for record in source.layers for key in record.tensor_names()}
    state: dict[str, torch.Tensor] = {name: tensor for name, tensor in source.tensors.items() if name not in owned}
    int8_inputs = QuantizeTensorToInt8Kwargs(granularity=tq.PerRow(), mapping_type=tq.MappingType.SYMMETRIC)
    fp8_inputs = QuantizeTensorToFloat8Kwargs(torch.float8_e4m3fn, tq.PerTensor())
    for record in source.layers:
        stored = source.stored(record)
        n, k = record.out_features, record.in_features
        scale = stored["weight_scale"].float().reshape(-1, 1).expand(n, 1).contiguous() if kind != "int4" else None
        qdata = stored["weight"].reshape(n, k).contiguous() if kind != "int4" else None
        zero = torch.zeros(n, 1, dtype=torch.int8)
        if kind == "int4":  # int4 codes unpacked one per int8, a scale per group of g along K
            group = record.weight["group_size"]
            codes = source.int_codes(record).to(torch.int8).reshape(n, k)
            group_scale = stored["weight_scale"].float().reshape(n, k // group).contiguous()
            weight = tq.IntxUnpackedToInt8Tensor(codes, group_scale, torch.zeros(n, k // group, dtype=torch.int8), torch.int4, (1, group), dtype, None)
        elif unpacked:
            weight = tq.IntxUnpackedToInt8Tensor(qdata, scale, zero, torch.int8, (1, k), dtype, None)
        elif kind == "int8":
            weight = tq.Int8Tensor(qdata, scale, [1, k], dtype, zero_point=zero)
        elif kind == "int8_dynamic":
            weight = tq.Int8Tensor(qdata, scale, [1, k], dtype, zero_point=zero, act_quant_kwargs=int8_inputs)
        elif kind == "fp8_e4m3":
            weight = tq.Float8Tensor(qdata, scale, block_size=[1, k], dtype=dtype)
        else:  # fp8_e4m3_dynamic: per-tensor weight and inputs, the layout Float8Tensor.from_hp(PerTensor()) gives
            weight = tq.Float8Tensor(qdata, stored["weight_scale"].float().reshape(1, 1), block_size=[n, k],
                                     mm_config=tq.Float8MMConfig(use_fast_accum=True), act_quant_kwargs=fp8_inputs, dtype=dtype)
        state[f"{record.name}.weight"] = weight
        if record.bias is not None:
            state[f"{record.name}.bias"] = source.tensors[record.bias]
        label = "IntxWeightOnlyConfig" if unpacked else TORCHAO_CONFIGS[kind]
        report.layers[label] = report.layers.get(label, 0) + 1
    tensors, metadata = flatten_tensor_state_dict(state)
    if kind == "int4":
        quant = tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerGroup(source.layers[0].weight["group_size"]))
    elif unpacked:
        quant = tq.IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=tq.PerAxis(0))
    elif kind == "int8":
        quant = tq.Int8WeightOnlyConfig(version=2)
    elif kind == "int8_dynamic":
        quant = tq.Int8DynamicActivationInt8WeightConfig(granularity=tq.PerRow(), act_mapping_type=tq.MappingType.SYMMETRIC)
    elif kind == "fp8_e4m3":
        quant = tq.Float8WeightOnlyConfig()
    else:
        quant = tq.Float8DynamicActivationFloat8WeightConfig(granularity=tq.PerTensor())
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


def _holds_values_of(scale: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether every value of `scale` survives a round trip through `dtype` unchanged."""
    return bool(torch.equal(scale.to(dtype).to(scale.dtype), scale))


def _kind(source: StoredCheckpoint, record: LayerRecord) -> str:
    """The `TORCHAO_CONFIGS` key of one layer; ConfigError naming a recipe that fits otherwise."""
    here = f"layer {record.name} ({source.recipe_name})"
    if record.type != "Linear":
        raise ConfigError(f"{here} is a {record.type}; diffusers' torchao path quantizes Linear layers", "export a transformer model (Flux, SD3, PixArt)")
    weight = record.weight
    if weight["dtype"] in ("int4", "uint4"):
        if weight["dtype"] != "int4" or "weight_zero_point" in record.tensors or weight.get("granularity") != "per_group":
            raise ConfigError(f"{here} has {weight['dtype']} {weight.get('granularity')} weights{' with zero points' if 'weight_zero_point' in record.tensors else ''}; "
                              "this export writes symmetric per-group int4 (IntxWeightOnlyConfig)", "quantize with w4a16")
        if record.input is not None:
            raise ConfigError(f"{here} quantizes its inputs; torchao's int4 config here is weight-only", "quantize with w4a16")
        return "int4"
    if weight["dtype"] not in DYNAMIC_FITS:
        raise ConfigError(f"{here} stores {weight['dtype']} weights, which this torchao export does not map", f"quantize with {FITS} or w4a16")
    if weight.get("granularity") not in ("per_tensor", "per_channel") or "weight_zero_point" in record.tensors:
        raise ConfigError(f"{here} has {weight.get('granularity')} scales or zero points; torchao's configs here are symmetric per-row or per-tensor", f"quantize with {FITS}")
    if record.input is None:
        return weight["dtype"]
    fits = DYNAMIC_FITS.get(record.input["dtype"], "int8_dynamic or fp8_dynamic")
    inputs = TensorSpec(**record.input)
    if not inputs.dynamic:
        raise ConfigError(f"{here} freezes static input scales ({inputs.describe()}); torchao's activation configs quantize inputs dynamically at each call",
                          f"quantize with {fits}, or a weight-only recipe such as {FITS}")
    expected = torchao_input_spec(weight["dtype"], record.dtype)
    if any(getattr(inputs, name) != getattr(expected, name) for name in RULE_FIELDS):
        raise ConfigError(f"{here} quantizes inputs as {_rule(inputs)}; torchao's {TORCHAO_CONFIGS[weight['dtype'] + '_dynamic']} computes {_rule(expected)}",
                          f"quantize with {DYNAMIC_FITS[weight['dtype']]}")
    if weight["dtype"] == "fp8_e4m3":
        if weight["granularity"] != "per_tensor":
            raise ConfigError(f"{here} has per-channel fp8 weights with per-tensor inputs; torchao's Float8 dynamic config takes one granularity for both",
                              "quantize with fp8_dynamic")
        if record.in_features % FP8_ALIGN or record.out_features % FP8_ALIGN:
            raise ConfigError(f"{here} is {record.in_features} -> {record.out_features}; torchao's Float8 dynamic config only quantizes Linear layers "
                              f"whose in and out features are multiples of {FP8_ALIGN}", "exclude the layer in the recipe, or use int8_dynamic")
    return weight["dtype"] + "_dynamic"


def _rule(spec: TensorSpec) -> str:
    """A dynamic input spec's scale rule in words, for the refusals."""
    return f"{spec.describe()} {spec.scale_rule} scale (in {spec.scale_dtype or 'float32'}), rounding {spec.rounding}"
