"""NVFP4 weights and inputs (`formats.nvfp4`, ModelOpt's convention).

Stored: `weight_packed` uint8 [out, K/2] E2M1 codes (low nibble = even index), `weight_scale`
float8_e4m3fn [out, K/16] block scales, `weight_scale_2` float32 [] = amax / (6 * 448);
x = e2m1(code) * float(weight_scale) * weight_scale_2. Static inputs freeze the per-tensor
`input_scale_2`; their block scales are computed per call.
"""

from __future__ import annotations

import torch

from diffquant.quant.formats.nvfp4 import nvfp4_dequantize, nvfp4_global_scale, nvfp4_quantize
from diffquant.quant.formats.pack import pack_nibbles, unpack_nibbles
from diffquant.quant.spec import TensorSpec
from diffquant.quant.weights.base import Stored, WeightFormat


def quantize(w2: torch.Tensor, spec: TensorSpec, lo: torch.Tensor, hi: torch.Tensor) -> Stored:
    global_scale = nvfp4_global_scale(torch.maximum(lo.abs(), hi.abs()).amax().reshape(()))
    codes, block_scale = nvfp4_quantize(w2, global_scale)
    return {"weight_packed": pack_nibbles(codes), "weight_scale": block_scale, "weight_scale_2": global_scale.float()}


def dequantize(stored: Stored, spec: TensorSpec, out: int, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return nvfp4_dequantize(unpack_nibbles(stored["weight_packed"]), stored["weight_scale"], stored["weight_scale_2"], dtype)


def input_params(spec: TensorSpec, lo: torch.Tensor, hi: torch.Tensor) -> Stored:
    return {"input_scale_2": nvfp4_global_scale(torch.maximum(lo.abs(), hi.abs())).float()}


def fake_quantize_input(x: torch.Tensor, spec: TensorSpec, params: Stored | None) -> torch.Tensor:
    global_scale = params["input_scale_2"] if params else nvfp4_global_scale(x.abs().amax())
    codes, block_scale = nvfp4_quantize(x, global_scale)
    return nvfp4_dequantize(codes, block_scale, global_scale)


NVFP4 = WeightFormat("nvfp4", quantize, dequantize, input_params, fake_quantize_input)
