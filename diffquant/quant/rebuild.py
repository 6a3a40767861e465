"""The one rebuild path: a checkpoint's layer record and tensors -> a QuantizedLinear / Conv2d.

The loader, `diffquant.load_quantized` and the exporters all rebuild layers here. A record is
anything with the fields of `diffquant.artifacts.checkpoint_records.LayerRecord` (`quant`
imports nothing outside `quant`, so it is described by the `LayerFields` protocol): its type,
real weight shape, compute dtype name, weight / input spec fields, and the state-dict keys of its
tensors.

Example:
    >>> from types import SimpleNamespace
    >>> from diffquant.quant.weights import quantize_weight
    >>> from diffquant.quant.spec import TensorSpec
    >>> weight = quantize_weight(torch.tensor([[1.0, -2.0]]), TensorSpec("int8"))
    >>> record = SimpleNamespace(name="proj", type="Linear", shape=(1, 2), dtype="float32", weight=weight.spec.to_dict(),
    ...     input=None, tensors={"weight": "proj.weight", "weight_scale": "proj.weight_scale"}, input_tensors={},
    ...     bias=None, svd=None, conv=None)
    >>> tensors = {"proj." + name: t for name, t in weight.tensors.items()}
    >>> layer = layer_from_record(record, tensors)
    >>> type(layer).__name__, layer.in_features, tensors
    ('QuantizedLinear', 2, {})
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

import torch

from diffquant.quant.errors import ConfigError as QuantConfigError
from diffquant.quant.modules import QuantizedConv2d, QuantizedLayer, QuantizedLinear
from diffquant.quant.spec import TensorSpec
from diffquant.quant.weights import QuantizedWeight, scale_shape


class LayerFields(Protocol):
    name: str
    type: str
    shape: tuple[int, ...]
    dtype: str
    weight: Mapping[str, Any]
    input: Mapping[str, Any] | None
    tensors: Mapping[str, str]
    input_tensors: Mapping[str, str]
    bias: str | None
    svd: Any
    conv: Mapping[str, Any] | None


def layer_from_record(record: LayerFields, tensors: dict[str, torch.Tensor]) -> QuantizedLayer:
    """Build the layer of `record`, taking (popping) its tensors out of `tensors`.

    Raises QuantConfigError naming the layer when a tensor is missing or has the wrong dtype or
    shape for its spec (a tampered or truncated checkpoint).
    """
    def take(names: Mapping[str, str]) -> dict[str, torch.Tensor]:
        missing = [full for full in names.values() if full not in tensors]
        if missing:
            raise QuantConfigError(f"checkpoint lacks tensor {missing[0]} of layer {record.name}", "re-run `diffquant quantize`")
        return {suffix: aligned(tensors.pop(full)) for suffix, full in names.items()}

    weight_spec = TensorSpec.from_dict(record.weight, f"layer {record.name} weight")
    input_spec = TensorSpec.from_dict(record.input, f"layer {record.name} input") if record.input else None
    weight = QuantizedWeight(weight_spec, torch.Size(record.shape), take(record.tensors))
    check_stored(record.name, weight)
    lowrank = take(record.svd.tensors) if record.svd is not None else None
    if record.bias is not None and record.bias not in tensors:
        raise QuantConfigError(f"checkpoint lacks tensor {record.bias} of layer {record.name}", "re-run `diffquant quantize`")
    bias = aligned(tensors.pop(record.bias)) if record.bias is not None else None
    compute_dtype = getattr(torch, record.dtype, None)
    if not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point:
        raise QuantConfigError(f"layer {record.name} has compute dtype {record.dtype!r}", "re-run `diffquant quantize`")
    common: dict[str, Any] = dict(weight=weight, bias=bias, compute_dtype=compute_dtype, input_spec=input_spec,
                                  input_params=take(record.input_tensors) or None, lowrank=lowrank)
    if record.type == "Conv2d":
        if len(record.shape) != 4:
            raise QuantConfigError(f"Conv2d layer {record.name} has weight shape {list(record.shape)}", "re-run `diffquant quantize`")
        return QuantizedConv2d(**common, conv=dict(record.conv or {}))
    if len(record.shape) != 2:
        raise QuantConfigError(f"Linear layer {record.name} has weight shape {list(record.shape)}", "re-run `diffquant quantize`")
    return QuantizedLinear(**common)


# Bytes to which every stored tensor's data is aligned: torch's CPU kernels (`_weight_int8pack_mm`
# with bf16 inputs among them) read operands with 64-byte vector loads and crash on a tensor that
# safetensors handed out at an arbitrary offset of its buffer (measured: every tensor of a loaded
# checkpoint was misaligned, and the bf16 int8 weight-only kernel segfaulted on one).
ALIGNMENT = 64


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or a fresh copy of it when its data does not start on an ALIGNMENT boundary."""
    return tensor if tensor.data_ptr() % ALIGNMENT == 0 else tensor.clone()


def expected_stored(weight: QuantizedWeight) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The stored tensors a weight of this spec and shape must have: suffix -> (dtype, shape)."""
    from diffquant.quant.qtypes import get_qtype

    spec, qtype = weight.spec, get_qtype(weight.spec.dtype)
    out, k = weight.out_features, weight.in_features
    codes_name = "weight_packed" if qtype.packed else "weight"
    codes_shape = (out, k // 2) if qtype.packed else (out, k)  # a Conv2d weight is stored flattened
    expected = {codes_name: (qtype.storage_dtype, codes_shape)}
    scales = scale_shape(weight.shape, spec)
    expected["weight_scale"] = (qtype.scale_dtype, scales)
    if qtype.has_global_scale:
        expected["weight_scale_2"] = (torch.float32, ())
    if qtype.element == "int" and not spec.symmetric:
        expected["weight_zero_point"] = (torch.int8 if qtype.signed else torch.uint8, scales)
    return expected


def check_stored(name: str, weight: QuantizedWeight) -> None:
    """QuantConfigError naming the layer and tensor when stored tensors do not fit the spec."""
    expected = expected_stored(weight)
    if sorted(expected) != sorted(weight.tensors):
        raise QuantConfigError(f"layer {name} stores {sorted(weight.tensors)}, but a {weight.spec.describe()} weight has {sorted(expected)}",
                               "re-run `diffquant quantize`")
    for suffix, (dtype, shape) in expected.items():
        tensor = weight.tensors[suffix]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise QuantConfigError(f"tensor {name}.{suffix} is {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}, "
                                   f"expected {str(dtype).removeprefix('torch.')} {list(shape)}", "re-run `diffquant quantize`")
