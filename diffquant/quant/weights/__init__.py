"""Quantized weights: one `QuantizedWeight` type, one `WeightFormat` per format family.

`WEIGHT_FORMATS` maps each family to its format (one file each: `affine`, `fp8`, `mxfp4`,
`nvfp4`); `weight_format(spec)` picks it from a spec's dtype through the qtype registry, so
adding a format is one new file and one line here. The functions below are what the quantizer,
the modules and the exporters call.

Example:
    >>> w = torch.tensor([[0.5, -1.0, 2.0, 4.0]])
    >>> qw = quantize_weight(w, TensorSpec("int4", "per_group", group_size=2))
    >>> qw.tensors["weight_scale"]  # amax / 7 per group of 2
    tensor([[0.1429, 0.5714]])
    >>> qw.tensors["weight_packed"].tolist()  # codes [3, -7], [3, 7]: 3 | 9 << 4, 3 | 7 << 4
    [[147, 115]]
    >>> qw.dequantize()  # 0.5 / (1/7) is 3.4999998 in float32, so it rounds to 3
    tensor([[ 0.4286, -1.0000,  1.7143,  4.0000]])
"""

from __future__ import annotations

import torch

from diffquant.quant.qtypes import get_qtype
from diffquant.quant.spec import TensorSpec
from diffquant.quant.weights.affine import AFFINE
from diffquant.quant.weights.base import QuantizedWeight, Stored, WeightFormat, scale_shape, weight_rows
from diffquant.quant.weights.fp8 import FP8
from diffquant.quant.weights.mxfp4 import MXFP4
from diffquant.quant.weights.nvfp4 import NVFP4

__all__ = [
    "QuantizedWeight", "Stored", "WeightFormat", "WEIGHT_FORMATS", "weight_format", "quantize_weight",
    "quantize_weight_in_range", "input_params", "fake_quantize_input", "scale_shape", "weight_rows",
]  # fmt: skip

WEIGHT_FORMATS: dict[str, WeightFormat] = {fmt.name: fmt for fmt in (AFFINE, FP8, MXFP4, NVFP4)}
# qtype element encoding -> format family (the FP4 element has two families, told apart by name).
_FAMILY_OF_ELEMENT = {"int": "affine", "e4m3": "fp8", "e5m2": "fp8"}


def weight_format(spec: TensorSpec) -> WeightFormat:
    """The format family that stores tensors of `spec`'s dtype."""
    qtype = get_qtype(spec.dtype)
    return WEIGHT_FORMATS[_FAMILY_OF_ELEMENT.get(qtype.element, qtype.name)]


def quantize_weight_in_range(weight: torch.Tensor, spec: TensorSpec, lo: torch.Tensor, hi: torch.Tensor) -> QuantizedWeight:
    """Quantize `weight` [out, ...] given its clipping range per row of `weight_rows` (lo, hi: [rows])."""
    w2 = weight.detach().float().reshape(weight.shape[0], -1)
    return QuantizedWeight(spec, torch.Size(weight.shape), weight_format(spec).quantize(w2, spec, lo, hi))


def quantize_weight(weight: torch.Tensor, spec: TensorSpec) -> QuantizedWeight:
    """Quantize `weight` with its full range per scale row (the min_max rule)."""
    rows = weight_rows(weight, spec)
    return quantize_weight_in_range(weight, spec, rows.amin(dim=1), rows.amax(dim=1))


def input_params(spec: TensorSpec, lo: torch.Tensor, hi: torch.Tensor) -> Stored:
    """Frozen static parameters of an input spec from the observed range (lo, hi: shape [])."""
    return weight_format(spec).input_params(spec, lo.reshape(()), hi.reshape(()))


def fake_quantize_input(x: torch.Tensor, spec: TensorSpec, params: Stored | None, channel_dim: int = -1) -> torch.Tensor:
    """Quantize then dequantize an activation along `channel_dim`; static when `params` is given,
    else dynamic. The result has x's dtype; arithmetic is float32."""
    moved = x.movedim(channel_dim, -1) if channel_dim not in (-1, x.dim() - 1) else x
    out = weight_format(spec).fake_quantize_input(moved.float(), spec, params)
    if moved is not x:
        out = out.movedim(-1, channel_dim)
    return out.to(x.dtype)
