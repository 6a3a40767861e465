"""Weight clip search: per scale row, the clip ratio of a few candidates with the least weight error.

For integer weights with the `mse_search` observer. Each row (one per scale: the tensor, a channel
or a group, `weights.base.weight_rows`) starts from its min_max range [lo, hi]; every candidate
ratio r of `CLIP_RATIOS` (1.0 down to 0.5, 20 values) gives the range [r lo, r hi], which is turned
into a scale by `formats.affine.choose_qparams_affine` (with the spec's scale_rule), rounded and
dequantized exactly as the checkpoint will be; the ratio of least sum of squared weight error wins
(ties: the larger ratio, so a row where clipping never helps keeps its min_max range). The result
is a range, quantized by the ordinary path, so the stored format is unchanged. The same idea as
the clip search of AWQ / deepcompressor (which search on the layer output; this searches on the
weight, no calibration needed).

Example:
    >>> rows = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    >>> lo, hi = search_clip_range(rows, -8, 7, symmetric=True)
    >>> [round(r, 3) for r in (hi / rows.abs().amax(dim=1)).tolist()]  # Gaussian groups of 64 clip to 0.8-0.925
    [0.85, 0.9, 0.925, 0.8]
"""

from __future__ import annotations

import torch

from diffquant.quant.formats.affine import choose_qparams_affine, dequantize_affine, quantize_affine

CLIP_RATIOS: tuple[float, ...] = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0, 0.975, ..., 0.5


def search_clip_range(
    rows: torch.Tensor,
    qmin: int,
    qmax: int,
    symmetric: bool,
    scale_rule: str = "qmax",
    ratios: tuple[float, ...] = CLIP_RATIOS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) float32 [rows] of least squared weight error over `ratios` times the min_max range.

    rows: float [R, n]. Symmetric ranges are (-r amax, r amax), asymmetric (r min, r max).
    """
    x = rows.float()
    low, high = x.amin(dim=1), x.amax(dim=1)
    if symmetric:
        high = torch.maximum(low.abs(), high.abs())
        low = -high
    best_error = torch.full_like(high, float("inf"))
    best_lo, best_hi = low.clone(), high.clone()
    for ratio in sorted(ratios, reverse=True):
        lo, hi = low * ratio, high * ratio
        scale, zp = choose_qparams_affine(lo, hi, qmin, qmax, symmetric, scale_rule) if symmetric else \
            choose_qparams_affine(lo, hi, qmin, qmax, symmetric)
        zp_col = None if symmetric else zp[:, None]
        approx = dequantize_affine(quantize_affine(x, scale[:, None], zp_col, qmin, qmax), scale[:, None], zp_col)
        error = (approx - x).pow(2).sum(dim=1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_lo, best_hi
