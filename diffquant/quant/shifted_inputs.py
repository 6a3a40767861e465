"""Shifted unsigned inputs: nunchaku's INT4 quantization of GELU outputs (TensorSpec `shift`).

nunchaku's INT4 Flux runs the input of each `mlp_fc2` (diffusers' ff.net.2, ff_context.net.2 and
the MLP columns of a single block's proj_out) as x + c on the unsigned int4 grid, c = SHIFT_GELU =
0.171875, so the GELU output (minimum about -0.1700) is non-negative and uses all 16 codes. What
its kernels compute (nunchaku-tech/nunchaku at 3a3cc3d0649a7d5bc575dc899a03f2d4456df181):

- the order (src/kernels/zgemm/gemm_w4a4.cuh, `EpilogueQuantize::apply_quantize`, fused after
  mlp_fc1's GEMM and GELU by `fused_gelu_mlp`, nunchaku/ops/fused.py): `dst = gelu(y) +
  shift_value` in the compute dtype, then `h2div(dst, smooth)`: v = (x + c) / s, the shift
  before the smoothing. The low-rank branch of mlp_fc2 (`EpilogueLoraDown`, ahead of the quantize
  epilogue in `launch_lora`, src/kernels/zgemm/gemm_w4a4_launch_impl.cuh) reads the GELU output
  unshifted: x · (lora_down / s)ᵀ. Flux always takes this fused path (its MLP activations are
  GELU); mlp_fc2's own GEMM (`act_unsigned=True`) reads the codes as unsigned.
- the grid (`quantize_w4a4_from_fpsum_warp<true>`, gemm_w4a4.cuh): per 64 channels, scale =
  max|v| · (1 / 15) (QVALUE_MAX_UNSIGNED), codes `cvt.rni` (round half to even) then
  `cvt.pack.sat.u4` (clamped to [0, 15]; a negative v becomes 0), the scale stored in the
  compute dtype. Signed INT4 inputs take the same path with 7 and [-8, 7].
- the bias: the kernel adds only the file's bias, so the shift's pass through the residual GEMM is
  cancelled by the converter. DeepCompressor (mit-han-lab/deepcompressor at 69f3473,
  deepcompressor/nn/patch/linear.py `ShiftedLinear.from_linear`, and backend/nunchaku/convert.py
  `convert_to_nunchaku_w4x4y16_linear_state_dict`) writes b - W c + lora_up (lora_down / s) c
  with the float weight W, in float64: b - c (R / s) 1 for the float residual R.

diffquant computes the same forward with one choice of its own, the bias: b' = b - c Σ_j
deq(R)_ij / s_j over the shifted columns j, from the stored (dequantized) residual, in float64,
rounded once to the bias dtype. Then Q((x + c) / s) deq(R)ᵀ - (c / s) deq(R)ᵀ = (x / s) deq(R)ᵀ +
(Q(v) - v) deq(R)ᵀ: the shift leaves only the activation's quantization error, where
DeepCompressor's float-weight bias leaves (c / s)(R - deq(R))ᵀ besides. Numerics here: x + c in
float32, rounded to x's dtype (the kernel's half2 add); the unsigned grid's scale max|v| / 15 by
division in float32 (as diffquant's signed dynamic INT4 takes amax / 7), codes round half to even
and clamped to [0, 15], dequantized as code · scale in float32. The kernel multiplies by a
reciprocal and dequantizes with the scale rounded to the compute dtype (at most 2^-9 relative in
bf16); codes may differ where v / scale lies within a rounding of a half-integer.

Example:
    >>> from diffquant.quant.spec import TensorSpec
    >>> spec = TensorSpec("int4", "per_group", group_size=4, dynamic=True, shift=0.171875)
    >>> x = torch.tensor([[0.765625, -0.015625, 0.046875, -0.421875]])  # v = x + c = [15, 2.5, 3.5, -4] / 16
    >>> fake_quantize_shifted(shift_input(x, spec), spec) * 16  # s = 1/16: codes 15, 2, 4 (ties to even), 0 (clamped)
    tensor([[15.,  2.,  4.,  0.]])
"""

from __future__ import annotations

import torch

from diffquant.quant.formats.affine import choose_qparams_affine, dequantize_affine, quantize_affine
from diffquant.quant.formats.blocks import from_blocks, to_blocks
from diffquant.quant.qtypes import get_qtype
from diffquant.quant.spec import TensorSpec

SHIFT_GELU = 0.171875  # nunchaku's SHIFT_GELU (gemm_w4a4_launch_impl.cuh), -0.171875 DeepCompressor's `infer_lowerbound("gelu")`


def shift_start(spec: TensorSpec) -> int:
    """The first shifted channel (a resolved `shift_from`)."""
    if not isinstance(spec.shift_from, int):
        raise ValueError(f"shift_from {spec.shift_from!r} is resolved per layer when it is planned (quantizer.resolve_shift_from)")
    return spec.shift_from


def shift_input(x: torch.Tensor, spec: TensorSpec, channel_dim: int = -1) -> torch.Tensor:
    """x with `spec.shift` added to channels [shift_from, C) along `channel_dim`, in float32 and
    rounded once to x's dtype."""
    start = shift_start(spec)
    moved = x.movedim(channel_dim, -1)
    head, tail = moved[..., :start], moved[..., start:]
    shifted = torch.cat([head, (tail.float() + float(spec.shift)).to(x.dtype)], dim=-1)  # type: ignore[arg-type]
    return shifted.movedim(-1, channel_dim)


def fake_quantize_shifted(v: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """Quantize-dequantize an already shifted (and smoothed) input v [..., C] in float32: channels
    [0, shift_from) on the signed grid (amax / 7, codes [-8, 7]), [shift_from, C) on the unsigned
    grid of the same width (max|v| / 15, codes [0, 15]), dynamic per group."""
    start = shift_start(spec)
    bits = get_qtype(spec.dtype).bits
    signed_max, unsigned_max = 2 ** (bits - 1) - 1, 2**bits - 1
    v = v.float()
    parts = []
    for values, qmin, qmax in ((v[..., :start], -signed_max - 1, signed_max), (v[..., start:], 0, unsigned_max)):
        if values.shape[-1] == 0:
            continue
        blocks = to_blocks(values, spec.group_size)
        amax = blocks.abs().amax(dim=-1, keepdim=True)
        scale, _ = choose_qparams_affine(-amax, amax, -qmax, qmax, symmetric=True)  # amax / qmax, zero point 0
        parts.append(from_blocks(dequantize_affine(quantize_affine(blocks, scale, None, qmin, qmax), scale, None)))
    return torch.cat(parts, dim=-1)


def shift_correction(weight: torch.Tensor, smooth: torch.Tensor | None, spec: TensorSpec) -> torch.Tensor:
    """c Σ_j weight_ij / s_j over the shifted columns j, float64 [out]: what the shift adds to the
    output of the GEMM whose (smoothed-space) weight is `weight` [out, K]."""
    start = shift_start(spec)
    columns = weight.double()[:, start:]
    if smooth is not None:
        columns = columns / smooth.double()[start:].reshape(1, -1)
    return float(spec.shift) * columns.sum(dim=1)  # type: ignore[arg-type]


def shifted_bias(bias: torch.Tensor | None, weight: torch.Tensor, smooth: torch.Tensor | None, spec: TensorSpec,
                 dtype: torch.dtype) -> torch.Tensor:
    """b - shift_correction(weight, smooth, spec), in float64, rounded once to `dtype` (b = 0 when None)."""
    base = bias.double() if bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    return (base - shift_correction(weight, smooth, spec).to(base.device)).to(bias.dtype if bias is not None else dtype)
