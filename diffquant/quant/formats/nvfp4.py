"""NVFP4 (NVIDIA Blackwell): E2M1 elements, an E4M3 scale per 16, and an fp32 per-tensor scale.

Scale choice (ModelOpt `NVFP4QTensor`, torchao `per_tensor_amax_to_scale`; storage-and-formats.md
§5.4): global_scale = amax_tensor / (6 * 448), multiplicative (`weight_scale_2`; compressed-tensors
stores the reciprocal), so the block with the tensor's amax gets block scale 448. Per block of 16
along the last dim: ratio = amax_block / (6 * global_scale); an all-zero block (ratio 0) gets
1.0; block_scale = e4m3(clamp(ratio, 2^-9, 448)), RNE cast. This is ModelOpt's
`NVFP4QTensor.get_weights_scaling_factor` with `_cast_per_block_scale_to_fp8`: a ratio below
E4M3's smallest subnormal 2^-9 is raised to it instead of rounding to 0, so a tiny block keeps
its values (x = 6 * 2^-10 in a tensor whose amax is 2688 is code 5, 3.0 * 2^-9) rather than
dequantizing to zeros; an all-zero block has codes 0 and dequantizes to exact zeros.
Elements: e2m1(x / (float(block_scale) * global_scale)), round-to-nearest-even, saturating to
+-6 (the block scale is rounded, so values slightly above 6 clip). An element that is exactly
zero gets code 0 whatever its sign (-0.0 -> 0x0, not 0x8), as ModelOpt's `_cast_fp4` takes the
sign from `x < 0`; a nonzero negative that rounds to zero keeps the sign (code 8), as there. A block holding NaN gets a NaN
block scale (E4M3 0x7F) and dequantizes to NaN; +-inf saturates (block scale 448, element +-6).
Dequantization: x_hat = e2m1(c) * (float(block_scale) * global_scale).
"""

from __future__ import annotations

import torch

from diffquant.quant.formats.blocks import from_blocks, in_row_slices, rows_into, to_blocks
from diffquant.quant.formats.e2m1 import E2M1_MAX, dequantize_e2m1, quantize_e2m1
from diffquant.quant.formats.fp8 import FP8_E4M3_MAX

NVFP4_BLOCK_SIZE = 16
NVFP4_GLOBAL_DENOMINATOR = E2M1_MAX * FP8_E4M3_MAX  # 6 * 448 = 2688
_F32_TINY = torch.finfo(torch.float32).tiny  # 2^-126
E4M3_MIN_SUBNORMAL = 2.0**-9  # E4M3 0x01: the smallest block scale (ModelOpt's clamp floor)


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """Per-tensor float32 scale amax / (6 * 448), same shape as amax (usually []).

    amax == 0 gives 1.0; a nonzero result below 2^-126 is raised to it. amax must be finite, >= 0.

    Example:
        >>> nvfp4_global_scale(torch.tensor(5376.0))
        tensor(2.)
    """
    amax = amax.float()
    if not bool((torch.isfinite(amax) & (amax >= 0)).all()):
        raise ValueError("amax must be finite and >= 0 (an abs-max of finite values)")
    scale = torch.clamp(amax / NVFP4_GLOBAL_DENOMINATOR, min=_F32_TINY)
    return torch.where(amax == 0, torch.ones_like(scale), scale)


def nvfp4_quantize(
    x: torch.Tensor, global_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize [..., K] (K a multiple of 16) to E2M1 codes and E4M3 block scales.

    Args:
        x: floating tensor [..., K], computed in float32.
        global_scale: float32 from `nvfp4_global_scale`, shape [] (or broadcastable to
            [..., K // 16]).

    Returns:
        (codes uint8 [..., K] in [0, 15], unpacked; block_scale float8_e4m3fn [..., K // 16]).

    Example:
        >>> codes, bs = nvfp4_quantize(torch.full((16,), 30.0), torch.tensor(2.0))
        >>> bs.float(), codes[0]
        (tensor([2.5000]), tensor(7, dtype=torch.uint8))
    """
    if not x.is_floating_point():
        raise ValueError(f"nvfp4_quantize expects a floating tensor, got dtype {x.dtype}")
    global_scale = global_scale.float()
    if global_scale.numel() == 1:  # rows are independent: a large weight goes in row slices
        codes, block_scale = in_row_slices(lambda rows: _quantize_blocks(rows, global_scale), x)
        return codes, block_scale
    return _quantize_blocks(x, global_scale)


def _quantize_blocks(x: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = to_blocks(x.float(), NVFP4_BLOCK_SIZE)
    amax = blocks.abs().amax(dim=-1)
    ratio = amax / (E2M1_MAX * global_scale)
    ratio = torch.where(ratio == 0, 1.0, torch.clamp(ratio, min=E4M3_MIN_SUBNORMAL, max=FP8_E4M3_MAX))
    block_scale = ratio.to(torch.float8_e4m3fn)
    step = _step(block_scale, global_scale)
    scaled = blocks / step.unsqueeze(-1)
    codes = torch.where(scaled == 0, 0, quantize_e2m1(scaled)).to(torch.uint8)
    return from_blocks(codes), block_scale


def nvfp4_dequantize(
    codes: torch.Tensor,
    block_scale: torch.Tensor,
    global_scale: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """x_hat = e2m1(codes) * (float(block_scale) * global_scale), in float32, cast to dtype.

    Args:
        codes: uint8 [..., K] unpacked; block_scale: float8_e4m3fn [..., K // 16];
        global_scale: float32 [] (or broadcastable to block_scale).

    Example:
        >>> nvfp4_dequantize(torch.full((16,), 7, dtype=torch.uint8),
        ...                  torch.tensor([2.5]).to(torch.float8_e4m3fn), torch.tensor(2.0))[0]
        tensor(30.)
    """
    if block_scale.dtype != torch.float8_e4m3fn:
        raise ValueError(f"NVFP4 block scales must be float8_e4m3fn, got dtype {block_scale.dtype}")
    if block_scale.shape[:-1] != codes.shape[:-1] or (
        codes.dim() < 1 or codes.shape[-1] != NVFP4_BLOCK_SIZE * block_scale.shape[-1]
    ):
        raise ValueError(
            f"codes {tuple(codes.shape)} and block_scale {tuple(block_scale.shape)} do not match: "
            f"expected codes [..., K] and block scales [..., K // {NVFP4_BLOCK_SIZE}]"
        )
    global_scale = global_scale.float()
    if global_scale.numel() != 1:
        return _dequantize_blocks(codes, block_scale, global_scale).to(dtype)
    # Rows are independent: a large weight is dequantized in row slices straight into `dtype`.
    return rows_into(lambda rows: _dequantize_blocks(codes[rows], block_scale[rows], global_scale), codes.shape, dtype, codes.device)


def _dequantize_blocks(codes: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    values = to_blocks(dequantize_e2m1(codes), NVFP4_BLOCK_SIZE)
    return from_blocks(values.mul_(_step(block_scale, global_scale).unsqueeze(-1)))


def _step(block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    # One product for both directions, so quantize and dequantize use the same float32 step.
    return block_scale.float() * global_scale
