"""A fixed, data-independent histogram of float32 values that merges by addition.

Observers (`diffquant.quant.observers`) keep one such histogram per row (per tensor, channel or
group) and choose clipping ranges from it. Because the bin layout never depends on the data, the
histograms of different batches, samples or runs add up exactly (int64 counts), and the result of
any computation on them is independent of how the data was split into batches.

Bin layout (version 1)
----------------------
A magnitude |x| is binned by its float32 bit pattern: the 8 exponent bits and the top 5 mantissa
bits, i.e. ``bits(|x|) >> 18``. That gives ``BINS_PER_OCTAVE = 32`` equal-width sub-bins per
octave ``[2^e, 2^(e+1))``, with edges ``2^e * (1 + k/32)`` that are exact float32 numbers, so
binning is exact integer arithmetic (no log2 rounding at the edges) and costs a few integer ops per
element. Relative bin width is 1/32..1/64 (1.6 %..3.1 %). Octaves cover ``[2^-32, 2^32)``.

One row of the histogram has ``NUM_BINS = 4101`` int64 counters (32,808 bytes), ordered by value
along the real line so that a cumulative sum is a CDF:

=============  ==============================  ====================================
index          values                          note
=============  ==============================  ====================================
0              x <= -2^32                      negative overflow
1 .. 2048      -2^32 < x <= -2^-32             negative bins, largest magnitude first
2049           -2^-32 < x < 0                  negative underflow
2050           x == 0 (and -0.0)               ``ZERO_BIN``
2051           0 < x < 2^-32                   positive underflow
2052 .. 4099   2^-32 <= x < 2^32               positive bins, ascending
4100           x >= 2^32                       positive overflow
=============  ==============================  ====================================

(A negative bin holds the negated values of the positive bin of the same magnitude: magnitude
bin ``[lower, upper)`` gives ``(-upper, -lower]``.) Observers also keep the exact running min and
max, which bound the outermost occupied bins (and replace the open ends of the overflow bins).

Folding the two signs gives the *magnitude axis* of ``MAGNITUDE_AXIS_BINS = 2051`` bins, index t:
0 = exact zero, 1 = underflow ``(0, 2^-32)``, 2..2049 = the 2048 regular bins, 2050 = overflow.
"""

from __future__ import annotations

import torch
from torch import Tensor

LAYOUT_VERSION = 1
BINS_PER_OCTAVE = 32  # = 2**5: top 5 mantissa bits
MIN_EXPONENT = -32  # smallest regular bin starts at 2^-32
MAX_EXPONENT = 32  # values >= 2^32 overflow
MAGNITUDE_BINS = (MAX_EXPONENT - MIN_EXPONENT) * BINS_PER_OCTAVE  # 2048 regular bins per sign
MAGNITUDE_AXIS_BINS = MAGNITUDE_BINS + 3  # zero, underflow, 2048 bins, overflow = 2051
ZERO_BIN = MAGNITUDE_BINS + 2  # 2050: index of exact zero on the signed axis
NUM_BINS = 2 * ZERO_BIN + 1  # 4101 counters per row
# Written into every saved state so a reader refuses a histogram binned differently.
LAYOUT = (LAYOUT_VERSION, BINS_PER_OCTAVE, MIN_EXPONENT, MAX_EXPONENT)

_MANTISSA_SHIFT = 23 - 5  # float32 has 23 mantissa bits; keep the top 5
# bits(2^MIN_EXPONENT) >> _MANTISSA_SHIFT = (127 + MIN_EXPONENT) * 32 = 3040.
_CODE_OF_FIRST_BIN = (127 + MIN_EXPONENT) * BINS_PER_OCTAVE
# Elements binned per pass: keeps the int32 temporaries of `histogram_counts` (1 MiB) in cache.
_BLOCK_ELEMENTS = 1 << 18


