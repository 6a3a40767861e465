"""Error metrics between a reference and its quantized approximation: SQNR, PSNR, SSIM.

Pure functions over tensors, computed in float64 whatever the input dtype, returning Python floats.

* `sqnr_db` — signal-to-quantization-noise ratio of any tensor pair (layer outputs, latents).
* `psnr`, `ssim` — image similarity for [H,W], [C,H,W] or [H,W,C] tensors, or PIL images.

SSIM matches scikit-image's
`structural_similarity(a, b, data_range=R, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, channel_axis=...)` (skimage/metrics/_structural_similarity.py), which
is the Wang et al. 2004 setting ("Image quality assessment: from error visibility to structural
similarity", IEEE TIP 13(4), sec. III-C): Gaussian window with sigma 1.5 truncated at 3.5 sigma
(11 taps), K1 = 0.01, K2 = 0.03, population (not sample) covariances, each channel scored on its own
and the channel scores averaged. skimage filters with `scipy.ndimage.gaussian_filter(mode="reflect")`
and then crops (win_size - 1) // 2 = 5 pixels from every border before averaging; the cropped pixels
are exactly those whose window reaches into the reflected padding, so a valid (unpadded) 11x11
convolution gives the same map and the same mean. That is what `ssim` computes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["image_to_tensor", "psnr", "sqnr_db", "ssim"]

ImageLike = torch.Tensor | Image.Image

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # scipy.ndimage.gaussian_filter's default, used by skimage
SSIM_WIN_SIZE = 2 * int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5) + 1  # 11, skimage's formula
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """SQNR in dB: 10 log10(sum(reference²) / sum((reference - approx)²)), accumulated in float64.

    `reference` and `approx` have the same shape, any float or integer dtype. Edge cases:
    identical tensors (zero noise) give `+inf`, including two all-zero tensors; an all-zero
    reference with a nonzero error gives `-inf`; a NaN anywhere gives NaN.

    Example:
        >>> sqnr_db(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.5]))  # 25 / 0.25
        20.0
    """
    ref, approx64 = _same_shape_float64(reference, approx, "sqnr_db")
    signal = float(ref.square().sum())
    noise = float((ref - approx64).square().sum())
    if math.isnan(signal) or math.isnan(noise):
        return math.nan
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def psnr(a: ImageLike, b: ImageLike, data_range: float = 1.0) -> float:
    """PSNR in dB: 10 log10(data_range² / MSE), MSE over all pixels and channels, in float64.

    `a`, `b`: same-shape tensors, float in [0, data_range] (default [0, 1]) or uint8 with
    `data_range=255`; PIL images are converted with `image_to_tensor` to float [C,H,W] in [0, 1].
    Identical images give `+inf`.

    Example:
        >>> round(psnr(torch.zeros(3, 4, 4), torch.full((3, 4, 4), 0.1)), 6)  # MSE 0.01
        20.0
    """
    x, y = _image_pair(a, b, data_range, "psnr")
    mse = float((x - y).square().mean())
    if math.isnan(mse):
        return math.nan
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def ssim(a: ImageLike, b: ImageLike, data_range: float = 1.0) -> float:
    """Mean SSIM (Wang et al. 2004), equal to scikit-image's Gaussian-weighted `structural_similarity`.

    `a`, `b`: same-shape images as for `psnr` ([H,W], [C,H,W] or [H,W,C] with C in {1, 3, 4}, or
    PIL). Both spatial sides must be at least 11 pixels (the window). Per channel c:
    SSIM map = ((2 mu_a mu_b + C1)(2 cov_ab + C2)) / ((mu_a² + mu_b² + C1)(var_a + var_b + C2)),
    C1 = (0.01 R)², C2 = (0.03 R)², R = data_range; the result is the mean over valid pixels and
    channels. Identical images give 1.0.

    Example:
        >>> ssim(torch.full((16, 16), 0.5), torch.full((16, 16), 0.5))
        1.0
    """
    x, y = _image_pair(a, b, data_range, "ssim")
    x, y = _to_chw(x), _to_chw(y)
    height, width = x.shape[-2:]
    if height < SSIM_WIN_SIZE or width < SSIM_WIN_SIZE:
        raise ValueError(
            f"ssim needs images of at least {SSIM_WIN_SIZE}x{SSIM_WIN_SIZE} pixels, got "
            f"{height}x{width} — compare larger images or use psnr"
        )
    window = _gaussian_window(SSIM_WIN_SIZE, SSIM_SIGMA)  # [1, 1, 11, 11] float64

    def local_mean(t: torch.Tensor) -> torch.Tensor:  # [C,H,W] -> [C,H-10,W-10]
        return F.conv2d(t.unsqueeze(1), window).squeeze(1)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x * mu_x
    var_y = local_mean(y * y) - mu_y * mu_y
    cov_xy = local_mean(x * y) - mu_x * mu_y
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    )
    return float(ssim_map.mean())


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> float32 tensor [C,H,W] in [0, 1]; C = 1 (L), 3 (RGB) or 4 (RGBA).

    Other modes (P, CMYK, I;16, ...) are converted to RGB first.

    Example:
        >>> image_to_tensor(Image.new("RGB", (4, 2), (255, 0, 0))).shape
        torch.Size([3, 2, 4])
    """
    if image.mode not in ("L", "RGB", "RGBA"):
        image = image.convert("RGB")
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32) / 255.0


