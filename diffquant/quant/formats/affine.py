"""Affine integer quantization (INT8, UINT8, INT4, UINT4): q = clamp(round(x / s) + zp, qmin, qmax).

Rounding: round half to even (`torch.round`), in float32. Saturation: codes are clamped to
[qmin, qmax]; +-inf saturate, NaN maps to code zp (dequantizes to 0). Scales are float32 and
zero points int32; per-tensor / per-channel / per-group is only a matter of the scale's shape,
which must broadcast against x (per group: against `blocks.to_blocks(x, group_size)`). Dequantization is
x_hat = (q - zp) * s (storage-and-formats.md §5.5).

Scale choice (`choose_qparams_affine`):
- symmetric (signed types only): s = max(|min|, |max|) / qmax, zp = 0; for INT8 qmax = 127 and
  INT4 qmax = 7, so in-range values use [-qmax, qmax] and qmin (-128 / -8) only holds clipped ones
  (pass qmin = -qmax for a restricted range).
- symmetric with scale_rule="half_span" (the INT8 recipes, the INT4 weights, w4a4's inputs):
  s = max(|min|, |max|) / ((qmax - qmin) / 2), i.e. amax / 127.5 for INT8 and amax / 7.5 for INT4. This is AMD Quark 0.13's rule
  (`quark/torch/quantization/observer/observer.py`, `UniformScalingObserver.calculate_int_quant_params`:
  `scale = max_val_pos / (float(quant_max - quant_min) / 2)`, then raised to float32 eps; codes
  clamped to [quant_min, quant_max] = [-8, 7] / [-128, 127]). The step is qmax / (qmax + 0.5) as
  wide. x = +amax lands within an ulp of qmax + 0.5 and saturates to qmax either way. x = -amax
  lands within an ulp of qmin: s = fl(amax / 7.5) is itself rounded, so fl(-amax / s) is -7.5 or
  -7.5000005 (code -8) for about 89% of amax values (10^6 uniform draws) and -7.4999995
  (code -7) for the rest, e.g. amax = 1.0: s = 0.13333334, -1.0 / s = -7.4999995, code -7.
  Codes at a tie like these both lie s / 2 from x: neither rounding is the more accurate.
  Quark's fake quantizer computes the same scale but multiplies by its reciprocal,
  round(x * fl(1 / s)) (`quark/torch/kernel/hw_emulation/hw_emulation_interface.py`,
  `fake_quantize_per_channel_affine`, `inv_scale = 1.0 / scale`, which its per-group path calls),
  as `torch.fake_quantize_per_channel_affine` and torchao's `quantize_affine` do. This module
  divides (one correctly rounded step) unless asked for that product (`quantize_affine(...,
  reciprocal=True)`, the spec's `rounding: half_even_reciprocal`). A code can differ only where
  x / s lies within an ulp of a rounding tie, which in practice is the -amax element of a group:
  -8 here against -7 there or the reverse, in about 18% of the groups whose extreme is negative (amax = 0.3 gives -8 here, -7 in Quark); on the
  tiny Flux twin that was every differing code (benchmarks/RESULTS.md, "Why diffquant and Quark
  differ on w4a4"), and with x * fl(1 / s) here every equal-settings row of
  `benchmarks/bench_vs_quark.py --quark-rounding` equals Quark's. Quark also raises s to float32 eps (2^-23, i.e. for amax < 8.9e-7) where
  this module raises it to 2^-126.
- asymmetric: the range is widened to hold 0, s = (max - min) / (qmax - qmin),
  zp = clamp(qmin - round(min / s), qmin, qmax), so 0.0 is exactly representable. Where
  max - min overflows float32 (a range wider than 3.4e38), s = max / (qmax - qmin) - min /
  (qmax - qmin) instead, which is finite: (-3e38, 3e38) on INT8 gives s = 2.3529e36, zp = 0.
- a zero range (all-zero input) gets s = 1.0: codes are then zp and dequantize to exact zeros.
- a nonzero scale below float32's smallest normal (`torch.finfo(torch.float32).tiny`, 2^-126) is
  raised to it, so x / s never overflows and 1 / s stays finite; only ranges below ~1e-36
  are affected.
"""

from __future__ import annotations

from typing import Callable

import torch

from diffquant.quant.formats.blocks import ROW_SLICE_ELEMENTS

_F32_TINY = torch.finfo(torch.float32).tiny  # 2^-126, smallest normal float32

