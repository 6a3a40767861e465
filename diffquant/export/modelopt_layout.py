"""`modelopt`: a component folder in NVIDIA ModelOpt's diffusers export layout (FP8, NVFP4).

SGLang-Diffusion and vLLM-Omni load pre-quantized diffusion models from what ModelOpt's
`export_hf_checkpoint` writes for a diffusers component (`modelopt/torch/export/
unified_export_hf.py` `_export_diffusers_checkpoint`): `save_pretrained` files, diffusers key
names, and `config.json` with a `quantization_config`:

    out/
      config.json                           the model config + quantization_config
      diffusion_pytorch_model.safetensors   metadata: quantization_config (JSON)

`quantization_config` is what ModelOpt's `convert_hf_quant_config_format` makes of its own
`{"quantization": {"quant_algo", "group_size", "exclude_modules"}}`: `config_groups.group_0`
(weights / input_activations: num_bits, type float, dynamic false, group_size; targets Linear),
`ignore` (the layers left unquantized), `quant_algo`, `producer` and `quant_method: modelopt`.
A quantized Linear (or, for FP8, Conv2d) `<m>` stores (`_export_quantized_weight`):

| quant_algo | recipe | tensors (dtype, shape) |
|---|---|---|
| FP8 | fp8 | `<m>.weight` F8_E4M3; `<m>.weight_scale` F32 [] = amax / 448; `<m>.input_scale` F32 [] = amax_in / 448 |
| NVFP4 | nvfp4_static | `<m>.weight` U8 [N, K/2] (low nibble = even index); `<m>.weight_scale` F8_E4M3 [N, K/16]; `<m>.weight_scale_2` F32 [] = amax / 2688; `<m>.input_scale` F32 [] = amax_in / 2688 |
| W4A16_NVFP4 | NVFP4 weights, 16-bit inputs | as NVFP4 without `input_scale` |

These are diffquant's bytes under ModelOpt's names (`weight_packed` -> `weight`, `input_scale_2`
-> `input_scale`): the codes, the E4M3 block scales (clamped to [2^-9, 448] like ModelOpt) and
both global scales are computed by the same rules. Like ModelOpt, NVFP4 q/k/v projections that
share an input (`keys.qkv_groups`) get one `weight_scale_2` and one `input_scale` (the largest of
the group), so runtimes that fuse them load one matrix; a part whose scale changes is requantized
from its dequantized weight and the SQNR that costs is in the report. FP8 groups keep their own
scales, as ModelOpt leaves them. No pickles are written (ModelOpt's own `modelopt_state` restore
path is a pickle; this layout is not).

Refused, with a recipe that fits: dynamic inputs (the layout stores static input scales:
recipe fp8 or nvfp4_static), integer, MXFP4 or per-channel FP8 weights, SVDQuant branches
(ModelOpt's NVFP4_SVD carries NVFP4 residuals; diffquant's SVDQuant residual is INT4), and NVFP4
Conv2d layers (ModelOpt blocks a 4-D weight along its last dim, diffquant along in * kh * kw).

Example:
    >>> quantization_config("NVFP4", ["proj_out"], "0.1.0")["config_groups"]["group_0"]["weights"]
    {'dynamic': False, 'num_bits': 4, 'type': 'float', 'group_size': 16}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from diffquant import __version__
from diffquant.artifacts.atomic import write_json_atomic
from diffquant.artifacts.checkpoint_records import LayerRecord
from diffquant.errors import ConfigError
from diffquant.export import ExportReport
from diffquant.export.common import CheckpointContents, read_checkpoint, requantize_with_global_scale, sqnr_db, write_safetensors_atomic
from diffquant.export.keys import qkv_groups
from diffquant.quant.weights import QuantizedWeight
from diffquant.quant.spec import TensorSpec

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def export(checkpoint: Path, out: Path, config: dict[str, Any] | None = None, **options: Any) -> ExportReport:
    """Write `checkpoint` as a ModelOpt component folder `out` (see the module docstring).

    config: the target's diffusers config (`config.json` content); the export stage passes it.
    """
    if options:
        raise ConfigError(f"modelopt takes the option config, not {', '.join(sorted(options))}", "drop them")
    if config is None:
        raise ConfigError("the modelopt export needs the model's config.json", "run it through `diffquant export` (which passes it)")
    contents = read_checkpoint(checkpoint)
    svd = [record for record in contents.layers.values() if record.svd is not None]
    algos = {_quant_algo(record, contents.recipe) for record in (svd or contents.layers.values())}
    if len(algos) != 1:
        raise ConfigError(f"recipe {contents.recipe} mixes {', '.join(sorted(algos))} layers", "quantize with one of recipe fp8 or nvfp4_static")
    algo = algos.pop()
    report = ExportReport(format="modelopt", out=Path(out))
    tensors = dict(contents.plain_tensors())
    shared = _shared_nvfp4_scales(contents, report) if algo != "FP8" else {}
    for name, record in contents.layers.items():
        tensors.update(modelopt_tensors(contents, record, shared.get(name)))
    report.layers[algo] = len(contents.layers)
    ignore = sorted(entry["name"] for entry in contents.manifest.get("skipped", []))
    qconfig = quantization_config(algo, ignore, __version__)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors_atomic(out / WEIGHTS_NAME, tensors, {"format": "pt", "quantization_config": json.dumps(qconfig, sort_keys=True)})
    write_json_atomic(out / "config.json", {**dict(config), "quantization_config": qconfig})
    report.files += [str(out / WEIGHTS_NAME), str(out / "config.json")]
    return report


def quantization_config(quant_algo: str, ignore: list[str], version: str) -> dict[str, Any]:
    """ModelOpt's `quantization_config` for one quant_algo (as `convert_hf_quant_config_format` writes it)."""
    weights: dict[str, Any] = {"dynamic": False, "num_bits": 8 if quant_algo == "FP8" else 4, "type": "float"}
    if quant_algo != "FP8":
        weights["group_size"] = 16
    group: dict[str, Any] = {"weights": weights, "targets": ["Linear"]}
    if quant_algo != "W4A16_NVFP4":
        group = {"input_activations": dict(weights), **group}
    return {"config_groups": {"group_0": group}, "ignore": list(ignore), "quant_algo": quant_algo,
            "producer": {"name": "diffquant", "version": version}, "quant_method": "modelopt"}  # fmt: skip


