"""MXFP4 (OCP Microscaling Formats spec v1.0, Sept 2023): E2M1 elements, one E8M0 scale per 32.

Scale choice ("floor", the spec's §6.3 conversion): per block of 32 along the last dim,
shared_exp = floor(log2(amax_block)) - 2 (2 = E2M1_EMAX, since 4 = 2^2 is the largest power of two
<= 6), clamped to [-127, 127], stored as the biased byte shared_exp + 127. floor(log2) is read
exactly from the float32 exponent (`torch.frexp`), not from a rounded log2. Elements: E2M1 of
x / 2^shared_exp with round-to-nearest-even and saturation to +-6, so a block whose amax lies in
(6, 8) * 2^shared_exp clips up to 25 % (storage-and-formats.md §5.3). Other tools default to
"even" (Quark 0.13, compressed-tensors) or "rceil" (torchao inference); MXFP4_SCALE_MODE records
ours, for the manifest's "scale_mode".

Special blocks: an all-zero block has log2(0) = -inf, clamped to -127, i.e. byte 0 (2^-127), with
all codes 0 (exact zeros). A block holding NaN or +-inf gets byte 255 (E8M0 NaN) and dequantizes
to NaN as a whole (the spec's rule for a NaN scale); its codes carry no meaning.
Dequantization: x_hat = e2m1(c) * 2^(byte - 127).
"""

from __future__ import annotations

import torch

from diffquant.quant.formats.blocks import from_blocks, in_row_slices, rows_into, to_blocks
from diffquant.quant.formats.e2m1 import E2M1_EMAX, dequantize_e2m1, quantize_e2m1

MXFP4_BLOCK_SIZE = 32
MXFP4_SCALE_MODE = "floor"
E8M0_BIAS = 127
E8M0_NAN = 0xFF
_EXP_MIN, _EXP_MAX = -127, 127  # E8M0 range of 2^(byte - 127) for bytes 0..254

# Notable values: (name, bits, value). Checked with the OCP MX spec v1.0 (E8M0: unsigned 8-bit
# exponent, bias 127, no zero, no sign, 0xFF = NaN) and measured with torch.float8_e8m0fnu
# (storage-and-formats.md §5.3).
E8M0_TABLE: list[tuple[str, int, float]] = [
    ("min (2^-127, a float32 subnormal)", 0x00, 2.0**-127),
    ("half", 0x7E, 0.5),
    ("one", 0x7F, 1.0),
    ("two", 0x80, 2.0),
    ("max (2^127)", 0xFE, 2.0**127),
    ("NaN", 0xFF, float("nan")),
]


def mxfp4_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize [..., K] (K a multiple of 32) to E2M1 codes and E8M0 block scales ("floor" mode).

    Args:
        x: floating tensor [..., K], computed in float32.

    Returns:
        (codes uint8 [..., K] in [0, 15], unpacked; scale_e8m0 uint8 [..., K // 32] biased
        exponents). Pack the codes with `pack.pack_nibbles` for storage.

    Example:
        >>> codes, scale = mxfp4_quantize(torch.full((32,), 7.99))
        >>> scale, codes[0]
        (tensor([127], dtype=torch.uint8), tensor(7, dtype=torch.uint8))
    """
    if not x.is_floating_point():
        raise ValueError(f"mxfp4_quantize expects a floating tensor, got dtype {x.dtype}")
    codes, scale_e8m0 = in_row_slices(_quantize_blocks, x)  # rows are independent: a large weight goes in row slices
    return codes, scale_e8m0


def _quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = to_blocks(x.float(), MXFP4_BLOCK_SIZE)
    amax = blocks.abs().amax(dim=-1)
    # frexp: amax = m * 2^e with m in [0.5, 1), so floor(log2(amax)) = e - 1, exactly.
    _, exponent = torch.frexp(amax)
    shared_exp = torch.clamp(exponent - 1 - E2M1_EMAX, _EXP_MIN, _EXP_MAX)
    shared_exp = torch.where(amax == 0, torch.full_like(shared_exp, _EXP_MIN), shared_exp)
    scale_e8m0 = (shared_exp + E8M0_BIAS).to(torch.uint8)
    scale_e8m0 = torch.where(
        torch.isfinite(amax), scale_e8m0, torch.full_like(scale_e8m0, E8M0_NAN)
    )
    # Dividing by an exact power of two is exact (also for the subnormal 2^-127).
    codes = quantize_e2m1(blocks / e8m0_to_float(scale_e8m0).unsqueeze(-1))
    return from_blocks(codes), scale_e8m0


def mxfp4_dequantize(
    codes: torch.Tensor, scale_e8m0: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """x_hat = e2m1(codes) * 2^(scale_e8m0 - 127), in float32, cast to dtype.

    Args:
        codes: uint8 [..., K] unpacked E2M1 codes; scale_e8m0: uint8 [..., K // 32].

    Example:
        >>> codes = torch.full((32,), 7, dtype=torch.uint8)  # all +6.0
        >>> mxfp4_dequantize(codes, torch.tensor([128], dtype=torch.uint8))[0]  # scale 2^1
        tensor(12.)
    """
    if scale_e8m0.shape[:-1] != codes.shape[:-1] or (
        codes.dim() < 1 or codes.shape[-1] != MXFP4_BLOCK_SIZE * scale_e8m0.shape[-1]
    ):
        raise ValueError(
            f"codes {tuple(codes.shape)} and scale_e8m0 {tuple(scale_e8m0.shape)} do not match: "
            f"expected codes [..., K] and scales [..., K // {MXFP4_BLOCK_SIZE}]"
        )
    # Rows are independent: a large weight is dequantized in row slices straight into `dtype`.
    return rows_into(lambda rows: _dequantize_blocks(codes[rows], scale_e8m0[rows]), codes.shape, dtype, codes.device)


def _dequantize_blocks(codes: torch.Tensor, scale_e8m0: torch.Tensor) -> torch.Tensor:
    values = to_blocks(dequantize_e2m1(codes), MXFP4_BLOCK_SIZE)
    return from_blocks(values.mul_(e8m0_to_float(scale_e8m0).unsqueeze(-1)))


def e8m0_to_float(scale_e8m0: torch.Tensor) -> torch.Tensor:
    """Decode biased E8M0 bytes to float32 2^(byte - 127) exactly; 255 -> NaN.

    Built from float32 bit patterns, so no pow/ldexp rounding: bytes 1..254 are float32 normals
    with exponent field = byte, byte 0 is the subnormal 2^-127 (bit 22 set).

    Example:
        >>> e8m0_to_float(torch.tensor([126, 127, 255], dtype=torch.uint8))
        tensor([0.5000, 1.0000,    nan])
    """
    if scale_e8m0.dtype != torch.uint8:
        raise ValueError(f"E8M0 scales must be uint8 bytes, got dtype {scale_e8m0.dtype}")
    biased = scale_e8m0.to(torch.int32)
    bits = torch.where(biased == 0, torch.full_like(biased, 1 << 22), biased << 23)
    bits = torch.where(biased == E8M0_NAN, torch.full_like(biased, 0x7FC00000), bits)
    return bits.view(torch.float32)