# Notable values of each integer format: (name, bits, value). INT8/UINT8 bits are the byte as
# torch stores it (two's complement for int8, checked with `tensor.view(torch.uint8)`); INT4/UINT4
# bits are the 4-bit nibble of the checkpoint layout (storage-and-formats.md §4.3: c = q & 0xF,
# two's complement when signed).
INT8_TABLE: list[tuple[str, int, float]] = [
    ("max", 0x7F, 127),
    ("min (clip only when symmetric)", 0x80, -128),
    ("symmetric min", 0x81, -127),
    ("minus one", 0xFF, -1),
    ("zero", 0x00, 0),
]
UINT8_TABLE: list[tuple[str, int, float]] = [
    ("max", 0xFF, 255),
    ("mid (typical zero point)", 0x80, 128),
    ("zero", 0x00, 0),
]
INT4_TABLE: list[tuple[str, int, float]] = [
    ("max", 0x7, 7),
    ("min (clip only when symmetric)", 0x8, -8),
    ("symmetric min", 0x9, -7),
    ("minus one", 0xF, -1),
    ("zero", 0x0, 0),
]
UINT4_TABLE: list[tuple[str, int, float]] = [
    ("max", 0xF, 15),
    ("mid (typical zero point)", 0x8, 8),
    ("zero", 0x0, 0),
]


