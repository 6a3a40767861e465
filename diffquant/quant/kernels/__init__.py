"""Kernels: the execution paths of quantized layers, and the one registry that lists them.

`KERNELS` is every kernel by name, in order of preference; `kernels_for(layer)` the ones that
can run a layer on its device, with the reason each other one cannot. Adding a kernel is one new
file and one line in `KERNELS`.

Example:
    >>> from diffquant.quant.modules import QuantizedLinear
    >>> from diffquant.quant.spec import TensorSpec
    >>> from diffquant.quant.weights import quantize_weight
    >>> layer = QuantizedLinear(quantize_weight(torch.ones(2, 16), TensorSpec("nvfp4")), None, torch.float32)
    >>> layer.set_kernel(DEQUANT)
    >>> layer(torch.ones(1, 16)), sorted(name for name, _ in layer.named_buffers())
    (tensor([[16., 16.]]), ['weight_packed', 'weight_scale', 'weight_scale_2'])
"""

from __future__ import annotations

import torch

from diffquant.quant.kernels.base import PATHS, Kernel
from diffquant.quant.kernels.reference import DEQUANT, EXACT

__all__ = ["DEQUANT", "EXACT", "KERNELS", "PATHS", "Kernel", "kernels_for"]

KERNELS: dict[str, Kernel] = {kernel.name: kernel for kernel in (EXACT, DEQUANT)}


def kernels_for(layer: torch.nn.Module) -> tuple[list[Kernel], dict[str, str]]:
    """(kernels that can run `layer` on its device, in registry order; {kernel name: why not})."""
    usable: list[Kernel] = []
    reasons: dict[str, str] = {}
    for kernel in KERNELS.values():
        reason = kernel.unsupported(layer)
        if reason is None:
            usable.append(kernel)
        else:
            reasons[kernel.name] = reason
    return usable, reasons
