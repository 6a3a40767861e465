"""Quality of a quantized submodule, measured on held-out calibration samples.

Every figure is an SQNR in dB, 10 log10(signal energy / noise energy), with the energies summed in
float64 over all elements of all samples before the ratio (never a mean of per-sample ratios).
An exact match (no noise) is +inf dB, written as None so that it stays JSON null in a manifest.
`capture_layer_inputs` records each layer's inputs in one pass of the unquantized model (at
most `DEFAULT_LAYER_ROWS` rows per sample: a cost setting) into a temporary file
(`SpilledLayerInputs`, so they take no process memory), and `compare_layer` compares a
quantized layer with the layer it replaces on them; `measure_output` compares whole-submodule
outputs. Stage two (`quantize`) and `evaluate` both measure with these, so a checkpoint that
reloads exactly reproduces its figures.

Example:
    >>> sqnr_from_energy(100.0, 1.0)
    20.0
    >>> sqnr_from_energy(4.0, 0.0) is None
    True
    >>> median_and_worst([31.5, None, 12.0, float("inf"), 25.0])
    (25.0, 12.0)
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from diffquant.eval.layer_inputs import SpilledLayerInputs
from diffquant.models.placement import onloaded
from diffquant.quant.modules import QuantizedLayer


# Rows of each layer's input kept per held-out sample for its figures (evenly spaced tokens, or a
# centred window of pixels: `input_subset`); it costs rows x K x dtype bytes per layer and sample
# of temporary file (not memory): an estimated 1 GB for SDXL's UNet (about 750 layers, mean K
# about 1500) at 2 samples in fp16, and the reading time of as many bytes as each layer is measured.
DEFAULT_LAYER_ROWS = 256


def capture_layer_inputs(
    model: torch.nn.Module, names: Sequence[str], samples: Iterable[dict[str, Any]], max_rows: int | None, show_progress: bool,
) -> tuple[SpilledLayerInputs, list[torch.Tensor]]:
    """One pass of the unquantized `model` over `samples`: each named layer's input, cut to at most
    `max_rows` rows (tokens or pixels) per sample by `input_subset` and spilled to a temporary
    file, and the model's outputs. The layers' figures are then computed one layer at a time
    (`compare_layer` on `inputs.pop(name)`), so no second model, and no layer's inputs but the one
    measured, is ever held. The caller closes the returned inputs."""
    inputs = SpilledLayerInputs()
    modules = dict(model.named_modules())
    handles = []
    for name in names:
        conv = isinstance(modules[name], torch.nn.Conv2d)

        def hook(module: torch.nn.Module, args: tuple[Any, ...], name: str = name, conv: bool = conv) -> None:
            inputs.append(name, input_subset(args[0].detach(), max_rows, conv))
        handles.append(modules[name].register_forward_pre_hook(hook))
    outputs: list[torch.Tensor] = []
    try:
        with torch.inference_mode():
            for sample in tqdm(samples, desc="reference pass", unit="sample", disable=not show_progress):
                outputs.append(submodule_output(model(**sample)).detach().clone())
    except BaseException:
        inputs.close()
        raise
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs


def input_subset(x: torch.Tensor, max_rows: int | None, conv: bool) -> torch.Tensor:
    """At most `max_rows` rows of a layer input, chosen by a fixed rule.

    Linear input [..., K]: the rows of x.reshape(-1, K) at evenly spaced indices
    floor((i + 0.5) * n / max_rows), i < max_rows. Conv2d input [B, C, H, W]: the centred spatial
    window of h x w pixels (h, w as large as B * h * w <= max_rows allows, aspect kept), so that
    the float and the quantized conv see the same crop. `max_rows` None or an input that fits: x.
    """
    if max_rows is None:
        return x
    if conv:
        batch, _, height, width = x.shape
        if batch * height * width <= max_rows:
            return x
        scale = math.sqrt(max_rows / (batch * height * width))
        h, w = max(1, int(height * scale)), max(1, int(width * scale))
        top, left = (height - h) // 2, (width - w) // 2
        return x[:, :, top:top + h, left:left + w]
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] <= max_rows:
        return x
    n = rows.shape[0]
    picks = torch.tensor([int((i + 0.5) * n / max_rows) for i in range(max_rows)], device=x.device)
    return rows.index_select(0, picks)


def compare_layer(original: torch.nn.Module, qlayer: QuantizedLayer, inputs: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Weight SQNR and output SQNR of `qlayer` against the float layer it replaces, on `inputs`
    (the layer's captured held-out inputs); both run on the original layer's device."""
    with onloaded(original):
        # Before any forward call: an offloaded layer's hook puts its weight back on `meta` after it.
        weight_signal, weight_noise = weight_energies(original.weight.detach(), qlayer)
        device = original.weight.device
        signal = noise = 0.0
        with torch.inference_mode():
            for x in inputs:
                x = x.to(device)
                reference = original(x).detach().double()
                approx = qlayer(x).detach().double()
                signal += float(reference.pow(2).sum())
                noise += float((reference - approx).pow(2).sum())
    return {"weight_sqnr_db": sqnr_from_energy(weight_signal, weight_noise), "output_sqnr_db": sqnr_from_energy(signal, noise)}


