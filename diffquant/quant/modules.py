"""QuantizedLinear / QuantizedConv2d: drop-in replacements that hold stored quantized tensors.

Buffers carry exactly the checkpoint's tensors under their checkpoint names (`weight` or
`weight_packed`, `weight_scale`, `weight_zero_point`, `weight_scale_2`, `bias`, `input_scale`,
`input_zero_point`, `input_scale_2`, and for SVDQuant `smooth_factor`, `lora_down`, `lora_up`),
so `state_dict()` of a quantized submodule is the checkpoint, and a module rebuilt from a
checkpoint is the same module. Forward is fake-quant: the weight is dequantized once (float32
arithmetic, then cast to the compute dtype) and inputs are quantized and dequantized per call,
so the numbers equal what the stored tensors define, bit for bit.

SVDQuant forward (Li et al., 2024, arXiv 2411.05007, eq. 5): with x̂ = x / smooth_factor,
y = Q(x̂) · deq(R)ᵀ + (x̂ · lora_downᵀ) · lora_upᵀ + b; the low-rank branch is never quantized.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from diffquant.quant.codecs import Stored, dequantize_weight, fake_quantize
from diffquant.quant.spec import TensorSpec



class QuantizedLayer(torch.nn.Module):
    """Common state of a quantized Linear or Conv2d (see the module docstring)."""

    channel_dim = -1

    def __init__(
        self,
        weight_shape: torch.Size,
        weight_spec: TensorSpec,
        stored: Stored,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype,
        input_spec: TensorSpec | None = None,
        input_params: Stored | None = None,
        lowrank: Stored | None = None,
    ) -> None:
        super().__init__()
        self.weight_shape = torch.Size(weight_shape)
        self.weight_spec = weight_spec
        self.input_spec = input_spec
        self.compute_dtype = compute_dtype
        self.stored_names = tuple(sorted(stored))
        self.input_param_names = tuple(sorted(input_params or {}))
        for name, tensor in {**stored, **(input_params or {}), **(lowrank or {})}.items():
            self.register_buffer(name, tensor.detach().clone())
        self.bias: torch.Tensor | None
        self.register_buffer("bias", bias.detach().clone() if bias is not None else None)
        self.has_lowrank = bool(lowrank)
        self.register_buffer("dequantized_weight", self._dequantize(), persistent=False)

    def stored_tensors(self) -> Stored:
        return {name: getattr(self, name) for name in self.stored_names}

    def _dequantize(self) -> torch.Tensor:
        return dequantize_weight(self.stored_tensors(), self.weight_spec, self.weight_shape, self.compute_dtype)

    def prepare_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(quantized input, input of the low-rank branch): smoothing, then input fake-quant."""
        if self.has_lowrank:
            x = (x.float() / _channel_view(self.smooth_factor, x, self.channel_dim)).to(x.dtype)
        branch = x
        if self.input_spec is not None:
            params = {name: getattr(self, name) for name in self.input_param_names} or None
            x = fake_quantize(x, self.input_spec, params, self.channel_dim)
        return x, branch

    def lowrank_output(self, branch: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(branch, self.lora_down.to(branch.dtype)), self.lora_up.to(branch.dtype))

    def extra_repr(self) -> str:
        act = self.input_spec.describe() if self.input_spec else "none"
        rank = f", rank={self.lora_down.shape[0]}" if self.has_lowrank else ""
        return f"shape={tuple(self.weight_shape)}, weight={self.weight_spec.describe()}, input={act}{rank}"


class QuantizedLinear(QuantizedLayer):
    """nn.Linear with a quantized weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        xq, branch = self.prepare_input(x)
        y = F.linear(xq, self.dequantized_weight, self.bias)
        if self.has_lowrank:
            y = y + self.lowrank_output(branch)
        return y


class QuantizedConv2d(QuantizedLayer):
    """nn.Conv2d with a quantized weight (flattened to [out, in/groups * kh * kw] for its scales)."""

    channel_dim = 1

    def __init__(self, *args: Any, conv: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conv = dict(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        xq, _ = self.prepare_input(x)
        conv = self.conv
        if conv["padding_mode"] != "zeros":
            xq = F.pad(xq, conv["reversed_padding"], mode=conv["padding_mode"])
            padding: Any = 0
        else:
            padding = conv["padding"]
        return F.conv2d(xq, self.dequantized_weight, self.bias, conv["stride"], padding, conv["dilation"], conv["groups"])


def conv_options(layer: torch.nn.Conv2d) -> dict[str, Any]:
    """The geometry of a Conv2d that its quantized replacement needs (JSON-serializable)."""
    return {
        "stride": list(layer.stride),
        "padding": layer.padding if isinstance(layer.padding, str) else list(layer.padding),
        "dilation": list(layer.dilation),
        "groups": layer.groups,
        "padding_mode": layer.padding_mode,
        "reversed_padding": list(layer._reversed_padding_repeated_twice),
    }


def _channel_view(vector: torch.Tensor, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    return vector.float().reshape(shape)
