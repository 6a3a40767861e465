"""The two kernels every layer can run: `exact` (fake-quant reference) and `dequant`.

Both compute y = Q_in(x) · deq(W)ᵀ + b with the dequantized weight deq(W) computed in float32
and cast to the compute dtype once, and the input fake-quantized in float32 (`weights.
fake_quantize_input`), so their outputs are bit-identical to each other on the same machine.
They differ in memory: `exact` caches deq(W) on the layer while attached (one float copy per
layer: the fastest fake-quant when a layer is called many times and memory is no concern),
`dequant` dequantizes inside each call into a temporary, so resident memory stays the
checkpoint's (the default of a new layer, and what stage two runs).

A Linear layer whose input spec asks for `matmul: torchao` computes instead torchao's GEMM from
the codes (`torchao_matmul.code_linear`), in both kernels: no dequantized weight is cached for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from diffquant.quant.kernels.base import Kernel
from diffquant.quant.kernels.torchao_matmul import code_linear, uses_code_matmul

if TYPE_CHECKING:
    from diffquant.quant.modules import QuantizedConv2d, QuantizedLayer, QuantizedLinear

CACHE_NAME = "dequantized_weight"


class DequantKernel(Kernel):
    """Dequantize the weight in each call into a temporary; fake-quant the input."""

    name = "dequant"
    path = "dequant"

    def unsupported(self, layer: "QuantizedLayer") -> str | None:
        return None

    def weight(self, layer: "QuantizedLayer") -> torch.Tensor:
        return layer.quantized_weight().dequantize(layer.compute_dtype)

    def linear(self, layer: "QuantizedLinear", x: torch.Tensor) -> torch.Tensor:
        if uses_code_matmul(layer):
            return code_linear(layer, x)
        return F.linear(layer.fake_quantize_input(x), self.weight(layer), layer.bias)

    def conv2d(self, layer: "QuantizedConv2d", x: torch.Tensor) -> torch.Tensor:
        return layer.conv2d_with(layer.fake_quantize_input(x), self.weight(layer))


class ExactKernel(DequantKernel):
    """`dequant` with the dequantized weight cached once on the layer (non-persistent buffer)."""

    name = "exact"
    path = "exact"

    def attach(self, layer: "QuantizedLayer") -> None:
        if not uses_code_matmul(layer):
            layer.register_buffer(CACHE_NAME, super().weight(layer), persistent=False)

    def detach(self, layer: "QuantizedLayer") -> None:
        layer._buffers.pop(CACHE_NAME, None)
        layer._non_persistent_buffers_set.discard(CACHE_NAME)

    def weight(self, layer: "QuantizedLayer") -> torch.Tensor:
        return getattr(layer, CACHE_NAME)


EXACT = ExactKernel()
DEQUANT = DequantKernel()
