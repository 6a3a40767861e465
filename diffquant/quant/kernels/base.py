"""The kernel protocol: how a quantized layer's forward computes.

A kernel is a stateless object shared by every layer it runs; per-layer state (a packed layout,
a folded scale) lives on the layer as non-persistent buffers that `attach` registers and
`detach` removes. `linear(layer, x)` computes a QuantizedLinear's output (input quantization,
the GEMM and the bias; SVDQuant's smoothing and low-rank branch are the layer's),
`conv2d(layer, x)` a QuantizedConv2d's. `unsupported(layer)` says why a kernel cannot run a
layer on the device its tensors are on (None: it can). `stored_tensors(layer)` gives the
checkpoint's tensors back, also when the kernel keeps them in another layout meanwhile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from diffquant.quant.weights import Stored

if TYPE_CHECKING:
    from diffquant.quant.modules import QuantizedConv2d, QuantizedLayer, QuantizedLinear

# Execution paths (what `path` a kernel belongs to): a real low-precision kernel, dequantize
# inside each call, or the fake-quant reference.
PATHS = ("native", "dequant", "exact")


class Kernel:
    """Base kernel: runs nothing; subclasses set `name`, `path` and override what they run."""

    name = "none"
    path = "exact"

    def unsupported(self, layer: "QuantizedLayer") -> str | None:
        return "this kernel runs no layer"

    def loses_to_dequant(self, layer: "QuantizedLayer") -> str | None:
        """Why `auto` should not pick this kernel for `layer` (it measured slower than
        dequantizing there), or None. Only asked of kernels that support the layer."""
        return None

    def attach(self, layer: "QuantizedLayer") -> None:
        """Prepare `layer` for this kernel, once (e.g. pack its weight the way the kernel reads it)."""

    def detach(self, layer: "QuantizedLayer") -> None:
        """Undo `attach`: afterwards the layer holds only its stored tensors."""

    def stored_tensors(self, layer: "QuantizedLayer") -> Stored:
        return {name: getattr(layer, name) for name in layer.stored_names}

    def linear(self, layer: "QuantizedLinear", x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"kernel {self.name} does not run Linear layers")

    def conv2d(self, layer: "QuantizedConv2d", x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"kernel {self.name} does not run Conv2d layers")

    def __repr__(self) -> str:
        return f"<kernel {self.name} ({self.path})>"
