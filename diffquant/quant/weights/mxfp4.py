"""MXFP4 weights and inputs (OCP MX v1.0, `formats.mxfp4`).

Stored: `weight_packed` uint8 [out, K/2] E2M1 codes (low nibble = even index), `weight_scale`
uint8 [out, K/32] biased E8M0; x = e2m1(code) * 2^(scale - 127). Block scales always come from
the data, so inputs are dynamic and have no static parameters.
"""

from __future__ import annotations

import torch

from diffquant.quant.formats.mxfp4 import mxfp4_dequantize, mxfp4_quantize
from diffquant.quant.formats.pack import pack_nibbles, unpack_nibbles
from diffquant.quant.spec import TensorSpec
from diffquant.quant.weights.base import Stored, WeightFormat


def quantize(w2: torch.Tensor, spec: TensorSpec, lo: torch.Tensor, hi: torch.Tensor) -> Stored:
    codes, scale = mxfp4_quantize(w2)
    return {"weight_packed": pack_nibbles(codes), "weight_scale": scale}


def dequantize(stored: Stored, spec: TensorSpec, out: int, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return mxfp4_dequantize(unpack_nibbles(stored["weight_packed"]), stored["weight_scale"], dtype)


def input_params(spec: TensorSpec, lo: torch.Tensor, hi: torch.Tensor) -> Stored:
    return {}


def fake_quantize_input(x: torch.Tensor, spec: TensorSpec, params: Stored | None) -> torch.Tensor:
    codes, scale = mxfp4_quantize(x)
    return mxfp4_dequantize(codes, scale)


MXFP4 = WeightFormat("mxfp4", quantize, dequantize, input_params, fake_quantize_input)
