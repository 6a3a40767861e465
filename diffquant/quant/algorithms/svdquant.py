"""SVDQuant (Li et al., 2024, "SVDQuant: Absorbing Outliers by Low-Rank Components for 4-Bit
Diffusion Models", arXiv 2411.05007), as pure functions over one Linear layer.

1. Smoothing (§4.2, after SmoothQuant): s_j = max|X_j|^alpha / max|W_{:,j}|^(1-alpha) per input
   channel j, from the calibration activations; W' = W · diag(s), and x is divided by s at run
   time, so outliers move from the activations into the weights.
2. Low-rank branch (§4.3): the top-`rank` singular directions of W' form L_up [out, rank] =
   U_r · diag(S_r) and L_down [rank, in] = V_rᵀ, kept in 16 bits and never quantized.
3. Residual: R = W' − L_up · L_down, quantized with the recipe's weight spec.
Run time: y = Q(x/s) · deq(R)ᵀ + (x/s) · L_downᵀ · L_upᵀ + b.

The SVD is randomized (`torch.svd_lowrank`, Halko et al. 2011, with `niter` power iterations and a
fixed seed, so results are reproducible) by default, or the exact `torch.linalg.svd`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SVD_SEED = 0
_EPS = 1e-8


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


def low_rank_split(weight: torch.Tensor, smooth: torch.Tensor, rank: int, method: str = "lowrank", niter: int = 4) -> LowRankSplit:
    """Smooth `weight` [out, in] by `smooth` [in] and split off its top-`rank` SVD components."""
    w = weight.detach().float() * smooth.float().unsqueeze(0)
    rank = min(rank, *w.shape)
    if method == "full":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        up, down = u[:, :rank] * s[:rank], vh[:rank]
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SVD_SEED)
            u, s, v = torch.svd_lowrank(w, q=rank, niter=niter)
        up, down = u * s, v.T
    residual = w - up @ down
    return LowRankSplit(smooth_factor=smooth.float(), lora_down=down.contiguous(), lora_up=up.contiguous(), residual=residual)