# Rows of a weight compared at a time, as many as make `WEIGHT_CHUNK_ELEMENTS` float64 elements:
# the comparison then holds one float32 copy of the dequantized weight and four float64 chunks of
# 2 MiB beside it, not four full float64 copies (a 1280x2560x3x3 conv's would be 0.9 GB). A
# weight that fits in one chunk (every tiny model's) is compared in one sum, as before chunking.
WEIGHT_CHUNK_ELEMENTS = 2**18


def weight_energies(weight: torch.Tensor, qlayer: QuantizedLayer) -> tuple[float, float]:
    """(sum of w^2, sum of (w - w_q)^2) in float64, where w_q is what `qlayer` computes with: the
    dequantized weight, plus the low-rank branch and divided by the smoothing factor for SVDQuant."""
    # Dequantized in float32 (the arithmetic of `dequantize`, whatever the dtype it casts to) and
    # widened to float64 a chunk at a time: the same values as dequantize(float64), a third of the memory.
    deq = qlayer.quantized_weight().dequantize(torch.float32).to(weight.device).reshape(weight.shape[0], -1)
    rows = weight.reshape(weight.shape[0], -1)
    step = max(1, WEIGHT_CHUNK_ELEMENTS // max(1, rows.shape[1]))
    signal = noise = 0.0
    for start in range(0, rows.shape[0], step):
        w = rows[start:start + step].double()
        w_q = deq[start:start + step].double()
        if qlayer.has_lowrank:
            lowrank = qlayer.lora_up[start:start + step].double() @ qlayer.lora_down.double()
            w_q = (w_q + lowrank.to(w_q.device)) / qlayer.smooth_factor.double().reshape(1, -1).to(w_q.device)
        signal += float(w.pow(2).sum())
        noise += float((w - w_q).pow(2).sum())
    return signal, noise


def measure_layers(
    model: torch.nn.Module, quantized: dict[str, QuantizedLayer], samples: Iterable[dict[str, Any]], show_progress: bool,
    max_rows: int | None = DEFAULT_LAYER_ROWS,
) -> tuple[dict[str, dict[str, Any]], list[torch.Tensor]]:
    """Per-layer figures of `quantized` (layers of another module) against the layers of `model`
    they replace, on held-out `samples`; also returns `model`'s outputs on them (`evaluate`)."""
    inputs, outputs = capture_layer_inputs(model, list(quantized), samples, max_rows, show_progress)
    modules = dict(model.named_modules())
    with inputs:
        return {name: compare_layer(modules[name], qlayer, inputs.pop(name)) for name, qlayer in quantized.items()}, outputs


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