def modelopt_tensors(contents: CheckpointContents, record: LayerRecord, shared: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The ModelOpt tensors of one layer; `shared` replaces its stored/input tensors (a qkv group's)."""
    stored = dict(contents.stored(record))
    inputs = dict(contents.input_params(record))
    if shared is not None:
        stored.update({k: v for k, v in shared.items() if not k.startswith("input_")})
        inputs.update({k: v for k, v in shared.items() if k.startswith("input_")})
    m = record.name
    if record.weight["dtype"] == "nvfp4":
        out = {f"{m}.weight": stored["weight_packed"], f"{m}.weight_scale": stored["weight_scale"],
               f"{m}.weight_scale_2": stored["weight_scale_2"].float().reshape(())}  # fmt: skip
        if "input_scale_2" in inputs:
            out[f"{m}.input_scale"] = inputs["input_scale_2"].float().reshape(())
        return out
    # diffquant stores a Conv2d weight flattened to [out, in * kh * kw]; ModelOpt keeps its real shape
    return {f"{m}.weight": stored["weight"].reshape(record.shape), f"{m}.weight_scale": stored["weight_scale"].float().reshape(()),
            f"{m}.input_scale": inputs["input_scale"].float().reshape(())}  # fmt: skip


def _quant_algo(record: LayerRecord, recipe: str) -> str:
    where = f"recipe {recipe}, layer {record.name}"
    dtype, granularity, inputs = record.weight["dtype"], record.weight.get("granularity"), record.input
    if record.svd is not None:
        raise ConfigError(
            f"{where}: ModelOpt's NVFP4_SVD needs an NVFP4 residual with a static input scale, this SVDQuant layer has a {dtype} residual"
            f" and {'dynamic' if inputs is not None else '16-bit'} inputs",
            "quantize with recipe nvfp4_static (no low-rank branch)",
        )
    static = inputs is not None and not inputs.get("dynamic", False)
    if dtype == "fp8_e4m3" and granularity == "per_tensor":
        if not (static and inputs.get("dtype") == "fp8_e4m3" and inputs.get("granularity") == "per_tensor"):
            raise ConfigError(f"{where}: ModelOpt's FP8 stores a static per-tensor fp8 input scale, the checkpoint has none", "quantize with recipe fp8")
        return "FP8"
    if dtype == "nvfp4":
        if record.type == "Conv2d":
            raise ConfigError(f"{where}: ModelOpt blocks a Conv2d weight along kw, diffquant along in*kh*kw", "exclude Conv2d layers (exclude: ['*conv*', '*samplers*'])")
        if inputs is None:
            return "W4A16_NVFP4"
        if not static or inputs.get("dtype") != "nvfp4":
            raise ConfigError(f"{where}: ModelOpt's NVFP4 stores a static NVFP4 input scale, the checkpoint's inputs are dynamic", "quantize with recipe nvfp4_static")
        return "NVFP4"
    raise ConfigError(f"{where}: {dtype} {granularity} weights have no ModelOpt diffusers layout", "quantize with recipe fp8 or nvfp4_static")


def _shared_nvfp4_scales(contents: CheckpointContents, report: ExportReport) -> dict[str, dict[str, torch.Tensor]]:
    """Per layer of each NVFP4 qkv group: the tensors that change when the group shares its scales."""
    shared: dict[str, dict[str, torch.Tensor]] = {}
    for group in qkv_groups(contents.layers):
        records = [contents.layers[name] for name in group]
        scales = [contents.stored(r)["weight_scale_2"].float().reshape(()) for r in records]
        global_scale = torch.stack(scales).amax()
        inputs = [contents.input_params(r).get("input_scale_2") for r in records]
        input_scale = torch.stack([i.float().reshape(()) for i in inputs]).amax() if all(i is not None for i in inputs) else None
        for record, scale, own_input in zip(records, scales, inputs):
            change: dict[str, torch.Tensor] = {}
            if input_scale is not None and not torch.equal(own_input.float().reshape(()), input_scale):
                change["input_scale_2"] = input_scale
            if not torch.equal(scale, global_scale):
                w2 = contents.dequantized(record).reshape(record.out_features, -1)
                change.update(requantize_with_global_scale(w2, global_scale))
                approx = QuantizedWeight(TensorSpec(**record.weight), torch.Size((record.out_features, record.in_features)), change).dequantize(torch.float32)
                report.notes.append(f"{record.name}: requantized to its qkv group's weight_scale_2, weight SQNR {sqnr_db(w2, approx):.2f} dB")
            if change:
                shared[record.name] = change
    return shared
