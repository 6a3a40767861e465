"""Quantize a placed submodule in place, layer by layer: each float layer released as its replacement goes in.

`quantize_in_place` visits the planned layers in the placement's order (block by block, each block
held on the device while its layers are quantized), builds each quantized layer from its float
weight and statistics, lets the caller measure it against the float layer (`measure`, e.g. on
captured held-out inputs), and swaps it into the model at once, on the device the placement says.
The model's weights are therefore held once, plus one layer: a released float weight that is a
view of the file `from_pretrained` mapped also gives its pages back, once nothing else uses it
(`models.memory.FilePageReleaser`). Each layer's checkpoint record (`LayerRecord`) is built here,
from its plan, the layer and the facts the builder reports.

Example:
    >>> from diffquant.models.placement import placement_for
    >>> from diffquant.quant.quantizer import plan_layers
    >>> from diffquant.quant.recipe import recipe_from_dict
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> recipe = recipe_from_dict({"global": {"weight": {"dtype": "int8"}}}, default_name="int8")
    >>> plans, _ = plan_layers(model, recipe, (), ())
    >>> placement = placement_for("cpu")
    >>> with placement.placed(model):
    ...     records, sizes = quantize_in_place(model, plans, {}, None, placement, lambda name, fp, q: {})
    >>> [(r.name, r.shape, r.weight["dtype"]) for r in records], type(model[0]).__name__
    ([('0', (8, 8), 'int8'), ('2', (4, 8), 'int8')], 'QuantizedLinear')
    >>> sizes["quantized_weights_ratio_vs_fp16"] > 0.5
    True
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from diffquant.artifacts.checkpoint_records import LayerRecord, SvdRecord
from diffquant.models.memory import FilePageReleaser, return_freed_heap
from diffquant.models.placement import Placement
from diffquant.quant.activation_stats import LayerActivationStats
from diffquant.quant.modules import QuantizedLayer
from diffquant.quant.quantizer import LayerPlan, build_quantized_layer, swap_layers
from diffquant.quant.recipe import SVDQuantConfig

# measure(name, float layer, quantized layer) -> the layer's quality figures ({} when not measured).
Measure = Callable[[str, torch.nn.Module, QuantizedLayer], dict[str, Any]]
SMOOTHING = "x is divided by smooth_factor; the residual and lora are in the smoothed space"


def quantize_in_place(
    model: torch.nn.Module,
    plans: list[LayerPlan],
    stats: dict[str, LayerActivationStats],
    svdquant: SVDQuantConfig | None,
    placement: Placement,
    measure: Measure,
    show_progress: bool = False,
) -> tuple[list[LayerRecord], dict[str, Any]]:
    """Quantize every planned layer of `model` (placed by `placement`) and swap it in at once.

    `stats` is consumed (each layer's entry is dropped once used). Returns the layers' records in
    plan order and the sizes of the quantized weights (codes and scales, without bias and
    low-rank branch) against the same weights in fp16: the ratio the whole checkpoint approaches
    when the unquantized layers are a small share of the model, as in the real models.
    """
    modules = dict(model.named_modules())
    by_name = {plan.name: plan for plan in plans}
    records: list[LayerRecord] = []
    stored_bytes = fp16_bytes = 0
    releaser = FilePageReleaser()
    bar = tqdm(total=len(plans), desc="quantize layers", unit="layer", disable=not show_progress)
    for name in placement.visit([plan.name for plan in plans]):
        plan, module = by_name[name], modules.pop(name)
        dtype = str(module.weight.dtype).removeprefix("torch.")
        with placement.layer_weights(module):
            layer, facts = build_quantized_layer(module, plan, stats.pop(name, None), svdquant)
            quality = measure(name, module, layer)
            home = placement.home_of(module)
        swap_layers(model, {name: layer.to(home)})
        releaser.add(module.weight)  # a view of from_pretrained's file mapping: its pages go once unshared
        del module
        releaser.flush()
        return_freed_heap()
        records.append(layer_record(plan, layer, facts, quality, dtype))
        stored_bytes += layer.quantized_weight().nbytes
        fp16_bytes += layer.weight_shape.numel() * 2
        bar.update(1)
    bar.close()
    placement.after_swaps()
    releaser.flush()
    sizes = {"quantized_weights_bytes": stored_bytes, "quantized_weights_fp16_bytes": fp16_bytes,
             "quantized_weights_ratio_vs_fp16": stored_bytes / fp16_bytes}
    return records, sizes


def layer_record(plan: LayerPlan, layer: QuantizedLayer, facts: dict[str, Any], quality: dict[str, Any], dtype: str) -> LayerRecord:
    """The checkpoint record of a built layer: its plan's specs, the names of its stored tensors,
    its frozen input parameters, the builder's facts (SVD rank and alpha, input range) and quality."""
    svd = None
    if layer.has_lowrank:
        svd = SvdRecord(rank=facts["svd_rank"], alpha=facts["svd_alpha"], method=facts["svd_method"],
                        tensors={name: f"{plan.name}.{name}" for name in ("smooth_factor", "lora_down", "lora_up")}, smoothing=SMOOTHING)
    return LayerRecord(
        name=plan.name, type=plan.layer_type, shape=tuple(layer.weight_shape), dtype=dtype, weight=plan.spec.weight.to_dict(),
        tensors={suffix: f"{plan.name}.{suffix}" for suffix in layer.stored_names},
        input=plan.spec.input.to_dict() if plan.spec.input else None,
        input_tensors={name: f"{plan.name}.{name}" for name in layer.input_param_names},
        input_params={name: getattr(layer, name).tolist() for name in layer.input_param_names},
        bias=f"{plan.name}.bias" if layer.bias is not None else None, svd=svd, quality=quality,
        conv=layer.conv if plan.layer_type == "Conv2d" else None,
        extra={key: value for key, value in facts.items() if not key.startswith("svd_")},
    )
