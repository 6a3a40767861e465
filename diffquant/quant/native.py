"""Native low-precision inference: quantized Linear layers that compute in real int8 / fp8.

`convert_to_native(module)` walks a quantized submodule and replaces each eligible
QuantizedLinear by a module that runs a low-precision GEMM instead of fake-quant. It returns a
`NativeReport` whose `str()` is a one-line summary of what was converted and what was kept.

Eligibility (checked per layer, on the device its buffers are on):

======  =============================================================  ======================
kernel  the layer must have                                            device and shapes
======  =============================================================  ======================
int8    weight int8 symmetric, per_tensor or per_channel;              cpu: any shape;
        input int8 symmetric per_tensor, static (`input_scale`) or     cuda: in and out
        dynamic (one scale per call, computed as fake-quant does)      features multiples of 8
fp8     weight fp8_e4m3 per_tensor; input fp8_e4m3 per_tensor static   cuda, compute capability
                                                                       >= 8.9; in and out
                                                                       features multiples of 16
======  =============================================================  ======================

Everything else keeps its fake-quant forward and is counted in the report with its reason:
Conv2d layers, 4-bit formats (int4, uint4, mxfp4, nvfp4), weight-only layers, SVDQuant layers,
asymmetric or per_group int8, per_group or dynamic fp8, fp8 on a CPU or an older GPU.

INT8 computation, x [..., K] -> y [..., N] (`NativeInt8Linear`):

    q_x = clamp(round_half_even(x / s_x), -128, 127)   int8 [M, K]: fake-quant's codes, bit for bit
    acc = q_x @ q_wᵀ                                    int32 [M, N], exact (torch._int_mm)
    y   = acc · (s_x · s_w) + bias                      float32, then cast to the compute dtype

Tolerance against the fake-quant layer. Both compute Σ_k x̂_k ŵ_k + b (x̂ = q_x s_x, ŵ = q_w s_w)
from the same codes: the native layer exactly up to <= 4 float32 roundings in its epilogue,
fake-quant with a float GEMM whose summation rounds. With S = Σ_k |x̂_k| |ŵ_k| + |b| per output
element (|x̂| @ |ŵ|ᵀ + |b|) and u = 2⁻²⁴:

- float32 compute dtype: |y_native - y_fake| <= (K + 5) u S, the worst-case summation bound.
  Measured max |diff| / S: 2.5e-7 (~4u) on synthetic 64..640 x 64..1280 layers, 2.9e-7 over the
  96 Linear layers of the tiny-sdxl int8_w8a8 unet on its calibration samples.
- bfloat16 compute dtype: fake-quant also rounds x̂ and ŵ to bfloat16 (u_bf16 = 2⁻⁸) before its
  GEMM, and both round the output, so |y_native - y_fake| <= (2⁻⁶ + K u) S; native is the more
  exact of the two. Measured max |diff| / S: 4.7e-3 synthetic, 5.1e-3 on tiny-flux's 38 layers.

Through a whole submodule: the tiny-sdxl (float32) unet output is bit-identical on its calibration
samples, because every Linear output passes through some later layer's int8 input quantizer (or a
quantized conv) before the output, and a perturbation of ~1e-7 almost never moves a code; the
tiny-flux (bfloat16) transformer output differs by 5.2e-3 of max |y| (one bfloat16 step).
tests/test_native.py checks the per-layer bounds and 1e-4 of max |y| for the tiny-sdxl unet.

The int32 accumulator cannot overflow below K = 2³¹ / 128² = 131072 input features.

`torch._int_mm` constraints: on the CPU (torch 2.13) any M, K, N (measured: M = 1, K = 7, N = 3
work and are exact); on CUDA, M > 16 (shorter inputs are padded with zero rows here), K and N
multiples of 8 (other layers stay fake-quant). `torch._scaled_mm` needs K and N multiples of 16
and the weight column-major (the stored [N, K] codes, transposed). torch 2.13 also runs
`torch._scaled_mm` on the CPU, but no faster than fake-quant (measured 4096 x 640 -> 640, 1 thread:
209 ms vs 177 ms), so fp8 layers stay fake-quant there.

Speed on the CPU (benchmarks/bench_native.py, torch 2.13, AVX512-VNNI, 1 thread): at SDXL shapes
(4096 tokens x 640 or 1280 features) native int8 is 3.3-4.2x faster than a float32 nn.Linear and
1.6-1.8x faster than a bfloat16 one, the int8 GEMM taking ~75% of its time. At the tiny-sdxl
shapes (M = 2..154, K, N = 64..512) it takes 21-35 µs a call, ~1.2x faster than fake-quant but
slower than float32 (8-34 µs): its eight kernel launches (5 to quantize the input, the GEMM, 2 to
scale) cost more there than a float32 GEMM of 0.1 MFLOP.

A native module subclasses QuantizedLinear and holds the same persistent buffers, so
`state_dict()` (the checkpoint) is unchanged by conversion; it drops the float dequantized weight
(a non-persistent buffer): the GEMM reads the stored int8 codes, so a native int8 layer holds 1
byte per weight instead of 1 + 4 (codes + float32 dequantized copy). Inference only: there is
no autograd through torch._int_mm. Convert after moving the module to its device, since the
kernel choice depends on the device.

Example:
    >>> unet, _ = load_quantized_submodule(Path("artifacts/quantized/tiny-sdxl-int8_w8a8"))
    >>> print(convert_to_native(unet))
    int8: 96 layers via torch._int_mm; fp8: 0; 22 kept fake-quant (22 Conv2d: native kernels cover Linear only)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from diffquant.quant.formats.affine import choose_qparams_affine
from diffquant.quant.formats.fp8 import quantize_fp8
from diffquant.quant.modules import QuantizedConv2d, QuantizedLayer, QuantizedLinear
from diffquant.quant.qtypes import get_qtype
from diffquant.quant.quantizer import swap_layers

INT8_KERNEL = "torch._int_mm"
FP8_KERNEL = "torch._scaled_mm"
INT8_QMIN = int(get_qtype("int8").qmin)  # -128
INT8_QMAX = int(get_qtype("int8").qmax)  # 127
# torch._scaled_mm refuses other GPUs ("only supported on CUDA devices with compute capability
# >= 9.0 or 8.9"): Ada (8.9) and Hopper (9.0) are the first with fp8 tensor cores.
FP8_MIN_CAPABILITY = (8, 9)
FP8_DEVICE_REASON = "fp8 kernels need a CUDA GPU with compute capability >= 8.9"
# torch._int_mm on CUDA checks "self.size(0) needs to be greater than 16" and K, N "a multiple of 8".
CUDA_INT_MM_MIN_ROWS = 17
CUDA_INT_MM_ALIGN = 8
# torch._scaled_mm checks "trailing dimension of mat1 to be divisible by 16" and mat2's both dims.
SCALED_MM_ALIGN = 16


@dataclass
class NativeReport:
    """What `convert_to_native` did: layer names per kernel, and each kept layer's reason.

    `kept` maps a layer name to "<Linear|Conv2d>: <reason>". `str()` gives the one-line summary.
    """

    int8: list[str] = field(default_factory=list)
    fp8: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        fp8 = f"fp8: {len(self.fp8)} layers via {FP8_KERNEL}" if self.fp8 else "fp8: 0"
        if any(FP8_DEVICE_REASON in reason for reason in self.kept.values()):
            fp8 += f" ({FP8_DEVICE_REASON}; kept fake-quant)"
        kept = f"{len(self.kept)} kept fake-quant"
        if self.kept:
            groups = Counter(self.kept.values()).most_common()
            kept += " (" + ", ".join(f"{count} {reason}" for reason, count in groups) + ")"
        return "; ".join([f"int8: {len(self.int8)} layers via {INT8_KERNEL}", fp8, kept])


def convert_to_native(module: torch.nn.Module) -> NativeReport:
    """Replace every eligible quantized Linear of `module` (see the module docstring) in place.

    Idempotent: layers that are already native are counted again, not rebuilt. The root module
    itself cannot be replaced; for a single layer use `NativeInt8Linear.from_quantized(layer)`.

    Example:
        >>> str(convert_to_native(unet))  # a tiny-sdxl int8_w8a8 unet
        'int8: 96 layers via torch._int_mm; fp8: 0; 22 kept fake-quant (22 Conv2d: native kernels cover Linear only)'
    """
    report = NativeReport()
    replacements: dict[str, torch.nn.Module] = {}
    for name, layer in module.named_modules():
        if not isinstance(layer, QuantizedLayer):
            continue
        kind, reason = native_kernel(layer)
        if kind is None:
            report.kept[name] = f"{'Conv2d' if isinstance(layer, QuantizedConv2d) else 'Linear'}: {reason}"
            continue
        getattr(report, kind).append(name)
        native_class = NATIVE_CLASSES[kind]
        if not isinstance(layer, native_class):
            if not name:
                raise ValueError(
                    f"convert_to_native replaces submodules, and got a {type(layer).__name__} as the root module; "
                    f"use {native_class.__name__}.from_quantized(layer) for a single layer"
                )
            replacements[name] = native_class.from_quantized(layer).train(layer.training)
    swap_layers(module, replacements)
    return report


def native_kernel(layer: QuantizedLayer) -> tuple[str | None, str]:
    """("int8" or "fp8", "") when `layer` can run natively on its device, else (None, reason)."""
    if isinstance(layer, (NativeInt8Linear, NativeFp8Linear)):
        return layer.kind, ""
    if not isinstance(layer, QuantizedLinear):
        return None, "native kernels cover Linear only"
    if layer.has_lowrank:
        return None, "SVDQuant layer (its smoothed low-rank form has no native kernel here)"
    weight = layer.weight_spec
    if weight.dtype in ("int8", "uint8"):
        reason = _int8_reason(layer)
        return (None, reason) if reason else ("int8", "")
    if weight.dtype in ("fp8_e4m3", "fp8_e5m2"):
        reason = _fp8_reason(layer)
        return (None, reason) if reason else ("fp8", "")
    return None, f"{weight.dtype} weights have no native kernel here"


class NativeInt8Linear(QuantizedLinear):
    """A QuantizedLinear (int8 w8a8) whose forward is one int8 GEMM with int32 accumulation.

    Same persistent buffers as the fake-quant layer (`weight` int8 [N, K], `weight_scale` [] or
    [N, 1], `input_scale` [] when static, `bias` [N]), which the GEMM reads directly; non-persistent:
    `output_scale` (float32 [N]: s_x · s_w when static, s_w when dynamic) and `kernel_bias`
    (float32 [N]).
    Forward: x [..., K] in any float dtype -> y [..., N] in the compute dtype.
    """

    kind = "int8"

    @classmethod
    def from_quantized(cls, layer: QuantizedLinear) -> "NativeInt8Linear":
        """The native twin of an eligible fake-quant layer (ValueError with the reason otherwise)."""
        _check_eligible(layer, cls.kind)
        return cls(**_constructor_args(layer))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The GEMM reads the int8 codes; a float copy of the weight would only cost memory.
        self.dequantized_weight = None
        out_features = self.weight_shape[0]
        scale = self.weight_scale.float().reshape(-1).expand(out_features)
        if not self.input_spec.dynamic:
            scale = self.input_scale.float() * scale
        self.register_buffer("output_scale", scale.contiguous(), persistent=False)
        self.register_buffer("kernel_bias", None if self.bias is None else self.bias.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # At the tiny shapes the kernels take a few µs each, so no-op conversions are skipped
        # rather than called: each costs ~0.5 µs of Python and dispatch (measured ~20% of a call).
        if x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if self.input_spec.dynamic:
            low, high = torch.aminmax(x2.float())
            input_scale, _ = choose_qparams_affine(low, high, INT8_QMIN, INT8_QMAX, symmetric=True)
            output_scale = self.output_scale * input_scale
        else:
            input_scale, output_scale = self.input_scale, self.output_scale
        # b = the transposed view of the row-major [N, K] codes, i.e. column-major: what cuBLAS
        # wants, and on the CPU as fast as a [K, N] contiguous copy (measured), so none is kept.
        acc = int8_matmul(quantize_int8(x2, input_scale), self.weight.t())
        y = scale_accumulator_(acc, output_scale, self.kernel_bias)
        if x.dim() != 2:
            y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y if y.dtype == self.compute_dtype else y.to(self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={INT8_KERNEL}"


class NativeFp8Linear(QuantizedLinear):
    """A QuantizedLinear (fp8_e4m3 w8a8, static per-tensor scales) that runs torch._scaled_mm.

    Same persistent buffers as the fake-quant layer (`weight` float8_e4m3fn [N, K],
    `weight_scale` [], `input_scale` [], `bias` [N]); `kernel_bias` (float32 [N]) is added after
    the GEMM, because torch._scaled_mm takes no bias with a float32 output. Needs CUDA with
    compute capability >= 8.9. Forward: x [..., K] -> y [..., N] in the compute dtype.
    """

    kind = "fp8"

    @classmethod
    def from_quantized(cls, layer: QuantizedLinear) -> "NativeFp8Linear":
        """The native twin of an eligible fake-quant layer (ValueError with the reason otherwise)."""
        _check_eligible(layer, cls.kind)
        return cls(**_constructor_args(layer))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dequantized_weight = None
        self.register_buffer("kernel_bias", None if self.bias is None else self.bias.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        lead = x.shape[:-1]
        codes = quantize_fp8(x.reshape(-1, x.shape[-1]), self.input_scale, torch.float8_e4m3fn)
        y = torch._scaled_mm(
            codes, self.weight.t(), scale_a=self.input_scale, scale_b=self.weight_scale, out_dtype=torch.float32
        )
        if self.kernel_bias is not None:
            y.add_(self.kernel_bias)
        return y.reshape(*lead, y.shape[-1]).to(self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={FP8_KERNEL}"


NATIVE_CLASSES: dict[str, type[NativeInt8Linear] | type[NativeFp8Linear]] = {"int8": NativeInt8Linear, "fp8": NativeFp8Linear}


def quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 codes clamp(round_half_even(x / scale), -128, 127), equal to `quantize_affine`'s.

    x: float tensor [...], divided in float32; scale: float32 [] (or broadcasting). Returns int8
    with x's shape. NaN maps to 0 and +-inf saturate, as in `quantize_affine`.
    """
    if x.dtype != torch.float32:
        x = x.float()
    codes = torch.div(x, scale).round_().nan_to_num_(nan=0.0).clamp_(INT8_QMIN, INT8_QMAX)
    return codes.to(torch.int8)


