"""QuantizedLinear / QuantizedConv2d: an nn.Linear / nn.Conv2d that holds only stored tensors.

Each is a real `nn.Linear` / `nn.Conv2d` (a subclass), so the attributes diffusers, PEFT and user
code read are there: `in_features`, `out_features`, `in_channels`, `out_channels`,
`kernel_size`, `stride`, `padding`, `dilation`, `groups`, `padding_mode`. Its buffers are exactly
the checkpoint's tensors under their checkpoint names (`weight` or `weight_packed`,
`weight_scale`, `weight_zero_point`, `weight_scale_2`, `bias`, `input_scale`,
`input_zero_point`, `input_scale_2`, and for SVDQuant `smooth_factor`, `lora_down`, `lora_up`),
so `state_dict()` is the checkpoint and resident memory is the checkpoint's bytes.

How a forward computes is the layer's kernel (`diffquant.quant.kernels`), chosen per layer:
`dequant` (the default: dequantize inside each call into a temporary), `exact` (the same
numbers with a cached float copy of the weight), or a native low-precision GEMM. A kernel may
keep extra state (a packed layout) while attached; `state_dict()` always gives the checkpoint's
tensors back.

SVDQuant forward (Li et al., 2024, arXiv 2411.05007, eq. 5): with x̂ = x / smooth_factor,
y = Q(x̂) · deq(R)ᵀ + (x̂ · lora_downᵀ) · lora_upᵀ + b; the low-rank branch is never quantized.
With a shifted input spec (`shift`, nunchaku's INT4 mlp_fc2): y = Q((x + c) / s) · deq(R)ᵀ +
(x / s) · lora_downᵀ · lora_upᵀ + b', the shift on the spec's columns, the branch unshifted, and
the stored bias b' = b - c Σ_j deq(R)_ij / s_j (`diffquant.quant.shifted_inputs`).

Dtype and device. `module.to(device)` moves every tensor; `module.to(dtype)` / `.half()` change
the compute dtype and the bias (an ordinary float parameter of the layer): stored codes, scales
and the SVDQuant branch keep their dtypes (a cast of float32 scales or fp8 codes would change the
numbers).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from diffquant.quant.errors import ConfigError
from diffquant.quant.shifted_inputs import shift_input
from diffquant.quant.spec import TensorSpec
from diffquant.quant.weights import QuantizedWeight, Stored

LOWRANK_NAMES = ("smooth_factor", "lora_down", "lora_up")


class QuantizedLayer:
    """State and forward shared by QuantizedLinear and QuantizedConv2d (see the module docstring).

    Not an nn.Module itself: it is mixed into nn.Linear / nn.Conv2d, whose own `__init__` is not
    run (it would allocate a float weight).
    """

    channel_dim = -1
    weight_spec: TensorSpec
    input_spec: TensorSpec | None
    weight_shape: torch.Size
    compute_dtype: torch.dtype
    stored_names: tuple[str, ...]
    input_param_names: tuple[str, ...]
    has_lowrank: bool
    kernel: Any

    def _init_quantized(
        self,
        weight: QuantizedWeight,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype,
        input_spec: TensorSpec | None,
        input_params: Stored | None,
        lowrank: Stored | None,
    ) -> None:
        torch.nn.Module.__init__(self)  # type: ignore[arg-type]
        self.weight_spec = weight.spec
        self.input_spec = input_spec
        self.weight_shape = torch.Size(weight.shape)
        self.compute_dtype = compute_dtype
        self.stored_names = tuple(sorted(weight.tensors))
        self.input_param_names = tuple(sorted(input_params or {}))
        for name, tensor in {**weight.tensors, **(input_params or {}), **(lowrank or {})}.items():
            self.register_buffer(name, tensor.detach())
        self.register_buffer("bias", bias.detach() if bias is not None else None)
        self.has_lowrank = bool(lowrank)
        if input_spec is not None and input_spec.shift is not None:
            if self.channel_dim != -1:
                raise ConfigError("input shift applies to Linear layers, not Conv2d", "drop shift from the Conv2d layers' input spec")
            if not isinstance(input_spec.shift_from, int):
                raise ConfigError(f"input shift_from {input_spec.shift_from!r} is unresolved", "plan the layer with quantizer.plan_layers")
        from diffquant.quant.kernels import DEQUANT

        self.kernel = None
        self.set_kernel(DEQUANT)  # no float copy: stage two holds the model's weights once

    # The stored form.
    def quantized_weight(self) -> QuantizedWeight:
        """The stored weight (checkpoint tensors), whatever layout the kernel keeps meanwhile."""
        return QuantizedWeight(self.weight_spec, self.weight_shape, self.kernel.stored_tensors(self))

    def input_parameters(self) -> Stored | None:
        """The frozen static input tensors, or None (dynamic or weight-only)."""
        return {name: getattr(self, name) for name in self.input_param_names} or None

    def set_kernel(self, kernel: Any) -> None:
        """Run forwards through `kernel`; ConfigError with its reason when it cannot run this layer."""
        if self.kernel is kernel:
            return
        reason = kernel.unsupported(self)
        if reason is not None:
            raise ConfigError(f"kernel {kernel.name} cannot run the {tuple(self.weight_shape)} {self.weight_spec.describe()} layer: {reason}",
                              "let set_execution(module, mode) choose the kernels")
        if self.kernel is not None:
            self.kernel.detach(self)
        self.kernel = kernel
        kernel.attach(self)

    # Forward.
    def smooth(self, x: torch.Tensor) -> torch.Tensor:
        """SVDQuant's x / smooth_factor along the channel dim, in float32, back in x's dtype."""
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return (x.float() / self.smooth_factor.float().reshape(shape)).to(x.dtype)

    def lowrank_output(self, branch: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(branch, self.lora_down.to(branch.dtype)), self.lora_up.to(branch.dtype))

    def fake_quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """x through the input quantizer (fake-quant), or unchanged for weight-only layers."""
        if self.input_spec is None:
            return x
        from diffquant.quant.weights import fake_quantize_input

        return fake_quantize_input(x, self.input_spec, self.input_parameters(), self.channel_dim)

    # nn.Module plumbing.
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        """Move stored tensors with `fn` but keep their dtypes; a float cast sets the compute dtype."""
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self._device()))
        self.kernel.detach(self)
        for name, tensor in list(self._buffers.items()):
            if tensor is None:
                continue
            moved = fn(tensor)
            if moved.dtype != tensor.dtype and name != "bias":  # never round a stored tensor through another dtype
                moved = tensor.to(moved.device)
            self._buffers[name] = moved
        if probe.dtype.is_floating_point:
            self.compute_dtype = probe.dtype
        self.kernel.attach(self)
        return self

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        stored = self.kernel.stored_tensors(self)
        for name, tensor in self._buffers.items():
            if tensor is None or name in self._non_persistent_buffers_set:
                continue
            value = stored.get(name, tensor)
            destination[prefix + name] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A state dict holds the checkpoint's layout; the kernel may keep another one while attached.
        kernel = self.kernel
        kernel.detach(self)
        try:
            torch.nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]
        finally:
            kernel.attach(self)

    def _device(self) -> torch.device:
        return getattr(self, self.stored_names[0]).device

    def extra_repr(self) -> str:
        act = self.input_spec.describe() if self.input_spec else "none"
        rank = f", rank={self.lora_down.shape[0]}" if self.has_lowrank else ""
        return f"shape={tuple(self.weight_shape)}, weight={self.weight_spec.describe()}, input={act}{rank}, kernel={self.kernel.name}"


class QuantizedLinear(QuantizedLayer, torch.nn.Linear):
    """nn.Linear with a quantized weight. Forward: x [..., in_features] -> [..., out_features]
    in the compute dtype.

    Example:
        >>> from diffquant.quant.weights import quantize_weight
        >>> weight = quantize_weight(torch.tensor([[1.0, -2.0], [0.5, 0.25]]), TensorSpec("int8", "per_channel"))
        >>> layer = QuantizedLinear(weight, bias=None, compute_dtype=torch.float32)
        >>> layer.in_features, layer.out_features, sorted(layer.state_dict())
        (2, 2, ['weight', 'weight_scale'])
        >>> layer(torch.tensor([[1.0, 1.0]]))
        tensor([[-0.9921,  0.7520]])
    """

    def __init__(
        self,
        weight: QuantizedWeight,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype,
        input_spec: TensorSpec | None = None,
        input_params: Stored | None = None,
        lowrank: Stored | None = None,
    ) -> None:
        self._init_quantized(weight, bias, compute_dtype, input_spec, input_params, lowrank)
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        spec = self.input_spec
        shifted = spec is not None and spec.shift is not None
        if not self.has_lowrank:
            return self.kernel.linear(self, shift_input(x, spec) if shifted else x)  # type: ignore[arg-type]
        branch = self.smooth(x)
        main = self.smooth(shift_input(x, spec)) if shifted else branch  # type: ignore[arg-type]
        return self.kernel.linear(self, main) + self.lowrank_output(branch)


class QuantizedConv2d(QuantizedLayer, torch.nn.Conv2d):
    """nn.Conv2d with a quantized weight (flattened to [out, in/groups * kh * kw] for its scales).
    Forward: x [B, in_channels, H, W] -> [B, out_channels, H', W'] in the compute dtype."""

    channel_dim = 1

    def __init__(
        self,
        weight: QuantizedWeight,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype,
        input_spec: TensorSpec | None = None,
        input_params: Stored | None = None,
        lowrank: Stored | None = None,
        *,
        conv: dict[str, Any],
    ) -> None:
        self._init_quantized(weight, bias, compute_dtype, input_spec, input_params, lowrank)
        self.conv = dict(conv)
        out_channels, in_per_group, kh, kw = (int(d) for d in weight.shape)
        self.out_channels, self.in_channels = out_channels, in_per_group * int(conv["groups"])
        self.kernel_size = (kh, kw)
        self.stride = tuple(conv["stride"])
        self.padding = conv["padding"] if isinstance(conv["padding"], str) else tuple(conv["padding"])
        self.dilation = tuple(conv["dilation"])
        self.groups = int(conv["groups"])
        self.padding_mode = conv["padding_mode"]
        self._reversed_padding_repeated_twice = list(conv["reversed_padding"])
        self.transposed, self.output_padding = False, (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        return self.kernel.conv2d(self, x)

    def conv2d_with(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """F.conv2d of x with `weight` and this layer's bias and geometry."""
        conv = self.conv
        if conv["padding_mode"] != "zeros":
            x = F.pad(x, conv["reversed_padding"], mode=conv["padding_mode"])
            padding: Any = 0
        else:
            padding = conv["padding"]
        return F.conv2d(x, weight, self.bias, conv["stride"], padding, conv["dilation"], conv["groups"])


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
