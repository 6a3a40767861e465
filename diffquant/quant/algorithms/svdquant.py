"""SVDQuant (Li et al., 2024, "SVDQuant: Absorbing Outliers by Low-Rank Components for 4-Bit
Diffusion Models", arXiv 2411.05007), as pure functions over one Linear layer.

1. Smoothing (§4.2, after SmoothQuant): s_j = max|X_j|^alpha / max|W_{:,j}|^(1-alpha) per input
   channel j, from the calibration activations; W' = W · diag(s), and x is divided by s at run
   time, so outliers move from the activations into the weights.
2. Low-rank branch (§4.3): the top-`rank` singular directions of W' form L_up [out, rank] =
   U_r · diag(S_r) and L_down [rank, in] = V_rᵀ, kept in 16 bits and never quantized.
3. Residual: R = W' − L_up · L_down, quantized with the recipe's weight spec.
Run time: y = Q(x/s) · deq(R)ᵀ + (x/s) · L_downᵀ · L_upᵀ + b.

The SVD is randomized (`torch.svd_lowrank`, Halko, Martinsson & Tropp 2011, "Finding Structure
with Randomness", SIAM Review 53(2), Alg. 4.4: a Gaussian sketch of `rank + oversample` columns,
`niter` power iterations, a fixed seed so results are reproducible; the top `rank` of the sketch's
singular triplets are kept, §4.2 recommends oversampling p = 5-10) by default, or the exact
`torch.linalg.svd`.

Refinement (`refine_low_rank`, opt-in `refine_iters`): the split above is optimal for W' but not
for what runs, L + deq(Q(R)). Each round re-fits the branch to what quantization leaves,
L ← SVD_rank(W' − deq(Q(W' − L))), and the round of least ‖W' − L − deq(Q(W' − L))‖²_F is kept
(round 0 is the plain split, so refinement never does worse on that measure). The alternation of
cache-dit's `svd_refine_iters` and of low-rank-plus-quantized decompositions generally (e.g.
LQ-LoRA, Guo et al. 2023, arXiv 2311.12023, §3.1).

Example:
    >>> w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    >>> split = low_rank_split(w, torch.ones(128), rank=8, method="full")
    >>> split.lora_up.shape, split.lora_down.shape
    (torch.Size([64, 8]), torch.Size([8, 128]))
    >>> round_to_half = lambda r: (r * 2).round() / 2
    >>> refined = refine_low_rank(w, split, round_to_half, iters=3, method="full")
    >>> weight_error(w, refined, round_to_half) <= weight_error(w, split, round_to_half)
    True
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

SVD_SEED = 0
_EPS = 1e-8
_ERROR_CHUNK_ELEMENTS = 1 << 20  # weight_error's float64 temporaries: 8 MiB per chunk


@dataclass(frozen=True)
class LowRankSplit:
    """The result of smoothing and splitting one weight (float32 tensors)."""

    smooth_factor: torch.Tensor  # [in]
    lora_down: torch.Tensor  # [rank, in]
    lora_up: torch.Tensor  # [out, rank]
    residual: torch.Tensor  # [out, in], in the smoothed space


def smoothing_factor(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max_i|W_ij|^(1-alpha); channels never seen active get s_j = 1.

    act_absmax: [in] float; weight: [out, in]. Returns float32 [in], strictly positive.
    """
    act = act_absmax.float().clamp_min(_EPS)
    wmax = weight.float().abs().amax(dim=0).clamp_min(_EPS)
    s = act.pow(alpha) / wmax.pow(1.0 - alpha)
    s = torch.where(act_absmax.float() > 0, s, torch.ones_like(s))
    return s.clamp(min=1e-5, max=1e5)


def low_rank_split(weight: torch.Tensor, smooth: torch.Tensor, rank: int, method: str = "lowrank", niter: int = 4,
                   oversample: int = 0) -> LowRankSplit:
    """Smooth `weight` [out, in] by `smooth` [in] and split off its top-`rank` SVD components.

    method "lowrank": randomized, a sketch of min(rank + oversample, min(out, in)) columns and
    `niter` power iterations, truncated to `rank`; "full": exact.
    """
    return split_smoothed(smoothed_weight(weight, smooth), smooth, rank, method, niter, oversample)


def smoothed_weight(weight: torch.Tensor, smooth: torch.Tensor) -> torch.Tensor:
    """W' = W · diag(s), a new float32 tensor [out, in]."""
    return weight.detach().float() * smooth.float().unsqueeze(0)


