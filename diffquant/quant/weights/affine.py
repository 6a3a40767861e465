"""INT8 / UINT8 / INT4 / UINT4 weights and inputs (affine codes, `formats.affine`).

Stored: `weight` int8 / uint8 [out, K] codes, or `weight_packed` uint8 [out, K/2] for 4-bit
codes (byte = code[2k] | code[2k+1] << 4, signed codes as two's-complement nibbles,
`formats.pack`); `weight_scale` float32 in the scale shape; `weight_zero_point` int8 / uint8 in
the same shape when asymmetric; with `fp16_products` the fp16 scales are stepped up per group
until a runtime's fl_t(fl16(q s)) is diffquant's fl_t(q s) (`formats.affine.fp16_product_scales`).
Dequantization (q - zp) * s in float32. Static inputs store
`input_scale` (and `input_zero_point` when asymmetric); dynamic inputs take min / max per call
(per tensor, per token or per group), the scale rounded to the nearest value of `scale_dtype`
when one is given, the codes by x / s or, with `rounding: half_even_reciprocal`, x · fl(1 / s);
a `shift` spec's inputs take the signed / unsigned grids of `shifted_inputs`.
"""

from __future__ import annotations

import warnings

import torch

from diffquant.quant.formats.affine import FP16_PRODUCT_STEPS, choose_qparams_affine, dequantize_affine, fp16_product_scales, quantize_affine
from diffquant.quant.formats.pack import int4_to_nibbles, nibbles_to_int4, pack_nibbles, unpack_nibbles
from diffquant.quant.qtypes import QType, get_qtype
from diffquant.quant.shifted_inputs import fake_quantize_shifted
from diffquant.quant.spec import TensorSpec
from diffquant.quant.weights.base import (
    Stored, WeightFormat, blocked, dynamic_dims, dynamic_scale_in_dtype, range_as_scale_shape, scale_in_dtype, scale_view, unblocked,
)  # fmt: skip


def quantize(w2: torch.Tensor, spec: TensorSpec, lo: torch.Tensor, hi: torch.Tensor) -> Stored:
    qtype = get_qtype(spec.dtype)
    scale, zero_point = choose_qparams_affine(
        range_as_scale_shape(lo, w2, spec), range_as_scale_shape(hi, w2, spec), qtype.qmin, qtype.qmax, spec.symmetric,
        spec.scale_rule,
    )
    scale = scale_in_dtype(scale, spec)  # symmetric only (the spec checks): the zero point stays 0
    if spec.fp16_products is not None:  # fp16 scales stepped up until fl_t(fl16(q s)) == fl_t(q s) for every code
        if spec.fp16_products == "model":
            raise ValueError("fp16_products 'model' is resolved per layer when it is planned (spec.resolve_scale_dtype); "
                             "pass a resolved spec")
        per_tensor = spec.granularity == "per_tensor"
        searched, left = fp16_product_scales(w2.reshape(1, -1) if per_tensor else blocked(w2, spec),
                                             scale.reshape(1, 1) if per_tensor else scale_view(scale, spec),
                                             qtype.qmin, qtype.qmax, getattr(torch, spec.fp16_products))
        if left:
            warnings.warn(f"fp16_products: {left} of {scale.numel()} weight groups found no fp16 scale within {FP16_PRODUCT_STEPS} "
                          f"steps whose fp16 products round to {spec.fp16_products} like diffquant's; they keep amax / qmax, and a "
                          "runtime dequantizing in fp16 moves some of their weights by one ulp (the GGUF export counts them)",
                          stacklevel=2)
        scale = searched.reshape(scale.shape)
    # Codes come out in a one-byte dtype directly (no int32 copy of the weight): the storage
    # dtype, or for 4-bit codes int8 / uint8 before they are packed two to a byte.
    code_dtype = (torch.int8 if qtype.signed else torch.uint8) if qtype.packed else qtype.storage_dtype
    codes = unblocked(quantize_affine(blocked(w2, spec), scale_view(scale, spec), scale_view(zero_point, spec), qtype.qmin, qtype.qmax,
                                      code_dtype), spec)
    stored: Stored = {"weight_scale": scale.float()}
    if qtype.packed:
        stored["weight_packed"] = pack_nibbles(int4_to_nibbles(codes) if qtype.signed else codes.to(torch.uint8))
    else:
        stored["weight"] = codes.to(qtype.storage_dtype)
    if not spec.symmetric:
        stored["weight_zero_point"] = zero_point.to(torch.int8 if qtype.signed else torch.uint8)
    return stored


def codes(stored: Stored, qtype: QType) -> torch.Tensor:
    """The integer codes [out, K] (int8 / uint8 / int32 nibbles) of a stored weight."""
    if qtype.packed:
        nibbles = unpack_nibbles(stored["weight_packed"])
        return nibbles_to_int4(nibbles) if qtype.signed else nibbles
    return stored["weight"]


def dequantize(stored: Stored, spec: TensorSpec, out: int, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q = codes(stored, get_qtype(spec.dtype))  # dequantize_affine widens the codes to float32 itself, exactly
    scale = scale_view(stored["weight_scale"], spec)
    zero_point = stored.get("weight_zero_point")
    zp = scale_view(zero_point, spec) if zero_point is not None else None
    return unblocked(dequantize_affine(blocked(q, spec), scale, zp, dtype), spec)


def input_params(spec: TensorSpec, lo: torch.Tensor, hi: torch.Tensor) -> Stored:
    qtype = get_qtype(spec.dtype)
    scale, zero_point = choose_qparams_affine(lo, hi, qtype.qmin, qtype.qmax, spec.symmetric, spec.scale_rule)
    params: Stored = {"input_scale": scale_in_dtype(scale.float(), spec)}
    if not spec.symmetric:
        params["input_zero_point"] = zero_point.to(torch.int8 if qtype.signed else torch.uint8)
    return params


def fake_quantize_input(x: torch.Tensor, spec: TensorSpec, params: Stored | None) -> torch.Tensor:
    if spec.shift is not None:  # x is already shifted (and smoothed) by the layer: `shifted_inputs`
        return fake_quantize_shifted(x, spec)
    qtype = get_qtype(spec.dtype)
    if params is not None:
        scale, zero_point = params["input_scale"], params.get("input_zero_point")
        zp = zero_point.to(torch.int32) if zero_point is not None else None
        return dequantize_affine(quantize_affine(x, scale, zp, qtype.qmin, qtype.qmax), scale, zp)
    blocks = blocked(x, spec)
    dims = dynamic_dims(blocks, spec)
    scale, zero_point = choose_qparams_affine(blocks.amin(dim=dims, keepdim=True), blocks.amax(dim=dims, keepdim=True),
                                              qtype.qmin, qtype.qmax, spec.symmetric, spec.scale_rule)
    scale = dynamic_scale_in_dtype(scale, spec)
    zp = None if spec.symmetric else zero_point
    codes = quantize_affine(blocks, scale, zp, qtype.qmin, qtype.qmax, reciprocal=spec.rounding == "half_even_reciprocal")
    return unblocked(dequantize_affine(codes, scale, zp), spec)


AFFINE = WeightFormat("affine", quantize, dequantize, input_params, fake_quantize_input)