# --- helpers -------------------------------------------------------------------------------------


def _same_shape_float64(
    a: torch.Tensor, b: torch.Tensor, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(
            f"{name}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)} — compare tensors of "
            "the same shape"
        )
    if a.numel() == 0:
        raise ValueError(f"{name}: empty tensors — pass tensors with at least one element")
    return a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)


def _image_pair(
    a: ImageLike, b: ImageLike, data_range: float, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if not data_range > 0:
        raise ValueError(f"{name}: data_range={data_range} — pass a positive range, e.g. 1.0 or 255")
    tensors = []
    for image in (a, b):
        if isinstance(image, Image.Image):
            image = image_to_tensor(image)
        elif not isinstance(image, torch.Tensor):
            raise ValueError(
                f"{name}: got {type(image).__name__} — pass a torch.Tensor or a PIL.Image.Image"
            )
        elif image.dtype == torch.uint8 and data_range <= 1.0:
            raise ValueError(
                f"{name}: uint8 image with data_range={data_range} — pass data_range=255, or "
                "convert to float in [0, 1]"
            )
        if image.dim() not in (2, 3):
            raise ValueError(
                f"{name}: image of shape {tuple(image.shape)} — pass one image as [H,W], [C,H,W] "
                "or [H,W,C]"
            )
        tensors.append(image)
    return _same_shape_float64(tensors[0], tensors[1], name)


def _to_chw(image: torch.Tensor) -> torch.Tensor:
    """[H,W] -> [1,H,W]; [C,H,W] kept; [H,W,C] -> [C,H,W]. C is 1, 3 or 4."""
    if image.dim() == 2:
        return image.unsqueeze(0)
    # Images are at least 11 px per side for SSIM, so a leading 1/3/4 can only be channels.
    if image.shape[0] in (1, 3, 4):
        return image
    if image.shape[-1] in (1, 3, 4):
        return image.permute(2, 0, 1)
    raise ValueError(
        f"image of shape {tuple(image.shape)} has no channel axis of size 1, 3 or 4 — pass "
        "[C,H,W] or [H,W,C] with C in {1, 3, 4}"
    )


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """Normalised 2-D Gaussian [1, 1, size, size] float64: the outer product of scipy's 1-D taps."""
    radius = (size - 1) // 2
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (x / sigma) ** 2)
    taps = taps / taps.sum()
    return torch.outer(taps, taps)[None, None]
