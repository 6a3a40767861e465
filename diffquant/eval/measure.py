"""Quality of a quantized submodule, measured on held-out calibration samples.

Every figure is an SQNR in dB, 10 log10(signal energy / noise energy), with the energies summed in
float64 over all elements of all samples before the ratio (never a mean of per-sample ratios).
An exact match (no noise) is +inf dB, written as None so that it stays JSON null in a manifest.
`measure_layers` compares each quantized layer with the layer it replaces on the same inputs of
the unquantized model; `measure_output` compares whole-submodule outputs. Stage two (`quantize`)
and `evaluate` both measure with these, so a checkpoint that reloads exactly reproduces its figures.

Example:
    >>> sqnr_from_energy(100.0, 1.0)
    20.0
    >>> sqnr_from_energy(4.0, 0.0) is None
    True
    >>> median_and_worst([31.5, None, 12.0, float("inf"), 25.0])
    (25.0, 12.0)
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from diffquant.models.blockwise import BlockwiseOnload
from diffquant.models.placement import onloaded
from diffquant.quant.modules import QuantizedLayer


def measure_layers(
    model: torch.nn.Module, quantized: dict[str, QuantizedLayer], samples: Iterable[dict[str, Any]], show_progress: bool,
    blocks: BlockwiseOnload | None = None,
) -> tuple[dict[str, dict[str, Any]], list[torch.Tensor]]:
    """Per-layer weight SQNR and output SQNR (quantized layer vs original layer on the same inputs
    of the unquantized model, held-out samples); also returns the model's outputs on them.
    Block by block, each quantized layer visits the device only while it is compared."""
    energy = {name: [0.0, 0.0] for name in quantized}
    modules = dict(model.named_modules())
    handles = []
    for name, qlayer in quantized.items():
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor, name: str = name, qlayer: QuantizedLayer = qlayer) -> None:
            reference = output.detach().double()
            with blocks.visiting(qlayer) if blocks is not None else contextlib.nullcontext():
                approx = qlayer(args[0]).detach().double()
            energy[name][0] += float(reference.pow(2).sum())
            energy[name][1] += float((reference - approx).pow(2).sum())
        handles.append(modules[name].register_forward_hook(hook))
    outputs: list[torch.Tensor] = []
    try:
        with torch.inference_mode():
            for sample in tqdm(samples, desc="evaluate layers", unit="sample", disable=not show_progress):
                outputs.append(submodule_output(model(**sample)).detach().clone())
    finally:
        for handle in handles:
            handle.remove()
    quality = {}
    for name, qlayer in quantized.items():
        with onloaded(modules[name]):
            original = modules[name].weight.detach().double().clone()
        deq = qlayer.quantized_weight().dequantize(torch.float64)
        if qlayer.has_lowrank:
            deq = (deq + qlayer.lora_up.double() @ qlayer.lora_down.double()) / qlayer.smooth_factor.double().reshape(1, -1)
        quality[name] = {
            "weight_sqnr_db": sqnr_from_energy(float(original.pow(2).sum()), float((original - deq.reshape(original.shape)).pow(2).sum())),
            "output_sqnr_db": sqnr_from_energy(*energy[name]),
        }
    return quality, outputs


def measure_output(model: torch.nn.Module, fp_outputs: list[torch.Tensor], samples: Iterable[dict[str, Any]]) -> float | None:
    """Submodule output SQNR in dB over the held-out samples (energies summed over samples)."""
    signal = noise = 0.0
    with torch.inference_mode():
        for reference, sample in zip(fp_outputs, samples):
            approx = submodule_output(model(**sample)).double()
            signal += float(reference.double().pow(2).sum())
            noise += float((reference.double() - approx).pow(2).sum())
    return sqnr_from_energy(signal, noise)


def submodule_output(result: Any) -> torch.Tensor:
    """The main output tensor of a diffusers model call (`.sample` or the first tuple item)."""
    if isinstance(result, torch.Tensor):
        return result
    if hasattr(result, "sample"):
        return result.sample
    return result[0]


def median_and_worst(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Median and minimum of the finite per-layer SQNRs (None: none finite)."""
    finite = sorted(v for v in values if v is not None and math.isfinite(v))
    return (finite[len(finite) // 2], finite[0]) if finite else (None, None)


def sqnr_from_energy(signal: float, noise: float) -> float | None:
    """10 log10(signal / noise); None (JSON null) for an exact match, which is +inf dB."""
    if noise == 0.0:
        return None
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
