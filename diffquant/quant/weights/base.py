"""The quantized weight type: a weight held only as the tensors its checkpoint stores.

A `QuantizedWeight` is the spec, the real weight shape and the stored tensors (named by suffix:
`weight` or `weight_packed`, `weight_scale`, `weight_zero_point`, `weight_scale_2`; the
checkpoint's own bytes, storage-and-formats.md §4.3). It dequantizes itself on demand and keeps
no float copy. How a format turns a weight into those tensors and back is its `WeightFormat`
(one file per family beside this one, collected in `diffquant.quant.weights.WEIGHT_FORMATS`).

Layouts. A weight [out, ...] is quantized as W2 = weight.reshape(out, K). Scales have the shape
[] (per_tensor), [out, 1] (per_channel) or [out, K // g] (per_group). Activations are quantized
along their channel dim (-1 for Linear inputs, 1 for Conv2d inputs): per_tensor has one scale;
per_group groups g consecutive channels of each token / pixel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from diffquant.quant.formats.blocks import from_blocks, to_blocks
from diffquant.quant.spec import TensorSpec

Stored = dict[str, torch.Tensor]


@dataclass(frozen=True)
class WeightFormat:
    """How one format family stores a weight and quantizes an activation.

    quantize(w2 float32 [out, K], spec, lo, hi) -> stored tensors, with lo / hi the clipping
    range per row of `weight_rows`; dequantize(stored, spec, out, K, dtype) -> [out, K] computed
    in float32 and rounded once to dtype (block formats in row slices, no whole float32 copy);
    input_params(spec, lo [], hi []) -> frozen static input tensors (`input_scale`, ...);
    fake_quantize_input(x float32 [..., C], spec, params or None) -> float32, quantized along the
    last dim with static `params`, or dynamically per call when None.
    """

    name: str
    quantize: Callable[[torch.Tensor, TensorSpec, torch.Tensor, torch.Tensor], Stored]
    dequantize: Callable[[Stored, TensorSpec, int, int, torch.dtype], torch.Tensor]
    input_params: Callable[[TensorSpec, torch.Tensor, torch.Tensor], Stored]
    fake_quantize_input: Callable[[torch.Tensor, TensorSpec, Stored | None], torch.Tensor]


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight of `shape` stored as `tensors` under `spec` (see the module docstring).

    Example:
        >>> from diffquant.quant.weights import quantize_weight
        >>> w = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
        >>> qw = quantize_weight(w, TensorSpec("int8", "per_channel"))
        >>> qw.tensors["weight"].tolist(), qw.tensors["weight_scale"].flatten().tolist()
        ([[64, -127], [127, 64]], [0.015748031437397003, 0.003937007859349251])
        >>> qw.dequantize()  # 64 * 2/127 and 64 * 0.5/127: the small weights' rounding error
        tensor([[ 1.0079, -2.0000],
                [ 0.5000,  0.2520]])
    """

    spec: TensorSpec
    shape: torch.Size
    tensors: Stored

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        """K, the input size of the flattened [out, K] weight."""
        return self.shape.numel() // self.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors: what the checkpoint holds for this weight."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight in `shape`, computed in float32 and cast to `dtype` once."""
        from diffquant.quant.weights import weight_format

        w2 = weight_format(self.spec).dequantize(self.tensors, self.spec, self.out_features, self.in_features, dtype)
        return w2.reshape(self.shape).to(dtype)


def weight_rows(weight: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """The weight as float32 rows, one row per scale: [1, N], [out, K] or [out * K/g, g]."""
    w2 = weight.detach().float().reshape(weight.shape[0], -1)
    if spec.granularity == "per_tensor":
        return w2.reshape(1, -1)
    if spec.granularity == "per_channel":
        return w2
    return to_blocks(w2, spec.group_size).reshape(-1, spec.group_size)


def scale_shape(weight_shape: torch.Size, spec: TensorSpec) -> tuple[int, ...]:
    """Shape of a weight's first-level scale as stored (see the module docstring)."""
    out = weight_shape[0]
    k = weight_shape.numel() // out
    return {"per_tensor": (), "per_channel": (out, 1), "per_group": (out, k // (spec.group_size or 1))}[spec.granularity]


def blocked(x: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """Rows [..., K] as [..., K/g, g] for per_group, else unchanged."""
    return to_blocks(x, spec.group_size) if spec.granularity == "per_group" else x


def unblocked(x: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """The inverse of `blocked`."""
    return from_blocks(x) if spec.granularity == "per_group" else x


def scale_view(scale: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """A stored scale shaped to broadcast against `blocked` rows."""
    return scale.unsqueeze(-1) if spec.granularity == "per_group" else scale


def range_as_scale_shape(values: torch.Tensor, w2: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """Per-row clipping bounds (one per `weight_rows` row) in the stored scale's shape."""
    return values.reshape(scale_shape(w2.shape, spec))


def dynamic_dims(blocks: torch.Tensor, spec: TensorSpec) -> tuple[int, ...]:
    """Dims a dynamic input scale reduces over: each group, each token's channels (per_token), or
    the whole tensor."""
    return (-1,) if spec.granularity in ("per_group", "per_token") else tuple(range(blocks.dim()))


def dynamic_scale_in_dtype(scale: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """A per-call float32 scale rounded to the *nearest* value of `spec.scale_dtype` (round half
    to even; unchanged when None), as float32: the scale a runtime gets that divides the amax in
    the activation's dtype (torchao: the float32 quotient rounded once to bf16).

    Example:
        >>> dynamic_scale_in_dtype(torch.tensor([1.0 + 2.0**-10]), TensorSpec("int8", "per_token", dynamic=True, scale_dtype="bfloat16")).item()
        1.0
    """
    dtype = _chosen_scale_dtype(spec)
    return scale if dtype is None else scale.to(dtype).float()


def scale_in_dtype(scale: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """A positive float32 scale rounded up to the next value of `spec.scale_dtype` (unchanged when
    None): the smallest bf16 / fp16 value >= scale, as float32 (exact in it).

    Example:
        >>> scale_in_dtype(torch.tensor([1.0 + 2.0**-10]), TensorSpec("int8", scale_dtype="bfloat16")).item()
        1.0078125
    """
    dtype = _chosen_scale_dtype(spec)
    if dtype is None:
        return scale
    scale = scale.float()
    nearest = scale.to(dtype)
    up = torch.where(nearest.float() < scale, torch.nextafter(nearest, torch.tensor(float("inf"), dtype=dtype)), nearest)
    return up.float()


def _chosen_scale_dtype(spec: TensorSpec) -> torch.dtype | None:
    """The torch dtype of a resolved `spec.scale_dtype` (None: float32 scales, no rounding)."""
    if spec.scale_dtype is None:
        return None
    if spec.scale_dtype == "model":
        raise ValueError("scale_dtype 'model' is resolved per layer when it is planned (spec.resolve_scale_dtype); "
                         "resolve it before quantizing")
    return getattr(torch, spec.scale_dtype)
