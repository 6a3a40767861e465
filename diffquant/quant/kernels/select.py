"""Execution paths chosen per layer at load time, and the report of what each layer took.

Modes (`set_execution(module, mode)`):

- `exact`: every layer runs the fake-quant reference (`reference.ExactKernel`), the figures of
  stage two on any machine.
- `dequant`: every layer dequantizes inside each call; resident memory is the checkpoint's.
- `native`: every layer runs a low-precision kernel where one supports it (the first in
  `KERNELS` order), else `dequant`.
- `auto` (the default for loading and `generate`): `native` where the kernel is known to beat
  dequantizing on this device and shape (`Kernel.loses_to_dequant`, a rule measured by
  benchmarks/bench_inference.py), else `dequant`.

The report lists each layer's kernel, path and the reason it is not native; `str()` is the
one-line summary `generate` prints, and `to_json()` / `from_json()` load it as data.

Example:
    >>> from diffquant.quant.modules import QuantizedLinear
    >>> from diffquant.quant.spec import TensorSpec
    >>> from diffquant.quant.weights import quantize_weight
    >>> holder = torch.nn.Sequential(QuantizedLinear(quantize_weight(torch.ones(2, 32), TensorSpec("mxfp4")), None, torch.float32))
    >>> report = set_execution(holder, "dequant")
    >>> str(report)
    'dequant: 1 layer (1 dequant)'
    >>> ExecutionReport.from_json(report.to_json()) == report
    True
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from diffquant.quant.errors import ConfigError as QuantConfigError
from diffquant.quant.kernels import DEQUANT, EXACT, KERNELS, Kernel, kernels_for

MODES = ("auto", "native", "dequant", "exact")


@dataclass(frozen=True)
class LayerPath:
    """One layer's execution: its kernel's name, the path it belongs to, and why it is not native."""

    name: str
    kernel: str
    path: str
    reason: str = ""


@dataclass
class ExecutionReport:
    """What `set_execution` chose for every quantized layer of a module."""

    mode: str
    layers: list[LayerPath] = field(default_factory=list)

    def counts(self) -> Counter[str]:
        return Counter(layer.path for layer in self.layers)

    def __str__(self) -> str:
        kernels = Counter(layer.kernel for layer in self.layers if layer.path == "native")
        parts = [f"{count} native ({', '.join(f'{n} via {k}' for k, n in sorted(kernels.items()))})" if path == "native" else f"{count} {path}"
                 for path, count in sorted(self.counts().items())]
        noun = "layer" if len(self.layers) == 1 else "layers"
        return f"{self.mode}: {len(self.layers)} {noun} ({'; '.join(parts)})"

    def reasons(self) -> Counter[str]:
        """How many layers were kept off a native kernel, per reason."""
        return Counter(layer.reason for layer in self.layers if layer.reason)

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "layers": [asdict(layer) for layer in self.layers]}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "ExecutionReport":
        return cls(mode=raw["mode"], layers=[LayerPath(**layer) for layer in raw["layers"]])


def set_execution(module: torch.nn.Module, mode: str = "auto") -> ExecutionReport:
    """Give every quantized layer of `module` its kernel for `mode` (see the module docstring), in place."""
    from diffquant.quant.modules import QuantizedLayer

    if mode not in MODES:
        raise QuantConfigError(f"execution mode {mode!r} is unknown", f"use one of {', '.join(MODES)}")
    report = ExecutionReport(mode)
    for name, layer in module.named_modules():
        if isinstance(layer, QuantizedLayer):
            kernel, reason = choose_kernel(layer, mode)
            layer.set_kernel(kernel)
            report.layers.append(LayerPath(name, kernel.name, kernel.path, reason))
    return report


def choose_kernel(layer: torch.nn.Module, mode: str) -> tuple[Kernel, str]:
    """(the kernel `mode` picks for `layer`, why it is not a native one: "" when it is)."""
    if mode == "exact":
        return EXACT, "exact mode"
    if mode == "dequant":
        return DEQUANT, "dequant mode"
    usable, reasons = kernels_for(layer)
    native = [kernel for kernel in usable if kernel.path == "native"]
    if not native:
        why = "; ".join(reason for name, reason in reasons.items() if KERNELS[name].path == "native")
        return DEQUANT, why or "no native kernel for this format"
    if mode == "native":
        return native[0], ""
    losses = []
    for kernel in native:
        loss = kernel.loses_to_dequant(layer)
        if loss is None:
            return kernel, ""
        losses.append(f"{kernel.name} {loss}")
    return DEQUANT, "; ".join(losses)
