"""NVFP4 (NVIDIA Blackwell): E2M1 elements, an E4M3 scale per 16, and an fp32 per-tensor scale.

Scale choice (ModelOpt `NVFP4QTensor`, torchao `per_tensor_amax_to_scale`; storage-and-formats.md
§5.4): global_scale = amax_tensor / (6 * 448), multiplicative (`weight_scale_2`; compressed-tensors
stores the reciprocal), so the block with the tensor's amax gets block scale 448. Per block of 16
along the last dim: block_scale = e4m3(min(amax_block / (6 * global_scale), 448)), RNE cast.
A block scale that is 0 after the cast (an all-zero block, or a block so small that its ratio
underflows E4M3) is stored as 1.0, ModelOpt's convention: its codes are then 0 and it
dequantizes to exact zeros, where a stored 0 would make x / scale NaN.
Elements: e2m1(x / (float(block_scale) * global_scale)), round-to-nearest-even, saturating to
+-6 (the block scale is rounded, so values slightly above 6 clip). A block holding NaN gets a NaN
block scale (E4M3 0x7F) and dequantizes to NaN; +-inf saturates (block scale 448, element +-6).
Dequantization: x_hat = e2m1(c) * (float(block_scale) * global_scale).
"""

from __future__ import annotations

import torch

from diffquant.quant.formats.blocks import from_blocks, to_blocks
from diffquant.quant.formats.e2m1 import E2M1_MAX, dequantize_e2m1, quantize_e2m1
from diffquant.quant.formats.fp8 import FP8_E4M3_MAX

NVFP4_BLOCK_SIZE = 16
NVFP4_GLOBAL_DENOMINATOR = E2M1_MAX * FP8_E4M3_MAX  # 6 * 448 = 2688
_F32_TINY = torch.finfo(torch.float32).tiny  # 2^-126


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
    blocks = to_blocks(x.float(), NVFP4_BLOCK_SIZE)
    global_scale = global_scale.float()
    amax = blocks.abs().amax(dim=-1)
    ratio = torch.clamp(amax / (E2M1_MAX * global_scale), max=FP8_E4M3_MAX)
    rounded = ratio.to(torch.float8_e4m3fn).float()
    block_scale = torch.where(rounded == 0, 1.0, rounded).to(torch.float8_e4m3fn)
    step = _step(block_scale, global_scale)
    codes = quantize_e2m1(blocks / step.unsqueeze(-1))
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
    values = to_blocks(dequantize_e2m1(codes), NVFP4_BLOCK_SIZE)
    step = _step(block_scale, global_scale.float())
    return from_blocks(values * step.unsqueeze(-1)).to(dtype)


def _step(block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    # One product for both directions, so quantize and dequantize use the same float32 step.
    return block_scale.float() * global_scale
