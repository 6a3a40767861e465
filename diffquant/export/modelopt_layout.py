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
| NVFP4_SVD | svdquant_nvfp4_static | as NVFP4 (of the residual), plus `<m>.pre_quant_scale` [K] = 1 / smooth_factor, `<m>.svdquant_lora_a` [r, K] = lora_down, `<m>.svdquant_lora_b` [N, r] = lora_up, all in the model's dtype |

These are diffquant's bytes under ModelOpt's names (`weight_packed` -> `weight`, `input_scale_2`
-> `input_scale`): the codes, the E4M3 block scales (clamped to [2^-9, 448] like ModelOpt) and
both global scales are computed by the same rules. Like ModelOpt, NVFP4 q/k/v projections that
share an input (`keys.qkv_groups`) get one `weight_scale_2` and one `input_scale` (the largest of
the group), so runtimes that fuse them load one matrix; a part whose scale changes is requantized
from its dequantized weight and the SQNR that costs is in the report. FP8 groups keep their own
scales, as ModelOpt leaves them. No pickles are written (ModelOpt's own `modelopt_state` restore
path is a pickle; this layout is not).

NVFP4_SVD is ModelOpt's SVDQuant (`SVDQuantLinear.forward`: x' = x * pre_quant_scale,
y = NVFP4(x') NVFP4(W_res)^T + (x' lora_a^T) lora_b^T, with the static `input_scale` of x'), the
tensors `_promote_quantizer_tensors_to_module` writes and the `lora_rank` of the config group;
diffquant's SVDQuant is the same computation with x' = x / smooth_factor. Rounding it adds, named:
`pre_quant_scale` is 1 / smooth_factor rounded once to the model's dtype (ModelOpt keeps it in
the weight's dtype), so x' moves by at most half an ulp of that dtype relative (2^-8 in bf16,
2^-24 in float32); the low-rank factors are diffquant's (their 16-bit values, exact in the model's
dtype). ModelOpt gives each q/k/v group one averaged pre_quant_scale and one SVD of the stacked
weight (`_update_svdquant`), so its runtimes fuse them; an export of q/k/v parts with different
smoothing factors or down-projections is refused (quantize with `share_groups: qkv`, as recipe
svdquant_nvfp4_static does). Quantized layers without an SVD branch (the model's svd_exclude) get
pre_quant_scale = 1 and zero factors of the common rank, which add exactly 0.

Refused, with a recipe that fits: dynamic inputs (the layout stores static input scales:
recipe fp8, nvfp4_static or svdquant_nvfp4_static), integer, MXFP4 or per-channel FP8 weights,
SVDQuant branches on anything but NVFP4 weights with static NVFP4 inputs, and NVFP4 Conv2d layers
(ModelOpt blocks a 4-D weight along its last dim, diffquant along in * kh * kw).

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
    # SVD layers first, so a refusal names what the low-rank branch needs
    algos = {_quant_algo(record, contents.recipe) for record in sorted(contents.layers.values(), key=lambda r: r.svd is None)}
    if "NVFP4_SVD" in algos:
        algos = {"NVFP4_SVD" if a == "NVFP4" else a for a in algos}  # no branch = a zero branch, exact
    if len(algos) != 1:
        raise ConfigError(f"recipe {contents.recipe} mixes {', '.join(sorted(algos))} layers", "quantize with one of recipe fp8, nvfp4_static or svdquant_nvfp4_static")
    algo = algos.pop()
    report = ExportReport(format="modelopt", out=Path(out))
    tensors = dict(contents.plain_tensors())
    shared = _shared_nvfp4_scales(contents, report) if algo != "FP8" else {}
    rank = _svd_rank(contents) if algo == "NVFP4_SVD" else None
    for name, record in contents.layers.items():
        tensors.update(modelopt_tensors(contents, record, shared.get(name)))
        if rank is not None:
            tensors.update(svd_tensors(contents, record, rank))
    report.layers[algo] = len(contents.layers)
    if rank is not None:
        plain = sum(1 for r in contents.layers.values() if r.svd is None)
        if plain:
            report.notes.append(f"{plain} layers without an SVD branch: pre_quant_scale 1 and zero rank-{rank} factors (exact)")
        report.notes.append(f"pre_quant_scale = 1 / smooth_factor rounded once to {contents.manifest['model'].get('torch_dtype', 'float32')}")
    ignore = sorted(entry["name"] for entry in contents.manifest.get("skipped", []))
    qconfig = quantization_config(algo, ignore, __version__, rank)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors_atomic(out / WEIGHTS_NAME, tensors, {"format": "pt", "quantization_config": json.dumps(qconfig, sort_keys=True)})
    write_json_atomic(out / "config.json", {**dict(config), "quantization_config": qconfig})
    report.files += [str(out / WEIGHTS_NAME), str(out / "config.json")]
    return report


def quantization_config(quant_algo: str, ignore: list[str], version: str, lora_rank: int | None = None) -> dict[str, Any]:
    """ModelOpt's `quantization_config` for one quant_algo (as `convert_hf_quant_config_format` writes it)."""
    weights: dict[str, Any] = {"dynamic": False, "num_bits": 8 if quant_algo == "FP8" else 4, "type": "float"}
    if quant_algo != "FP8":
        weights["group_size"] = 16
    group: dict[str, Any] = {"weights": weights, "targets": ["Linear"]}
    if quant_algo != "W4A16_NVFP4":
        group = {"input_activations": dict(weights), **group}
    if quant_algo == "NVFP4_SVD":
        group = {"input_activations": dict(weights), "weights": weights, "has_zero_point": False, "pre_quant_scale": True, "targets": ["Linear"]}
        if lora_rank is not None:
            group["lora_rank"] = lora_rank
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


def svd_tensors(contents: CheckpointContents, record: LayerRecord, rank: int) -> dict[str, torch.Tensor]:
    """NVFP4_SVD's `pre_quant_scale`, `svdquant_lora_a`, `svdquant_lora_b` of one layer, in the model's dtype
    (a layer without an SVD branch: 1 and zero factors of `rank`)."""
    dtype = getattr(torch, contents.manifest["model"].get("torch_dtype", "float32"))
    m = record.name
    if record.svd is None:
        return {f"{m}.pre_quant_scale": torch.ones(record.in_features, dtype=dtype),
                f"{m}.svdquant_lora_a": torch.zeros(rank, record.in_features, dtype=dtype),
                f"{m}.svdquant_lora_b": torch.zeros(record.out_features, rank, dtype=dtype)}  # fmt: skip
    svd = {suffix: contents.tensors[key] for suffix, key in record.svd.tensors.items()}
    return {f"{m}.pre_quant_scale": (1.0 / svd["smooth_factor"].float()).to(dtype),
            f"{m}.svdquant_lora_a": svd["lora_down"].to(dtype), f"{m}.svdquant_lora_b": svd["lora_up"].to(dtype)}  # fmt: skip


def _svd_rank(contents: CheckpointContents) -> int:
    """The one low-rank size of the SVD layers (ModelOpt's config holds one `lora_rank`); q/k/v
    groups must share their smoothing factor and down-projection, as ModelOpt's export makes them."""
    ranks = {record.svd.rank for record in contents.layers.values() if record.svd is not None}
    if len(ranks) != 1:
        raise ConfigError(f"recipe {contents.recipe}: SVD ranks {sorted(ranks)} differ; ModelOpt's NVFP4_SVD has one lora_rank", "quantize with one svdquant rank")
    for group in qkv_groups(contents.layers):
        records = [contents.layers[name] for name in group]
        if any(r.svd is None for r in records):
            continue
        for suffix in ("smooth_factor", "lora_down"):
            values = [contents.tensors[r.svd.tensors[suffix]] for r in records]
            if not all(torch.equal(values[0], v) for v in values[1:]):
                raise ConfigError(
                    f"recipe {contents.recipe}: {', '.join(group)} have different SVDQuant {suffix}s, and ModelOpt's NVFP4_SVD fuses them with one",
                    "quantize with share_groups: qkv (recipe svdquant_nvfp4_static)",
                )
    return ranks.pop()


def _quant_algo(record: LayerRecord, recipe: str) -> str:
    where = f"recipe {recipe}, layer {record.name}"
    dtype, granularity, inputs = record.weight["dtype"], record.weight.get("granularity"), record.input
    static = inputs is not None and not inputs.get("dynamic", False)
    if record.svd is not None:
        if dtype != "nvfp4" or not static or inputs.get("dtype") != "nvfp4":
            raise ConfigError(
                f"{where}: ModelOpt's NVFP4_SVD needs an NVFP4 residual with a static NVFP4 input scale, this SVDQuant layer has a {dtype} residual"
                f" and {'16-bit' if inputs is None else 'static ' + inputs['dtype'] if static else 'dynamic'} inputs",
                "quantize with recipe svdquant_nvfp4_static (or nvfp4_static, no low-rank branch)",
            )
        return "NVFP4_SVD"
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
    raise ConfigError(f"{where}: {dtype} {granularity} weights have no ModelOpt diffusers layout", "quantize with recipe fp8, nvfp4_static or svdquant_nvfp4_static")


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