def int8_matmul(codes: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """int32 [M, N] = codes int8 [M, K] @ weight_t int8 [K, N], exact.

    On CUDA, inputs of 16 rows or fewer are padded with zero rows for torch._int_mm.
    """
    rows = codes.shape[0]
    if codes.is_cuda and rows < CUDA_INT_MM_MIN_ROWS:
        padded = torch.cat([codes, codes.new_zeros(CUDA_INT_MM_MIN_ROWS - rows, codes.shape[1])])
        return torch._int_mm(padded, weight_t)[:rows]
    return torch._int_mm(codes, weight_t)


def scale_accumulator_(acc: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float32 acc · scale + bias, written over acc's own memory (acc int32 [M, N], row-contiguous).

    scale, bias: float32 [N] (bias may be None). Returns a float32 view of acc's storage.
    """
    out = acc.view(torch.float32)
    # Each int32 slot becomes the float32 of the same 4 bytes, so the cast needs no second [M, N]
    # buffer: for large M a fresh allocation (page faults) costs more than the cast itself.
    out.copy_(acc)
    if bias is None:
        return out.mul_(scale)
    return torch.addcmul(bias, out, scale, out=out)


def _int8_reason(layer: QuantizedLinear) -> str | None:
    weight, act = layer.weight_spec, layer.input_spec
    if weight.dtype != "int8" or not weight.symmetric or weight.granularity == "per_group":
        return f"{weight.describe()} weights (the int8 kernel needs symmetric per_tensor or per_channel int8)"
    if act is None:
        return "weight-only int8 has no int8 activation"
    if act.dtype != "int8" or not act.symmetric or act.granularity != "per_tensor":
        return f"{act.describe()} inputs (the int8 kernel needs symmetric per_tensor int8 inputs)"
    device = layer.weight.device
    out_features, in_features = layer.weight_shape
    if device.type == "cuda":
        if in_features % CUDA_INT_MM_ALIGN or out_features % CUDA_INT_MM_ALIGN:
            return f"{INT8_KERNEL} on CUDA needs in/out features that are multiples of {CUDA_INT_MM_ALIGN}"
    elif device.type != "cpu":
        return f"{INT8_KERNEL} runs on cpu and cuda, not {device.type}"
    return None


def _fp8_reason(layer: QuantizedLinear) -> str | None:
    weight, act = layer.weight_spec, layer.input_spec
    if weight.dtype != "fp8_e4m3" or weight.granularity != "per_tensor":
        return f"{weight.describe()} weights (the fp8 kernel needs per_tensor fp8_e4m3)"
    if act is None:
        return "weight-only fp8 has no fp8 activation"
    if act.dtype != "fp8_e4m3" or act.granularity != "per_tensor" or act.dynamic:
        return f"{act.describe()} inputs (the fp8 kernel needs static per_tensor fp8_e4m3 inputs)"
    device = layer.weight.device
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < FP8_MIN_CAPABILITY:
        return FP8_DEVICE_REASON
    out_features, in_features = layer.weight_shape
    if in_features % SCALED_MM_ALIGN or out_features % SCALED_MM_ALIGN:
        return f"{FP8_KERNEL} needs in/out features that are multiples of {SCALED_MM_ALIGN}"
    return None


def _check_eligible(layer: QuantizedLinear, kind: str) -> None:
    found, reason = native_kernel(layer)
    if found != kind:
        raise ValueError(f"layer {layer.extra_repr()} cannot run the {kind} kernel: {reason or f'it is a {found} layer'}")


def _constructor_args(layer: QuantizedLinear) -> dict[str, Any]:
    """QuantizedLayer.__init__ arguments that rebuild `layer` with the same buffers, in order."""
    buffers = dict(layer.named_buffers(recurse=False))
    return dict(
        weight_shape=layer.weight_shape,
        weight_spec=layer.weight_spec,
        stored={name: t for name, t in buffers.items() if name in layer.stored_names},
        bias=layer.bias,
        compute_dtype=layer.compute_dtype,
        input_spec=layer.input_spec,
        input_params={name: t for name, t in buffers.items() if name in layer.input_param_names} or None,
    )
