"""E2M1 (FP4) elements: the 4-bit float shared by MXFP4 and NVFP4.

Layout: bit 3 sign, bits 2-1 exponent (bias 1), bit 0 mantissa; no inf, no NaN. Codes 0-7 are the
magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6} in increasing order, codes 8-15 their negatives (8 = -0).
The code of a magnitude is its index in that list, so rounding is a search over seven midpoints.

Rounding: round-to-nearest, ties to the code whose mantissa bit is 0 ("even"). Saturation:
|x| > 6 (including +-inf) maps to +-6. NaN maps to code 7 (+6.0): E2M1 has no NaN encoding, so
NaN is carried by the block scale instead (MXFP4 E8M0 byte 255, NVFP4 E4M3 0x7F), which makes the
whole dequantized block NaN. The sign is kept for values that round to zero (-0.1 -> code 8, -0),
as IEEE rounding does; -0.0 compares equal to 0.0. There is no scale here: callers divide first.
"""

from __future__ import annotations

import torch

# Code -> value, checked with the OCP Microscaling Formats (MX) spec v1.0 (Sept 2023), §5.3
# "Element Data Types", FP4 E2M1 (exponent bias 1, max normal 6.0, min normal 1.0, one subnormal
# 0.5), and torchao `prototype/mx_formats/fp_format_spec.py` `float4_e2m1_interesting_values`.
E2M1_VALUES: tuple[float, ...] = (
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip
E2M1_MAX = E2M1_VALUES[7]  # 6.0 = 2^2 * 1.5, code 0b0111
E2M1_EMAX = 2  # exponent of the largest power of two <= E2M1_MAX (4 = 2^2), used by MXFP4
E2M1_NAN_CODE = 7  # where NaN input goes; see the module docstring

# Notable values: (name, code, value); the code is the 4-bit pattern S.EE.M. Same sources as above.
E2M1_TABLE: list[tuple[str, int, float]] = [
    ("zero", 0b0_00_0, 0.0),
    ("min subnormal (the only one)", 0b0_00_1, 0.5),
    ("min normal", 0b0_01_0, 1.0),
    ("1.5", 0b0_01_1, 1.5),
    ("2.0", 0b0_10_0, 2.0),
    ("3.0", 0b0_10_1, 3.0),
    ("4.0", 0b0_11_0, 4.0),
    ("max normal", 0b0_11_1, 6.0),
    ("neg zero", 0b1_00_0, -0.0),
    ("neg min subnormal", 0b1_00_1, -0.5),
    ("neg min normal", 0b1_01_0, -1.0),
    ("-1.5", 0b1_01_1, -1.5),
    ("-2.0", 0b1_10_0, -2.0),
    ("-3.0", 0b1_10_1, -3.0),
    ("-4.0", 0b1_11_0, -4.0),
    ("neg max normal", 0b1_11_1, -6.0),
]

# Midpoints between consecutive magnitudes. A tie at midpoint k (between codes k and k+1) goes
# to the even code: down when k is even, up when k is odd.
_TIES_DOWN = (0.25, 1.25, 2.5, 5.0)  # k = 0, 2, 4, 6 -> codes 0, 2, 4, 6
_TIES_UP = (0.75, 1.75, 3.5)  # k = 1, 3, 5 -> codes 2, 4, 6


def quantize_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round a float tensor to E2M1 codes (RNE, saturating to +-6, NaN -> code 7).

    Args:
        x: floating tensor of any shape, already divided by its scale. Computed in float32
            (float64 input stays float64, so no double rounding).

    Returns:
        uint8 tensor, same shape, codes in [0, 15] (bit 3 = sign), one code per byte.

    Example:
        >>> quantize_e2m1(torch.tensor([0.25, 0.75, -5.0, 7.0]))
        tensor([ 0,  2, 14,  7], dtype=torch.uint8)
    """
    if not x.is_floating_point():
        raise ValueError(f"quantize_e2m1 expects a floating tensor, got dtype {x.dtype}")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(work)
    mag = xf.abs().contiguous()  # bucketize copies a strided input itself (and warns); one copy either way
    ties_down = torch.tensor(_TIES_DOWN, dtype=work, device=x.device)
    ties_up = torch.tensor(_TIES_UP, dtype=work, device=x.device)
    # code = number of midpoints passed: strictly for round-down ties, inclusively for round-up.
    passed_down = torch.bucketize(mag, ties_down, right=False, out_int32=True)  # int32: half int64's temporaries
    passed_up = torch.bucketize(mag, ties_up, right=True, out_int32=True)
    code = passed_down.add_(passed_up).to(torch.uint8)
    code = code | (torch.signbit(xf).to(torch.uint8) << 3)
    return torch.where(torch.isnan(xf), torch.full_like(code, E2M1_NAN_CODE), code)


def dequantize_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Decode E2M1 codes to float32 (exact: every E2M1 value is a float32).

    Args:
        codes: uint8 tensor of any shape, values in [0, 15] (unpacked, one code per byte).

    Returns:
        float32 tensor, same shape; code 8 gives -0.0.

    Example:
        >>> dequantize_e2m1(torch.tensor([0, 7, 9], dtype=torch.uint8))
        tensor([ 0.0000,  6.0000, -0.5000])
    """
    if codes.dtype != torch.uint8:
        raise ValueError(f"E2M1 codes must be uint8 (one code per byte), got dtype {codes.dtype}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(
            f"E2M1 codes must be in [0, 15], got a maximum of {int(codes.max())}; "
            "unpack packed bytes with unpack_nibbles first"
        )
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    return lut[codes.to(torch.int32)]
