"""Codecs: a TensorSpec applied to real tensors, on top of the pure functions in `formats/`.

A codec turns a weight into the tensors the checkpoint stores (named by suffix, e.g. `weight`,
`weight_packed`, `weight_scale`, `weight_zero_point`, `weight_scale_2`; storage-and-formats.md
§4.3), turns them back into the dequantized weight, and fake-quantizes activations, with static
parameters (`input_scale`, `input_zero_point`, `input_scale_2`) or dynamic ones computed per call.
The module that uses a codec never needs to know how a format packs its bits.

Layouts. A weight [out, ...] is quantized as W2 = weight.reshape(out, K). Scales have the shape
[] (per_tensor), [out, 1] (per_channel) or [out, K // g] (per_group). Activations are quantized
along their channel dim (-1 for Linear inputs, 1 for Conv2d inputs): per_tensor has one scale;
per_group groups g consecutive channels of each token / pixel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from diffquant.quant.formats.affine import choose_qparams_affine, dequantize_affine, quantize_affine
from diffquant.quant.formats.blocks import from_blocks, to_blocks
from diffquant.quant.formats.fp8 import choose_fp8_scale, dequantize_fp8, quantize_fp8
from diffquant.quant.formats.mxfp4 import mxfp4_dequantize, mxfp4_quantize
from diffquant.quant.formats.nvfp4 import nvfp4_dequantize, nvfp4_global_scale, nvfp4_quantize
from diffquant.quant.formats.pack import int4_to_nibbles, nibbles_to_int4, pack_nibbles, unpack_nibbles
from diffquant.quant.qtypes import QType, get_qtype
from diffquant.quant.spec import TensorSpec

Stored = dict[str, torch.Tensor]


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


def quantize_weight(weight: torch.Tensor, spec: TensorSpec, lo: torch.Tensor, hi: torch.Tensor) -> Stored:
    """Quantize a weight given its clipping range per row of `weight_rows` (lo, hi: [rows])."""
    return _CODECS[_family(spec)].quantize_weight(weight.detach().float().reshape(weight.shape[0], -1), spec, lo, hi)


def dequantize_weight(stored: Stored, spec: TensorSpec, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weight in `shape`, computed in float32 and cast to `dtype` once."""
    k = shape.numel() // shape[0]
    w2 = _CODECS[_family(spec)].dequantize_weight(stored, spec, shape[0], k)
    return w2.reshape(shape).to(dtype)


def input_params(spec: TensorSpec, lo: torch.Tensor, hi: torch.Tensor) -> Stored:
    """Frozen static parameters of an input spec from the observed range (lo, hi: shape [])."""
    return _CODECS[_family(spec)].input_params(spec, lo.reshape(()), hi.reshape(()))


def fake_quantize(x: torch.Tensor, spec: TensorSpec, params: Stored | None, channel_dim: int = -1) -> torch.Tensor:
    """Quantize then dequantize an activation; static when `params` is given, else dynamic.

    The result has x's dtype; arithmetic is float32.
    """
    moved = x.movedim(channel_dim, -1) if channel_dim not in (-1, x.dim() - 1) else x
    out = _CODECS[_family(spec)].fake_quantize(moved.float(), spec, params)
    if moved is not x:
        out = out.movedim(-1, channel_dim)
    return out.to(x.dtype)


@dataclass(frozen=True)
class _Codec:
    quantize_weight: Callable[[torch.Tensor, TensorSpec, torch.Tensor, torch.Tensor], Stored]
    dequantize_weight: Callable[[Stored, TensorSpec, int, int], torch.Tensor]
    input_params: Callable[[TensorSpec, torch.Tensor, torch.Tensor], Stored]
    fake_quantize: Callable[[torch.Tensor, TensorSpec, Stored | None], torch.Tensor]


def _family(spec: TensorSpec) -> str:
    qtype = get_qtype(spec.dtype)
    if qtype.element == "int":
        return "int"
    if qtype.element in ("e4m3", "e5m2"):
        return "fp8"
    return qtype.name


