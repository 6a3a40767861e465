"""Kernels: the execution paths of quantized layers, and the one registry that lists them.

`KERNELS` is every kernel by name, in order of preference (`native` mode takes the first native
kernel that runs a layer; `auto` the first that does not lose to `dequant`: the `..._BY_TOKENS`
variants, which switch to dequantizing above a token count, come after the plain kernels); `kernels_for(layer)` the ones that
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
from diffquant.quant.kernels.fp8_scaled_mm import FP8_SCALED_MM
from diffquant.quant.kernels.int4_weight_only import INT4_BY_TOKENS, INT4_WEIGHT_ONLY
from diffquant.quant.kernels.int8_mm import INT8_MM
from diffquant.quant.kernels.int8_weight_only import INT8_WEIGHT_ONLY, INT8_WEIGHT_ONLY_BY_TOKENS
from diffquant.quant.kernels.reference import DEQUANT, EXACT

__all__ = ["DEQUANT", "EXACT", "FP8_SCALED_MM", "INT4_BY_TOKENS", "INT4_WEIGHT_ONLY", "INT8_MM", "INT8_WEIGHT_ONLY",
           "INT8_WEIGHT_ONLY_BY_TOKENS", "KERNELS", "PATHS", "Kernel", "kernels_for"]

KERNELS: dict[str, Kernel] = {
    kernel.name: kernel for kernel in (INT8_MM, INT8_WEIGHT_ONLY, INT8_WEIGHT_ONLY_BY_TOKENS, INT4_WEIGHT_ONLY, INT4_BY_TOKENS,
                                       FP8_SCALED_MM, EXACT, DEQUANT)
}


def kernels_for(layer: torch.nn.Module) -> tuple[list[Kernel], dict[str, str]]:
    """(kernels that can run `layer` on its device, in registry order; {kernel name: why not}).

    Of the native kernels that do not compute the layer's format at all (`handles`), only the
    first one's reason is kept, and only when no native kernel computes it: the report then says
    `no native kernel for ... on <device>` once, or why the kernel for the format cannot run here.
    """
    usable: list[Kernel] = []
    reasons: dict[str, str] = {}
    foreign: list[str] = []
    for kernel in KERNELS.values():
        reason = kernel.unsupported(layer)
        if reason is None:
            usable.append(kernel)
            continue
        reasons[kernel.name] = reason
        handles = getattr(kernel, "handles", None)
        if handles is not None and not handles(layer):
            foreign.append(kernel.name)
    keep_one = len(foreign) == sum(1 for kernel in KERNELS.values() if getattr(kernel, "handles", None) is not None)
    for name in foreign[1:] if keep_one else foreign:
        del reasons[name]
    seen: set[str] = set()
    for name, reason in list(reasons.items()):  # a kernel and its by-tokens variant give the same reason
        if reason in seen:
            del reasons[name]
        seen.add(reason)
    return usable, reasons