def choose_qparams_affine(
    min_val: torch.Tensor, max_val: torch.Tensor, qmin: int, qmax: int, symmetric: bool, scale_rule: str = "qmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map [min_val, max_val] onto the codes [qmin, qmax].

    Args:
        min_val, max_val: floating tensors of the same shape (e.g. [] per-tensor, [out, 1]
            per-channel, [out, K // g, 1] per-group), finite.
        qmin, qmax: code range, e.g. (-128, 127) INT8, (0, 255) UINT8, (-8, 7) INT4, (0, 15) UINT4.
        symmetric: zp = 0 and s = amax / qmax; only for signed ranges (qmin < 0).
        scale_rule: symmetric only; "qmax" (s = amax / qmax) or "half_span" (s = amax /
            ((qmax - qmin) / 2), Quark's rule; see the module docstring).

    Returns:
        (scale float32, zero_point int32), both with min_val's shape. The rules (zero range ->
        scale 1.0, tiny scales raised to 2^-126) are in the module docstring.

    Example:
        >>> choose_qparams_affine(torch.tensor(-1.0), torch.tensor(3.0), 0, 255, False)
        (tensor(0.0157), tensor(64, dtype=torch.int32))
    """
    _check_range(qmin, qmax)
    if min_val.shape != max_val.shape:
        raise ValueError(
            f"min_val and max_val must have the same shape, got {tuple(min_val.shape)} and "
            f"{tuple(max_val.shape)}"
        )
    if not (min_val.is_floating_point() and max_val.is_floating_point()):
        raise ValueError(
            f"min_val/max_val must be floating, got {min_val.dtype} and {max_val.dtype}"
        )
    lo, hi = min_val.float(), max_val.float()
    if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("min_val/max_val contain NaN or inf; observe finite activations/weights")
    if symmetric:
        if qmin >= 0:
            raise ValueError(
                f"symmetric quantization needs a signed code range, got [{qmin}, {qmax}]; "
                "use symmetric=False for unsigned types (uint8, uint4)"
            )
        span = torch.maximum(lo.abs(), hi.abs())
        scale = _safe_scale(span / _symmetric_divisor(qmin, qmax, scale_rule), span)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    levels = qmax - qmin
    span = hi - lo
    # hi - lo overflows float32 for ranges wider than its max (-3e38 .. 3e38): split the division.
    step = torch.where(torch.isinf(span), hi / levels - lo / levels, span / levels)
    scale = _safe_scale(step, span)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def quantize_affine(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int,
    dtype: torch.dtype = torch.int32, reciprocal: bool = False,
) -> torch.Tensor:
    """Codes q = clamp(round_half_even(x / scale) + zp, qmin, qmax), computed in float32.

    reciprocal: compute x · fl(1 / scale) instead of x / scale (two roundings instead of one),
    the arithmetic of torchao's `quantize_affine` and Quark's fake quantizer (module docstring);
    the spec's `rounding: half_even_reciprocal`.

    Args:
        x: floating tensor [...]; scale (float) and zero_point (integer, or None for 0) must
            broadcast against it, e.g. x [out, in] with scale [out, 1], or to_blocks(x, g) with
            scale [out, in // g, 1].

    Returns:
        codes with the broadcast shape, in `dtype` (int32 by default; any integer dtype that
        holds [qmin, qmax], e.g. the storage dtype int8 / uint8, saves a copy); 4-bit codes go
        to nibbles via `pack.int4_to_nibbles` / `pack.pack_nibbles`.

    Example:
        >>> quantize_affine(torch.tensor([0.5, 1.5, 2.5, -0.5]), torch.tensor(1.0), None, -128, 127)
        tensor([0, 2, 2, 0], dtype=torch.int32)
    """
    _check_range(qmin, qmax)
    rows_of = _row_slicer(x, scale, zero_point)
    if rows_of is not None:
        # A large weight goes in slices of about `_SLICE_ELEMENTS` along dim 0, so its float32
        # temporary is one slice, not the whole weight. Every step is elementwise and exactly
        # rounded, so each code is the one the whole tensor would give.
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        step = max(1, _SLICE_ELEMENTS // x[0].numel())
        for start in range(0, x.shape[0], step):
            rows = slice(start, start + step)
            out[rows] = quantize_affine(x[rows], rows_of(scale, rows), None if zero_point is None else rows_of(zero_point, rows),
                                        qmin, qmax, dtype, reciprocal)
        return out
    # NaN has no code; pin it to 0 (code zp) so the result never depends on how the platform casts
    # NaN to int. nan_to_num also turns +-inf into +-float32 max, which the clamp saturates. The
    # steps after the division work in place: one float32 temporary of the weight's size, not four.
    y = torch.mul(x.float(), 1.0 / scale.float()) if reciprocal else torch.div(x.float(), scale.float())
    y.round_()
    y.nan_to_num_(nan=0.0)
    if zero_point is not None:
        y = _in_place_if_fits(y, zero_point.float(), torch.Tensor.add_, torch.add)
    return y.clamp_(qmin, qmax).to(dtype)


# Elements of one slice of a large `quantize_affine`: the block formats' slice size (16 MiB of float32).
_SLICE_ELEMENTS = ROW_SLICE_ELEMENTS


def _row_slicer(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> Callable[[torch.Tensor, slice], torch.Tensor] | None:
    """For an x larger than two slices whose scale (and zero point) broadcast into x's shape along
    dim 0: a function cutting a parameter to rows; otherwise None (computed in one piece)."""
    params = [scale] + ([zero_point] if zero_point is not None else [])
    if x.dim() == 0 or x.numel() <= 2 * _SLICE_ELEMENTS or x.shape != torch.broadcast_shapes(x.shape, *(p.shape for p in params)):
        return None

    def rows_of(param: torch.Tensor, rows: slice) -> torch.Tensor:
        if param.dim() < x.dim() or param.shape[0] == 1:
            return param  # broadcast along dim 0 (a per-tensor scale, or fewer dims)
        return param[rows]

    return rows_of


def dequantize_affine(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """x_hat = (q - zp) * scale, computed in float32 and cast to dtype.

    Args:
        q: integer codes (any integer dtype); scale / zero_point broadcast against q as in
            `quantize_affine`; zero_point None means 0.

    Example:
        >>> dequantize_affine(torch.tensor([0, 64, 255]), torch.tensor(0.5), torch.tensor(64))
        tensor([-32.0000,   0.0000,  95.5000])
    """
    y = q.float()  # a new tensor: the steps below work in place on it
    if zero_point is not None:
        y = _in_place_if_fits(y, zero_point.float(), torch.Tensor.sub_, torch.sub)
    return _in_place_if_fits(y, scale.float(), torch.Tensor.mul_, torch.mul).to(dtype)


FP16_PRODUCT_STEPS = 64  # fp16 values `fp16_product_scales` steps up at most (2^-11 to 2^-10 relative each in fp16's normal range)


def fp16_product_scales(blocks: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, target: torch.dtype,
                        steps: int = FP16_PRODUCT_STEPS) -> tuple[torch.Tensor, int]:
    """Symmetric group scales for runtimes that dequantize in fp16 and then cast: (scales, groups left).

    GGUF readers in diffusers (`dequantize_gguf_tensor`) and ComfyUI-GGUF compute a Q8_0 / Q4_0
    weight as fl16(q · d) with the fp16 block scale d, and the layer casts that to its compute
    dtype t: two roundings, where diffquant rounds q · s once, fl_t(q · s). They differ where
    fl16(q · s) lands on a tie of t's grid (a bf16 model: about 1 product in 16). For each group
    this returns the first of s, nextup16(s), nextup16(nextup16(s)), ... (at most `steps` values up;
    `scale` must hold positive fp16 values, as float32) at which every code q = clamp(round_half_even(x
    / s), qmin, qmax) of the group has fl_t(fl16(q · s)) == fl_t(q · s); a group where none does
    within `steps` keeps its scale, and their number is returned. The check is exact arithmetic:
    for |q| <= 128 and an fp16 s the float32 product q · s is exact (8 + 11 significant bits).
    Stepping only up keeps every value in range; the clip range grows by at most 64 fp16 ulps,
    3.2% to 6.4% for a scale in fp16's normal range, more for a subnormal one (below 2^-14: a
    group whose amax is under 127 · 2^-14 = 0.0078, where fp16's own spacing is coarser).
    Measured on 1024 x 8192 Gaussian weights rounded to bf16 (262 144 groups of 32): std 0.02, 2.8
    steps on average, 41 at most, growth <= 3.3%; std 0.002, 2.6 / 30 steps, <= 7.3%; std 3e-4,
    1.0 / 13 steps, <= 9.9%; no group left in any. For t = float16 the first scale always passes.

    Args:
        blocks: float32 [..., G, g] (`blocks.to_blocks(w, g)`); scale: float32 [..., G, 1].

    Example:
        >>> s0 = 1030 * 2.0**-20  # an fp16 value; q = 127: q · s0 = 127.744140625 · 2^-10
        >>> x = torch.tensor([[[0.0, -3 * s0, 127 * s0]]])  # fl16 gives 127.75 · 2^-10, a bf16 tie: 128 · 2^-10, not 127.5 · 2^-10
        >>> s, left = fp16_product_scales(x, torch.full((1, 1, 1), s0), -128, 127, torch.bfloat16)
        >>> s.item() / 2.0**-20, left  # one fp16 ulp up every code's product rounds alike both ways
        (1031.0, 0)
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    g = blocks.shape[-1]
    flat = blocks.reshape(-1, g)
    chosen = scale.reshape(-1, 1).clone()
    left = 0
    per_slice = max(1, ROW_SLICE_ELEMENTS // g)
    for start in range(0, flat.shape[0], per_slice):
        rows = slice(start, start + per_slice)
        left += _search_up(flat[rows], chosen[rows], qmin, qmax, target, steps)
    return chosen.reshape(scale.shape), left


def _search_up(x: torch.Tensor, chosen: torch.Tensor, qmin: int, qmax: int, target: torch.dtype, steps: int) -> int:
    """`fp16_product_scales` on rows x [n, g] (float32), writing into `chosen` [n, 1] in place."""
    first = chosen.clone()
    candidate = chosen.to(torch.float16)
    pending = torch.arange(x.shape[0], device=x.device)
    up = torch.tensor(float("inf"), dtype=torch.float16, device=x.device)
    for _ in range(steps + 1):
        s = candidate[pending].float()
        product = quantize_affine(x[pending], s, None, qmin, qmax).float() * s  # exact: see the docstring
        agrees = (product.to(torch.float16).to(target) == product.to(target)).all(dim=-1)
        chosen[pending[agrees]] = s[agrees]
        pending = pending[~agrees]
        if pending.numel() == 0:
            return 0
        candidate[pending] = torch.nextafter(candidate[pending], up)
    chosen[pending] = first[pending]
    return int(pending.numel())


def _in_place_if_fits(y: torch.Tensor, other: torch.Tensor, in_place: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                      out_of_place: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`in_place(y, other)` where the broadcast result has y's shape, else `out_of_place(y, other)`."""
    return in_place(y, other) if torch.broadcast_shapes(y.shape, other.shape) == y.shape else out_of_place(y, other)


def _symmetric_divisor(qmin: int, qmax: int, scale_rule: str) -> float:
    if scale_rule == "qmax":
        return qmax
    if scale_rule == "half_span":
        return (qmax - qmin) / 2
    raise ValueError(f"scale_rule {scale_rule!r} is not allowed; use 'qmax' or 'half_span'")


def _check_range(qmin: int, qmax: int) -> None:
    if not qmin < qmax:
        raise ValueError(f"qmin must be below qmax, got qmin={qmin}, qmax={qmax}")


def _safe_scale(scale: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    # A zero range gets 1.0 (exact zeros); a subnormal scale is raised to the smallest normal.
    scale = torch.clamp(scale, min=_F32_TINY)
    return torch.where(span == 0, torch.ones_like(scale), scale)
