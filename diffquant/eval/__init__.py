"""Evaluation: error metrics between full-precision and quantized outputs, and figures of them.

`metrics` holds pure functions over tensors (SQNR, PSNR, SSIM); `plots` draws PNGs with PIL only.
"""

from diffquant.eval.metrics import image_to_tensor, psnr, sqnr_db, ssim
from diffquant.eval.plots import image_grid, layer_sqnr_plot

__all__ = ["image_grid", "image_to_tensor", "layer_sqnr_plot", "psnr", "sqnr_db", "ssim"]
