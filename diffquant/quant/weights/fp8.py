"""FP8 E4M3 / E5M2 weights and inputs (`formats.fp8`).

Stored: `weight` float8_e4m3fn / float8_e5m2 [out, K], `weight_scale` float32 in the scale
shape (amax / fp8 max); x = float(q) * s. Static inputs store `input_scale`; dynamic inputs take
amax per call (per tensor, per token, or per group of channels), rounded to the nearest
value of `scale_dtype` when one is given.
"""

from __future__ import annotations

import torch

from diffquant.quant.formats.fp8 import choose_fp8_scale, dequantize_fp8, quantize_fp8
from diffquant.quant.qtypes import get_qtype
from diffquant.quant.spec import TensorSpec
from diffquant.quant.weights.base import (
    Stored, WeightFormat, blocked, dynamic_dims, dynamic_scale_in_dtype, range_as_scale_shape, scale_in_dtype, scale_view, unblocked,
)  # fmt: skip


def quantize(w2: torch.Tensor, spec: TensorSpec, lo: torch.Tensor, hi: torch.Tensor) -> Stored:
    dtype = get_qtype(spec.dtype).storage_dtype
    scale = scale_in_dtype(choose_fp8_scale(range_as_scale_shape(torch.maximum(lo.abs(), hi.abs()), w2, spec), dtype).float(), spec)
    return {"weight": unblocked(quantize_fp8(blocked(w2, spec), scale_view(scale, spec), dtype), spec), "weight_scale": scale}


def dequantize(stored: Stored, spec: TensorSpec, out: int, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return unblocked(dequantize_fp8(blocked(stored["weight"], spec), scale_view(stored["weight_scale"], spec), dtype), spec)


def input_params(spec: TensorSpec, lo: torch.Tensor, hi: torch.Tensor) -> Stored:
    return {"input_scale": scale_in_dtype(choose_fp8_scale(torch.maximum(lo.abs(), hi.abs()), get_qtype(spec.dtype).storage_dtype).float(), spec)}


def fake_quantize_input(x: torch.Tensor, spec: TensorSpec, params: Stored | None) -> torch.Tensor:
    dtype = get_qtype(spec.dtype).storage_dtype
    if params is not None:
        scale = params["input_scale"]
        return dequantize_fp8(quantize_fp8(x, scale, dtype), scale)
    blocks = blocked(x, spec)
    scale = dynamic_scale_in_dtype(choose_fp8_scale(blocks.abs().amax(dim=dynamic_dims(blocks, spec), keepdim=True), dtype), spec)
    return unblocked(dequantize_fp8(quantize_fp8(blocks, scale, dtype), scale), spec)


FP8 = WeightFormat("fp8", quantize, dequantize, input_params, fake_quantize_input)