def histogram_counts(x: Tensor) -> Tensor:
    """Count the values of each row of `x` into the fixed bin layout.

    x: [rows, n] float32 (other float dtypes are converted; float64 is rounded to float32 first).
    Returns int64 [rows, NUM_BINS] on x's device. Non-finite values are not checked here (they
    land in the overflow bins); observers check the exact min/max for them. Works through x in
    blocks of ~2^18 elements (whole rows, or column slices of one long row) so the int32
    temporaries stay in cache: ~10 ms for [1, 4M] on two CPU cores, against ~100 ms in one pass.

    Example:
        >>> histogram_counts(torch.tensor([[0.0, 1.0, -1.0]]))[0, [2050, 2052 + 32 * 32]]
        tensor([1, 1])
    """
    if x.dim() != 2:
        raise ValueError(f"histogram_counts expects x of shape [rows, n], got {tuple(x.shape)}")
    rows, n = x.shape
    x = x.to(torch.float32)
    counts = torch.zeros(rows, NUM_BINS, dtype=torch.int64, device=x.device)
    if n == 0:
        return counts
    block_rows = max(1, _BLOCK_ELEMENTS // n)
    block_cols = n if block_rows > 1 else _BLOCK_ELEMENTS
    for row in range(0, rows, block_rows):
        block = counts[row : row + block_rows]
        offsets = (torch.arange(block.shape[0], dtype=torch.int32, device=x.device) * NUM_BINS + ZERO_BIN)[:, None]
        for col in range(0, n, block_cols):
            part = x[row : row + block_rows, col : col + block_cols].contiguous()
            index = _signed_bin_index(part).add_(offsets)
            block += torch.bincount(index.view(-1), minlength=block.numel()).view(block.shape)
    return counts


def _signed_bin_index(x: Tensor) -> Tensor:
    """Signed ordinal of each element's bin relative to ZERO_BIN: int32, same shape as x.

    x: contiguous float32. 0 for exact zeros (either sign), ±1 underflow, ±(2 + j) regular bin j,
    ±2050 overflow. Pure integer arithmetic on the bit pattern, with few temporaries.
    """
    bits = x.view(torch.int32)
    magnitude = bits & 0x7FFFFFFF
    t = magnitude >> _MANTISSA_SHIFT
    t.sub_(_CODE_OF_FIRST_BIN - 2).clamp_(1, MAGNITUDE_AXIS_BINS - 1)
    # Zero has magnitude bits 0; every other float has magnitude bits >= 1 and t <= 2050 only when
    # it is a subnormal far below 2^-32 (t = 1), so min(t, magnitude) zeroes exactly the zeros.
    torch.minimum(t, magnitude, out=t)
    sign = bits >> 31  # 0 or -1 (all ones)
    return t.bitwise_xor_(sign).sub_(sign)  # two's complement negation where negative


def _regular_lower_edges() -> Tensor:
    """Lower edges of the 2048 regular magnitude bins plus 2^32: float64 [2049], exact."""
    codes = torch.arange(MAGNITUDE_BINS + 1, dtype=torch.int32) + _CODE_OF_FIRST_BIN
    return (codes << _MANTISSA_SHIFT).view(torch.float32).to(torch.float64)


_EDGES = _regular_lower_edges()
# Magnitude axis t = 0..2050: bin t covers [MAGNITUDE_LOWER[t], MAGNITUDE_UPPER[t]).
MAGNITUDE_LOWER = torch.cat([torch.zeros(2, dtype=torch.float64), _EDGES])
MAGNITUDE_UPPER = torch.cat(
    [torch.zeros(1, dtype=torch.float64), _EDGES, torch.tensor([torch.inf], dtype=torch.float64)]
)
# Signed axis i = 0..4100: bin i lies between SIGNED_LOWER[i] and SIGNED_UPPER[i] (open end as above).
SIGNED_LOWER = torch.cat([-MAGNITUDE_UPPER.flip(0)[:-1], MAGNITUDE_LOWER])
SIGNED_UPPER = torch.cat([-MAGNITUDE_LOWER.flip(0)[:-1], MAGNITUDE_UPPER])


def fold_magnitudes(counts: Tensor) -> Tensor:
    """Fold a signed-axis histogram onto the magnitude axis.

    counts: [..., NUM_BINS] on the signed axis. Returns [..., MAGNITUDE_AXIS_BINS], same dtype:
    index 0 = zeros, 1 = underflow, 2..2049 regular bins, 2050 = overflow.
    """
    zero = counts[..., ZERO_BIN : ZERO_BIN + 1]
    return torch.cat([zero, positive_side(counts) + negative_side(counts)], dim=-1)


def positive_side(counts: Tensor) -> Tensor:
    """Positive values on the magnitude axis without the zero bin: [..., 2050] (t = 1..2050)."""
    return counts[..., ZERO_BIN + 1 :]


def negative_side(counts: Tensor) -> Tensor:
    """Negative values on the magnitude axis without the zero bin: [..., 2050] (t = 1..2050)."""
    return counts[..., :ZERO_BIN].flip(-1)


def percentile_from_histogram(counts: Tensor, lower: Tensor, upper: Tensor, fraction: float) -> float:
    """The value below which `fraction` of the counted values lie, interpolated within its bin.

    counts: int64 [bins], bins ordered by value; lower/upper: float64 [bins], each bin's bounds
    already clipped to the exact data range. fraction in [0, 1]. Values are assumed uniform within
    a bin, so the answer is ``lower + (rank - before) / count * (upper - lower)`` for the first bin
    whose cumulative count reaches ``rank = fraction * total``; fraction 0 gives the lowest bound of
    the first occupied bin, fraction 1 the upper bound of the last occupied one.
    """
    cumulative = counts.cumsum(0).to(torch.float64)
    total = float(cumulative[-1])
    occupied = torch.nonzero(counts).view(-1)
    if fraction <= 0.0:
        return float(lower[occupied[0]])
    rank = torch.tensor([fraction * total], dtype=torch.float64)
    i = int(torch.searchsorted(cumulative, rank)[0].clamp(max=counts.numel() - 1))
    i = max(i, int(occupied[0]))
    count = float(counts[i])
    before = float(cumulative[i]) - count
    within = min(max((float(rank[0]) - before) / count, 0.0), 1.0)
    return float(lower[i]) + within * (float(upper[i]) - float(lower[i]))


def magnitude_percentile(counts: Tensor, amax: float, fraction: float) -> float:
    """Percentile of |x| from one signed-axis row: counts int64 [NUM_BINS], amax = max|x| (exact).

    Returns a float in [0, amax].
    """
    folded = fold_magnitudes(counts)
    upper = MAGNITUDE_UPPER.clamp(max=amax)
    lower = MAGNITUDE_LOWER.clamp(max=amax)
    return min(percentile_from_histogram(folded, lower, upper, fraction), amax)


def signed_percentile(counts: Tensor, xmin: float, xmax: float, fraction: float) -> float:
    """Percentile of x from one signed-axis row: counts int64 [NUM_BINS], exact min/max.

    Returns a float in [xmin, xmax].
    """
    lower = SIGNED_LOWER.clamp(xmin, xmax)
    upper = SIGNED_UPPER.clamp(xmin, xmax)
    value = percentile_from_histogram(counts, lower, upper, fraction)
    return min(max(value, xmin), xmax)


def occupied_bins(counts: Tensor, xmin: float, xmax: float) -> tuple[Tensor, Tensor, Tensor]:
    """Bounds and count of every occupied bin of one row, exact zeros left out.

    counts: int64 [NUM_BINS] on the signed axis; xmin/xmax: the exact data range of the row.
    Returns (lower, upper, weights): float64 [k] each, k = number of occupied non-zero bins,
    ascending by value. Bounds are clipped to [xmin, xmax], so the outermost occupied bins end at
    the exact extremes; the overflow bins, whose bounds are open, become the point at the exact
    extreme. A bin never straddles 0. Exact zeros are dropped because every grid represents zero
    exactly, so they add no error.
    """
    lower = SIGNED_LOWER.clamp(xmin, xmax)
    upper = SIGNED_UPPER.clamp(xmin, xmax)
    lower[-1] = upper[-1] = xmax
    lower[0] = upper[0] = xmin
    keep = counts > 0
    keep[ZERO_BIN] = False
    return lower[keep], upper[keep], counts[keep].to(torch.float64)


def clip_candidates(side_counts: Tensor, amax: float) -> Tensor:
    """Every bin edge from the smallest non-zero magnitude up to `amax`, then `amax` itself.

    side_counts: [MAGNITUDE_AXIS_BINS - 1] counts of one side (or both folded) on the magnitude
    axis without the zero bin (t = 1..2050); amax > 0: the exact largest magnitude of that side.
    Returns float64 [C] ascending and > 0: the upper edge of the first occupied bin, each later
    edge below amax, and amax. C <= 2050.
    """
    occupied = torch.nonzero(side_counts).view(-1)
    first_t = int(occupied[0]) + 1
    edges = MAGNITUDE_UPPER[first_t:]
    edges = edges[edges < amax]
    return torch.cat([edges, torch.tensor([amax], dtype=torch.float64)])