def split_smoothed(smoothed: torch.Tensor, smooth: torch.Tensor, rank: int, method: str = "lowrank", niter: int = 4,
                   oversample: int = 0) -> LowRankSplit:
    """`low_rank_split` of an already smoothed W' (float32 [out, in], read, never modified)."""
    up, down = top_singular(smoothed, rank, method, niter, oversample)
    # The residual from the factors as the SVD returned them (`down` a transposed view): the
    # product's last bits depend on the operands' layout, and this is the layout of every
    # checkpoint before oversampling existed, so oversample 0 reproduces them bit for bit.
    return LowRankSplit(smooth_factor=smooth.float(), lora_down=down.contiguous(), lora_up=up.contiguous(),
                        residual=_minus(smoothed, up @ down))


def _minus(w: torch.Tensor, product: torch.Tensor) -> torch.Tensor:
    """w − product, written into `product` (a temporary the caller owns): fl(−p + w) is the same
    IEEE operation as fl(w − p), so the bits equal `w - product`'s, with one full-size tensor fewer."""
    return product.neg_().add_(w)


def top_singular(w: torch.Tensor, rank: int, method: str = "lowrank", niter: int = 4, oversample: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r diag(S_r) [out, r], V_rᵀ [r, in]) of float32 `w`, r = min(rank, *w.shape); V_rᵀ may
    be a transposed view (callers that keep it make it contiguous)."""
    rank = min(rank, *w.shape)
    if method == "full":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :rank] * s[:rank], vh[:rank]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SVD_SEED)
        u, s, v = torch.svd_lowrank(w, q=min(rank + oversample, *w.shape), niter=niter)
    return u[:, :rank] * s[:rank], v[:, :rank].T


def weight_error(smoothed: torch.Tensor, split: LowRankSplit, fake_quantize: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """‖W' − L_up L_down − fake_quantize(R)‖²_F, in the smoothed space (float64 sum).

    Computed as ‖R − fake_quantize(R)‖²_F, equal since R = W' − L_up L_down (to R's float32
    rounding), row chunks at a time: besides fake_quantize's result no full-size temporary.
    `smoothed` must be the W' the split was made from (its shape is checked).
    """
    residual = split.residual
    if smoothed.shape != residual.shape:
        raise ValueError(f"weight_error: W' {list(smoothed.shape)} is not the split's shape {list(residual.shape)}")
    approx = fake_quantize(residual)
    rows = max(1, _ERROR_CHUNK_ELEMENTS // max(1, residual[0].numel()))
    total = 0.0
    for r, a in zip(residual.split(rows), approx.split(rows)):
        total += float((r.double() - a.double()).pow_(2).sum())
    return total


def refine_low_rank(smoothed: torch.Tensor, split: LowRankSplit, fake_quantize: Callable[[torch.Tensor], torch.Tensor],
                    iters: int, method: str = "lowrank", niter: int = 4, oversample: int = 0) -> LowRankSplit:
    """Alternate the branch with the residual's quantization (module docstring); the best round.

    smoothed: W' [out, in] (the weight times the split's smooth factor); fake_quantize: R ->
    deq(Q(R)) with the recipe's weight spec. Deterministic: the same seed is used every round.
    At most the best round's and the current round's residuals are held, with one temporary of
    W''s size beside fake_quantize's own (a caller that passes `split` without keeping it lets
    round 0's residual go once a later round is better).
    """
    w = smoothed.float()
    rank = split.lora_down.shape[0]
    template = replace(split, residual=split.residual.new_empty(0))
    best, best_error = split, weight_error(w, split, fake_quantize)
    current = split
    del split
    for _ in range(iters):
        target = fake_quantize(current.residual)
        if target.untyped_storage().data_ptr() == current.residual.untyped_storage().data_ptr():
            target = target.clone()  # a fake_quantize that returns its input: never write into R
        del current  # this round's residual is no longer needed unless it is `best`
        up, down = top_singular(_minus(w, target), rank, method, niter, oversample)
        del target
        current = replace(template, lora_up=up.contiguous(), lora_down=down.contiguous(), residual=_minus(w, up @ down))
        del up, down  # `down` may view the whole V of a full SVD
        error = weight_error(w, current, fake_quantize)
        if error < best_error:
            best, best_error = current, error
    return best
