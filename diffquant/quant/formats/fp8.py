"""FP8 (OCP OFP8 E4M3FN and E5M2) with a float32 scale: q = fp8(clamp(x / s, -max, max)).

Rounding: round-to-nearest-even (torch's float -> float8 cast, measured on torch 2.13 CPU:
1.0625 -> 1.0, 1.1875 -> 1.25). Saturation: x / s is clamped to +-max *before* the cast, so
overflow and +-inf give +-max on every torch version (older casts copied from c10 returned NaN
for |x| >= 480 in E4M3, and E5M2 casts overflow to inf). NaN stays NaN (E4M3 0x7F, E5M2 0x7F).
Value set: E4M3FN max 448, min normal 2^-6, min subnormal 2^-9, no inf; E5M2 max 57344, min
normal 2^-14, min subnormal 2^-16, with inf. Scale choice: s = amax / max, so amax maps to the
largest finite value (storage-and-formats.md §5.1, §4.3: x_hat = float(q) * s).
"""

from __future__ import annotations

import torch

FP8_E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448.0 = 2^8 * 1.75, bits 0_1111_110
FP8_E5M2_MAX = torch.finfo(torch.float8_e5m2).max  # 57344.0 = 2^15 * 1.75, bits 0_11110_11
FP8_MAX: dict[torch.dtype, float] = {
    torch.float8_e4m3fn: FP8_E4M3_MAX,
    torch.float8_e5m2: FP8_E5M2_MAX,
}
_F32_TINY = torch.finfo(torch.float32).tiny  # 2^-126

_NAN = float("nan")
# Notable values: (name, bits, value). Checked with the OCP 8-bit Floating Point Specification
# (OFP8) rev 1.0 and arXiv 2209.05433 ("FP8 Formats for Deep Learning"), Table 1, as torchao
# `fp_format_spec.py` does; the torch casts were checked against them in tests/test_formats.py.
FP8_E4M3_TABLE: list[tuple[str, int, float]] = [
    ("zero", 0b0_0000_000, 0.0),
    ("neg zero", 0b1_0000_000, -0.0),
    ("min subnormal", 0b0_0000_001, 2.0**-9),
    ("max subnormal", 0b0_0000_111, 0.875 * 2.0**-6),
    ("min normal", 0b0_0001_000, 2.0**-6),
    ("one", 0b0_0111_000, 1.0),
    ("max normal", 0b0_1111_110, 448.0),
    ("neg max normal", 0b1_1111_110, -448.0),
    ("NaN (S.1111.111 only, no inf)", 0b0_1111_111, _NAN),
]
FP8_E5M2_TABLE: list[tuple[str, int, float]] = [
    ("zero", 0b0_00000_00, 0.0),
    ("neg zero", 0b1_00000_00, -0.0),
    ("min subnormal", 0b0_00000_01, 2.0**-16),
    ("max subnormal", 0b0_00000_11, 0.75 * 2.0**-14),
    ("min normal", 0b0_00001_00, 2.0**-14),
    ("one", 0b0_01111_00, 1.0),
    ("max normal", 0b0_11110_11, 57344.0),
    ("neg max normal", 0b1_11110_11, -57344.0),
    ("inf", 0b0_11111_00, float("inf")),
    ("neg inf", 0b1_11111_00, float("-inf")),
    ("NaN", 0b0_11111_11, _NAN),
]


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """q = fp8_dtype(clamp(x / scale, -max, max)), divided in float32, RNE cast.

    Args:
        x: floating tensor [...]; scale: float32 broadcasting against x ([] or [out, 1]).
        fp8_dtype: torch.float8_e4m3fn or torch.float8_e5m2.

    Returns:
        Tensor of fp8_dtype with the broadcast shape.

    Example:
        >>> quantize_fp8(torch.tensor([1e4, 1.0625]), torch.tensor(1.0), torch.float8_e4m3fn)
        tensor([448.,   1.], dtype=torch.float8_e4m3fn)
    """
    fp8_max = _fp8_max(fp8_dtype)
    return torch.clamp(x.float() / scale.float(), -fp8_max, fp8_max).to(fp8_dtype)


def dequantize_fp8(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """x_hat = float(q) * scale, in float32, cast to dtype (exact before the final cast).

    Example:
        >>> dequantize_fp8(torch.tensor([448.0]).to(torch.float8_e4m3fn), torch.tensor(0.5))
        tensor([224.])
    """
    _fp8_max(q.dtype)
    return (q.float() * scale.float()).to(dtype)


def choose_fp8_scale(amax: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """Scale s = amax / max(fp8_dtype) as float32, same shape as amax.

    amax == 0 gives 1.0 (all codes 0, exact zero dequantization); a nonzero scale below float32's
    smallest normal (2^-126) is raised to it, so x / s stays finite. amax must be finite and >= 0.

    Example:
        >>> choose_fp8_scale(torch.tensor([896.0, 0.0]), torch.float8_e4m3fn)
        tensor([2., 1.])
    """
    fp8_max = _fp8_max(fp8_dtype)
    amax = amax.float()
    if not bool((torch.isfinite(amax) & (amax >= 0)).all()):
        raise ValueError("amax must be finite and >= 0 (an abs-max of finite values)")
    scale = torch.clamp(amax / fp8_max, min=_F32_TINY)
    return torch.where(amax == 0, torch.ones_like(scale), scale)


def _fp8_max(fp8_dtype: torch.dtype) -> float:
    if fp8_dtype not in FP8_MAX:
        raise ValueError(
            f"fp8 dtype {fp8_dtype} is not supported; use torch.float8_e4m3fn or torch.float8_e5m2"
        )
    return FP8_MAX[fp8_dtype]
