"""Export to AMD Quark's diffusers layout (`quant_method: "quark"`, amd-quark 0.13, real_quantized).

The output is the folder Quark's own `export_safetensors(model, dir, weight_format="real_quantized")`
writes for a diffusers model: `config.json` (the model's config plus Quark's serialized `QConfig`
with its `export` block) and `diffusion_pytorch_model.safetensors`. Quark reloads it through
`import quark.integrations.diffusers` (which registers `QuarkDiffusersQuantizer` with diffusers)
and `Model.from_pretrained(dir)`: its `_map_to_quark` swaps every non-excluded Linear for a
`QParamsLinear` that dequantizes in the forward. Per quantized Linear `<m>`:

| diffquant | Quark tensors | Quark spec |
|---|---|---|
| int8 symmetric per-tensor | `<m>.weight` I8, `<m>.weight_quantizer.scale` F32 [], `.zero_point` I8 [] = 0 | int8 per_tensor |
| fp8 e4m3 per-tensor | `<m>.weight` F8_E4M3, `<m>.weight_quantizer.scale` F32 [] | fp8_e4m3 per_tensor |
| mxfp4 | `<m>.weight` U8 [N, K/2] (E2M1, low nibble even), `<m>.weight_quantizer.scale` U8 [N, K/32] E8M0 | fp4 per_group 32, scale_format e8m0 |
| static inputs (int8 / fp8 per-tensor) | `<m>.input_quantizer.scale` F32 [] (+ `.zero_point` I8 [] for int8) | the same spec on `input_tensors` |
| nvfp4 (`nvfp4_static`) | `<m>.weight` U8 [N, K/2] (E2M1, low nibble even), `<m>.weight_quantizer.0.scale` F8_E4M3 [N, K/16], `<m>.weight_quantizer.1.scale` F32 [] = amax / 2688 | `ScaleQuantSpec`: fp4 per_group 16 (float32 scales), then fp8_e4m3 per_tensor with `is_scale_quant` |
| nvfp4 static inputs | `<m>.input_quantizer.1.scale` F32 [] = amax_in / 2688 | fp4 per_group 16 dynamic, then the static fp8_e4m3 per-tensor scale of the block scales |

The codes and scales are diffquant's bytes unchanged. Quark's reload keeps every `scale` buffer in
the model's dtype (`RealQuantizer` registers it in `float_dtype`), so with a bf16 model it rounds
a float32 scale to bf16 (nearest even) and dequantizes float32(q) * float32(bf16(s)): per weight
at most |q| 2^-8 s away from diffquant's q * s (MXFP4's E8M0 scales are exact). Static input
scales round the same way, and Quark quantizes x as clamp(round(x / bf16(s)), -128, 127) * bf16(s):
the int8 activation grid moves by up to 2^-8 relative (0.27 dB output SQNR on tiny-flux int8_w8a8).
No exporter-side choice removes it: whatever float32 scale the file holds, the reload rounds it
to the model's dtype; only a scale diffquant had already chosen bf16-exact passes unchanged, which
the quantize-time spec option `scale_dtype: bfloat16` (or `model`, the layer's compute dtype,
which the INT8 recipes use) does (each scale rounded up to a bf16 value): the weights then reload
bit-exact, and what remains is Quark's bf16 arithmetic of x / s and q * s (0.08 dB on tiny-flux
int8_w8a8, measured).

NVFP4 is Quark 0.13's `nvfp4` scheme (`FP4Block16ScaleE4M3Scheme`) with its two-stage
`SequentialRealQuantizer`: the tensor stage (`.0`) holds the E4M3 block scales, the scale stage
(`.1`) the per-tensor scale of those block scales, which is ModelOpt's `weight_scale_2` /
`input_scale` (amax / (6 * 448)); the layout is the one Quark's own `export_safetensors(...,
weight_format="real_quantized")` writes for that scheme (same names, dtypes and shapes, checked
in tests/test_export_quark.py). The input tensor stage is dynamic (block scales per call), so only
the second-stage input scale is stored: this is why Quark's NVFP4 needs diffquant's static input
scale (`nvfp4_static`) and refuses `nvfp4`. The reload again keeps the per-tensor scales in the
model's dtype, so a bf16 model dequantizes e2m1(c) * float32(e4m3(b)) * float32(bf16(s2)): at most
|x| 2^-8 away from diffquant's e2m1(c) * (e4m3(b) * s2) (the block scale and E2M1 are exact).
Layers the recipe skipped go to `exclude`. Refused, in one line naming a recipe that fits: Conv2d layers
(Quark packs only Linear), per-channel / per-group int8 or fp8 (not mapped here), int4 (its
two's-complement nibble order is not Quark's), dynamic inputs (nvfp4 included: Quark's NVFP4
stores a static input scale), asymmetric zero points, and SVDQuant branches.

Example:
    >>> quark_spec({"dtype": "int8", "granularity": "per_tensor", "symmetric": True})["observer_cls"]
    'PerTensorMinMaxObserver'
    >>> [(stage["dtype"], stage["is_dynamic"], stage["is_scale_quant"]) for stage in quark_spec({"dtype": "nvfp4"}, "input")]
    [('fp4', True, False), ('fp8_e4m3', False, True)]
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
from diffquant.export.stored import StoredCheckpoint, component_config, refuse_svd

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
QUARK_VERSION = "0.13"
FITS = "int8_weight_only, int8_w8a8, fp8, mxfp4 or nvfp4_static"


def export(checkpoint: Path, out: Path, config: Path | None = None) -> ExportReport:
    """Write `checkpoint` as a Quark real_quantized diffusers folder `out` (module docstring)."""
    source = StoredCheckpoint.read(checkpoint)
    refuse_svd(source, "Quark's layout", "int8_weight_only, fp8 or mxfp4")
    specs = {(_key(r.weight), _key(r.input)) for r in source.layers}
    if len(specs) > 1:
        raise ConfigError(f"recipe {source.recipe_name} mixes weight/input formats across layers; this export writes one global Quark spec",
                          f"quantize with one format, e.g. {FITS}")
    report = ExportReport(format="quark", out=Path(out))
    owned = {key for record in source.layers for key in record.tensor_names()}
    tensors = {name: tensor for name, tensor in source.tensors.items() if name not in owned}
    for record in source.layers:
        _check(source, record)
        tensors.update(_quark_tensors(source, record))
        if record.bias is not None:
            tensors[f"{record.name}.bias"] = source.tensors[record.bias]
        report.layers[record.weight["dtype"]] = report.layers.get(record.weight["dtype"], 0) + 1
    first = source.layers[0]
    qconfig = {
        "global_quant_config": {"input_tensors": quark_spec(first.input, "input") if first.input else None, "output_tensors": None,
                                "weight": quark_spec(first.weight), "bias": None, "target_device": None},
        "exclude": sorted(entry["name"] for entry in source.manifest.get("skipped", [])),
        "algo_config": None, "softmax_quant_spec": None, "quant_method": "quark", "layer_type_quant_config": {},
        "layer_quant_config": {}, "kv_cache_quant_config": {}, "kv_cache_post_rope": False, "quant_mode": "eager_mode",
        "version": QUARK_VERSION,
        "export": {"weight_merge_groups": None, "kv_cache_group": [], "min_kv_scale": 0.0, "weight_format": "real_quantized", "pack_method": "reorder"},
    }  # fmt: skip
    model_config = component_config(source, config)
    model_config["quantization_config"] = qconfig
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(out / WEIGHTS_FILE)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    publish(tmp, out / WEIGHTS_FILE)
    write_json_atomic(out / "config.json", model_config)
    report.files += ["config.json", WEIGHTS_FILE]
    return report


def quark_spec(spec: dict[str, Any], role: str = "weight") -> dict[str, Any] | list[dict[str, Any]]:
    """Quark 0.13's serialized QTensorConfig (a two-stage list for nvfp4) for a diffquant tensor spec this export maps;
    `role` "input" makes nvfp4's block stage dynamic, as Quark's NVFP4 activations are."""
    base = {"is_dynamic": False, "ch_axis": None, "group_size": None, "block_size": None, "symmetric": True, "round_method": "half_even",
            "scale_type": "float", "zero_point_type": "int32", "scale_format": None, "scale_calculation_mode": None,
            "mx_element_dtype": None, "observer_cls": "PerTensorMinMaxObserver", "is_scale_quant": False, "enable_buffer_reuse": False,
            "max_input_numel": 4194304}  # fmt: skip
    if spec["dtype"] == "int8":
        return {"dtype": "int8", "qscheme": "per_tensor", **base}
    if spec["dtype"] == "fp8_e4m3":
        return {**{"dtype": "fp8_e4m3", "qscheme": "per_tensor"}, **base, "scale_type": None}
    if spec["dtype"] == "mxfp4":
        return {**{"dtype": "fp4", "qscheme": "per_group"}, **base, "ch_axis": -1, "group_size": 32, "symmetric": None, "scale_format": "e8m0",
                "scale_calculation_mode": "even", "observer_cls": "PerBlockMXObserver"}
    if spec["dtype"] == "nvfp4":
        blocks = {**{"dtype": "fp4", "qscheme": "per_group"}, **base, "is_dynamic": role == "input", "ch_axis": -1, "group_size": 16,
                  "symmetric": None, "scale_type": "float32", "scale_format": "float32", "observer_cls": "PerBlockMXObserver"}
        scales = {**{"dtype": "fp8_e4m3", "qscheme": "per_tensor"}, **base, "scale_type": "float32", "is_scale_quant": True}
        return [blocks, scales]
    raise ValueError(f"no Quark spec for {spec['dtype']}")


def _key(spec: dict[str, Any] | None) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in spec.items())) if spec else ()


def _check(source: StoredCheckpoint, record: LayerRecord) -> None:
    here = f"layer {record.name} ({source.recipe_name})"
    if record.type != "Linear":
        raise ConfigError(f"{here} is a {record.type}; Quark's real_quantized diffusers layout packs only Linear layers", "export a transformer model (Flux, SD3, PixArt)")
    weight, inputs = record.weight, record.input
    if weight["dtype"] in ("int8", "fp8_e4m3"):
        if weight.get("granularity") != "per_tensor":
            raise ConfigError(f"{here} has {weight.get('granularity')} {weight['dtype']} scales; this export maps per-tensor ones", f"quantize with {FITS}")
    elif weight["dtype"] not in ("mxfp4", "nvfp4"):
        raise ConfigError(f"{here} stores {weight['dtype']} weights, which this Quark export does not map", f"quantize with {FITS}")
    if any("zero_point" in name for name in (*record.tensors, *record.input_tensors)):
        raise ConfigError(f"{here} has asymmetric zero points; Quark's spec here is symmetric", f"quantize with {FITS}")
    if weight["dtype"] == "nvfp4" and inputs is not None:
        if inputs.get("dynamic") or inputs["dtype"] != "nvfp4":
            raise ConfigError(f"{here} quantizes inputs as {'dynamic ' if inputs.get('dynamic') else ''}{inputs['dtype']}; Quark's NVFP4 stores a static per-tensor input scale",
                              "quantize with nvfp4_static")
    elif inputs is not None:
        if inputs.get("dynamic") or inputs["dtype"] not in ("int8", "fp8_e4m3") or inputs.get("granularity") != "per_tensor":
            raise ConfigError(f"{here} quantizes inputs as {'dynamic ' if inputs.get('dynamic') else ''}{inputs['dtype']} {inputs.get('granularity')}; this export carries static per-tensor int8 / fp8 input scales",
                              "quantize with int8_w8a8, fp8, int8_weight_only or mxfp4")


def _quark_tensors(source: StoredCheckpoint, record: LayerRecord) -> dict[str, torch.Tensor]:
    stored = source.stored(record)
    m = record.name
    if record.weight["dtype"] == "nvfp4":
        tensors = {f"{m}.weight": stored["weight_packed"], f"{m}.weight_quantizer.0.scale": stored["weight_scale"],
                   f"{m}.weight_quantizer.1.scale": stored["weight_scale_2"].float().reshape(())}
        if record.input is not None:
            tensors[f"{m}.input_quantizer.1.scale"] = source.tensors[record.input_tensors["input_scale_2"]].float().reshape(())
        return tensors
    weight = stored["weight_packed"] if record.weight["dtype"] == "mxfp4" else stored["weight"]
    tensors = {f"{m}.weight": weight, f"{m}.weight_quantizer.scale": stored["weight_scale"]}
    if record.weight["dtype"] == "int8":
        tensors[f"{m}.weight_quantizer.zero_point"] = torch.zeros((), dtype=torch.int8)
    if record.input is not None:
        tensors[f"{m}.input_quantizer.scale"] = source.tensors[record.input_tensors["input_scale"]].float()
        if record.input["dtype"] == "int8":
            tensors[f"{m}.input_quantizer.zero_point"] = torch.zeros((), dtype=torch.int8)
    return tensors