def _blocked(x: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """Rows [..., K] as [..., K/g, g] for per_group, else unchanged."""
    return to_blocks(x, spec.group_size) if spec.granularity == "per_group" else x


def _scale_view(scale: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    return scale.unsqueeze(-1) if spec.granularity == "per_group" else scale


def _range_to_scale_shape(values: torch.Tensor, w2: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    out, k = w2.shape
    return values.reshape(scale_shape(torch.Size((out, k)), spec))


# INT8 / UINT8 / INT4 / UINT4 (affine).
def _int_quantize_weight(w2: torch.Tensor, spec: TensorSpec, lo: torch.Tensor, hi: torch.Tensor) -> Stored:
    qtype = get_qtype(spec.dtype)
    scale, zero_point = choose_qparams_affine(
        _range_to_scale_shape(lo, w2, spec), _range_to_scale_shape(hi, w2, spec), qtype.qmin, qtype.qmax, spec.symmetric
    )
    codes = from_blocks(quantize_affine(_blocked(w2, spec), _scale_view(scale, spec), _scale_view(zero_point, spec), qtype.qmin, qtype.qmax)) \
        if spec.granularity == "per_group" else quantize_affine(w2, scale, zero_point, qtype.qmin, qtype.qmax)
    stored: Stored = {"weight_scale": scale.float()}
    if qtype.packed:
        nibbles = int4_to_nibbles(codes) if qtype.signed else codes.to(torch.uint8)
        stored["weight_packed"] = pack_nibbles(nibbles)
    else:
        stored["weight"] = codes.to(qtype.storage_dtype)
    if not spec.symmetric:
        stored["weight_zero_point"] = zero_point.to(torch.int8 if qtype.signed else torch.uint8)
    return stored


def _int_codes(stored: Stored, qtype: QType) -> torch.Tensor:
    if qtype.packed:
        nibbles = unpack_nibbles(stored["weight_packed"])
        return nibbles_to_int4(nibbles) if qtype.signed else nibbles
    return stored["weight"]


def _int_dequantize_weight(stored: Stored, spec: TensorSpec, out: int, k: int) -> torch.Tensor:
    qtype = get_qtype(spec.dtype)
    codes = _int_codes(stored, qtype).to(torch.int32)
    scale = stored["weight_scale"]
    zero_point = stored.get("weight_zero_point")
    if spec.granularity == "per_group":
        zp = _scale_view(zero_point, spec) if zero_point is not None else None
        return from_blocks(dequantize_affine(to_blocks(codes, spec.group_size), _scale_view(scale, spec), zp))
    return dequantize_affine(codes, scale, zero_point)


def _int_input_params(spec: TensorSpec, lo: torch.Tensor, hi: torch.Tensor) -> Stored:
    qtype = get_qtype(spec.dtype)
    scale, zero_point = choose_qparams_affine(lo, hi, qtype.qmin, qtype.qmax, spec.symmetric)
    params: Stored = {"input_scale": scale.float()}
    if not spec.symmetric:
        params["input_zero_point"] = zero_point.to(torch.int8 if qtype.signed else torch.uint8)
    return params


def _int_fake_quantize(x: torch.Tensor, spec: TensorSpec, params: Stored | None) -> torch.Tensor:
    qtype = get_qtype(spec.dtype)
    if params is not None:
        scale, zero_point = params["input_scale"], params.get("input_zero_point")
        zp = zero_point.to(torch.int32) if zero_point is not None else None
        return dequantize_affine(quantize_affine(x, scale, zp, qtype.qmin, qtype.qmax), scale, zp)
    blocks = _blocked(x, spec)
    dims = (-1,) if spec.granularity == "per_group" else tuple(range(blocks.dim()))
    lo = blocks.amin(dim=dims, keepdim=True)
    hi = blocks.amax(dim=dims, keepdim=True)
    scale, zero_point = choose_qparams_affine(lo, hi, qtype.qmin, qtype.qmax, spec.symmetric)
    zp = None if spec.symmetric else zero_point
    out = dequantize_affine(quantize_affine(blocks, scale, zp, qtype.qmin, qtype.qmax), scale, zp)
    return from_blocks(out) if spec.granularity == "per_group" else out


# FP8 E4M3 / E5M2.
def _fp8_dtype(spec: TensorSpec) -> torch.dtype:
    return get_qtype(spec.dtype).storage_dtype


def _fp8_quantize_weight(w2: torch.Tensor, spec: TensorSpec, lo: torch.Tensor, hi: torch.Tensor) -> Stored:
    amax = torch.maximum(lo.abs(), hi.abs())
    scale = choose_fp8_scale(_range_to_scale_shape(amax, w2, spec), _fp8_dtype(spec)).float()
    codes = from_blocks(quantize_fp8(_blocked(w2, spec), _scale_view(scale, spec), _fp8_dtype(spec))) \
        if spec.granularity == "per_group" else quantize_fp8(w2, scale, _fp8_dtype(spec))
    return {"weight": codes, "weight_scale": scale}


def _fp8_dequantize_weight(stored: Stored, spec: TensorSpec, out: int, k: int) -> torch.Tensor:
    scale = stored["weight_scale"]
    if spec.granularity == "per_group":
        return from_blocks(dequantize_fp8(to_blocks(stored["weight"], spec.group_size), _scale_view(scale, spec)))
    return dequantize_fp8(stored["weight"], scale)


def _fp8_input_params(spec: TensorSpec, lo: torch.Tensor, hi: torch.Tensor) -> Stored:
    return {"input_scale": choose_fp8_scale(torch.maximum(lo.abs(), hi.abs()), _fp8_dtype(spec)).float()}


def _fp8_fake_quantize(x: torch.Tensor, spec: TensorSpec, params: Stored | None) -> torch.Tensor:
    if params is not None:
        scale = params["input_scale"]
        return dequantize_fp8(quantize_fp8(x, scale, _fp8_dtype(spec)), scale)
    blocks = _blocked(x, spec)
    dims = (-1,) if spec.granularity == "per_group" else tuple(range(blocks.dim()))
    scale = choose_fp8_scale(blocks.abs().amax(dim=dims, keepdim=True), _fp8_dtype(spec))
    out = dequantize_fp8(quantize_fp8(blocks, scale, _fp8_dtype(spec)), scale)
    return from_blocks(out) if spec.granularity == "per_group" else out


# MXFP4 (OCP MX v1.0): block scales are always computed from the data, so inputs are dynamic.
def _mxfp4_quantize_weight(w2: torch.Tensor, spec: TensorSpec, lo: torch.Tensor, hi: torch.Tensor) -> Stored:
    codes, scale = mxfp4_quantize(w2)
    return {"weight_packed": pack_nibbles(codes), "weight_scale": scale}


def _mxfp4_dequantize_weight(stored: Stored, spec: TensorSpec, out: int, k: int) -> torch.Tensor:
    return mxfp4_dequantize(unpack_nibbles(stored["weight_packed"]), stored["weight_scale"])


def _mxfp4_fake_quantize(x: torch.Tensor, spec: TensorSpec, params: Stored | None) -> torch.Tensor:
    codes, scale = mxfp4_quantize(x)
    return mxfp4_dequantize(codes, scale)


def _no_input_params(spec: TensorSpec, lo: torch.Tensor, hi: torch.Tensor) -> Stored:
    return {}


# NVFP4: static activations freeze the per-tensor scale; block scales are computed per call.
def _nvfp4_quantize_weight(w2: torch.Tensor, spec: TensorSpec, lo: torch.Tensor, hi: torch.Tensor) -> Stored:
    global_scale = nvfp4_global_scale(torch.maximum(lo.abs(), hi.abs()).amax().reshape(()))
    codes, block_scale = nvfp4_quantize(w2, global_scale)
    return {"weight_packed": pack_nibbles(codes), "weight_scale": block_scale, "weight_scale_2": global_scale.float()}


def _nvfp4_dequantize_weight(stored: Stored, spec: TensorSpec, out: int, k: int) -> torch.Tensor:
    return nvfp4_dequantize(unpack_nibbles(stored["weight_packed"]), stored["weight_scale"], stored["weight_scale_2"])


def _nvfp4_input_params(spec: TensorSpec, lo: torch.Tensor, hi: torch.Tensor) -> Stored:
    return {"input_scale_2": nvfp4_global_scale(torch.maximum(lo.abs(), hi.abs())).float()}


def _nvfp4_fake_quantize(x: torch.Tensor, spec: TensorSpec, params: Stored | None) -> torch.Tensor:
    global_scale = params["input_scale_2"] if params else nvfp4_global_scale(x.abs().amax())
    codes, block_scale = nvfp4_quantize(x, global_scale)
    return nvfp4_dequantize(codes, block_scale, global_scale)


_CODECS: dict[str, _Codec] = {
    "int": _Codec(_int_quantize_weight, _int_dequantize_weight, _int_input_params, _int_fake_quantize),
    "fp8": _Codec(_fp8_quantize_weight, _fp8_dequantize_weight, _fp8_input_params, _fp8_fake_quantize),
    "mxfp4": _Codec(_mxfp4_quantize_weight, _mxfp4_dequantize_weight, _no_input_params, _mxfp4_fake_quantize),
    "nvfp4": _Codec(_nvfp4_quantize_weight, _nvfp4_dequantize_weight, _nvfp4_input_params, _nvfp4_fake_quantize),
}
