"""fp8 e4m3 w8a8 Linear layers through `torch._scaled_mm`, on CPU and CUDA.

Layers: weight fp8_e4m3 per_tensor (`weight` float8_e4m3fn [N, K], `weight_scale` []); input
fp8_e4m3 per_tensor, static (`input_scale`) or dynamic (amax / 448 per call, fake-quant's
rule, with its `scale_dtype` rounding). SVDQuant layers too (the module smooths x and adds the
low-rank branch).

Computation, x [..., K] -> y [..., N]:

    q_x = fp8(clamp(x / s_x, -448, 448))    float8_e4m3fn [M, K]: fake-quant's codes, bit for bit
    y   = _scaled_mm(q_x, q_wᵀ, s_x, s_w)   float32 [M, N] = (q_x @ q_wᵀ) · s_x · s_w
    y  += b; cast to the compute dtype

q_wᵀ is the transposed view of the stored codes (column-major, what `_scaled_mm` wants).

fp8 weight-only layers (no input quantizer) are not run here: `_scaled_mm` multiplies two fp8
operands, so it would have to quantize the 16-bit activations to fp8, which the checkpoint
never did: a different (worse) model, not a faster path to the same one. They stay `dequant`.
Per-channel fp8 weights and e5m2 also stay `dequant` (row-wise scaling is a CUDA-only,
bf16-output configuration of the op).

Error bound against `exact` (same layer, same input): both compute Σ_k x̂_k ŵ_k + b from the
same codes. A product of two e4m3 codes (4 significant bits each) is exact in float32, so this
kernel rounds only in its sums (K u₃₂) and scaling and output (<= 3 u₃₂ + u); `exact` rounds x̂
and ŵ to float32 and the compute dtype, sums and rounds its output. With S = |x̂| · |ŵ|ᵀ + |b|:

    |y_native - y_exact| <= (6 u + 2 (K + 4) u₃₂) · S

Measured max |Δ| / S on this machine (K = 256): 3.1e-8 in float32, 2.2e-3 in bfloat16.

Dispatch: CPU (torch 2.13 runs `_scaled_mm` there, tensor-wise scales) and CUDA with compute
capability >= 8.9 (fp8 tensor cores: "only supported on CUDA devices with compute capability >=
9.0 or 8.9"), K and N multiples of 16 ("trailing dimension of mat1 to be divisible by 16").

`auto` rule (`loses_to_dequant`), measured by benchmarks/bench_inference.py (RESULTS.md) on an
AMD EPYC with AVX512-VNNI, torch 2.13, bf16, 1 thread: on the CPU the op converts both operands and
runs a float32 GEMM in each call: 4096 x 1280 -> 5120 1350 ms against 419 ms for `dequant` (a
float32 nn.Linear 1261 ms), 4096 x 3072 -> 3072 2374 ms against 1055 ms; with few tokens its
per-call conversion dominates (4 x 3072 -> 3072: 171 ms against 38 ms). It never beat `dequant`,
so `auto` keeps `dequant` on the CPU; on CUDA (fp8 tensor cores) it is native.

Example:
    >>> from diffquant.quant.modules import QuantizedLinear
    >>> from diffquant.quant.spec import TensorSpec
    >>> from diffquant.quant.weights import quantize_weight
    >>> spec = TensorSpec("fp8_e4m3", dynamic=True)
    >>> layer = QuantizedLinear(quantize_weight(torch.full((16, 16), 0.5), TensorSpec("fp8_e4m3")), None, torch.float32, spec)
    >>> layer.set_kernel(FP8_SCALED_MM)
    >>> layer(torch.ones(1, 16))[0, :3]
    tensor([8., 8., 8.])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from diffquant.quant.formats.fp8 import quantize_fp8
from diffquant.quant.kernels.gemm import NativeKernel, F32_TINY, as_rows, float_bias, from_rows, layer_device
from diffquant.quant.spec import TensorSpec
from diffquant.quant.weights.base import dynamic_scale_in_dtype

if TYPE_CHECKING:
    from diffquant.quant.modules import QuantizedLayer, QuantizedLinear

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448.0
FP8_MIN_CAPABILITY = (8, 9)
SCALED_MM_ALIGN = 16


class Fp8ScaledMatmulKernel(NativeKernel):
    """fp8 e4m3 x fp8 e4m3 GEMM with tensor-wise scales (module docstring)."""

    name = "torch._scaled_mm"

    def device_reason(self, layer: "QuantizedLayer", device: torch.device, capability: tuple[int, int] | None) -> str | None:
        if device.type == "cpu":
            return None
        if capability is None or tuple(capability) < FP8_MIN_CAPABILITY:
            return f"{self.name} needs a CUDA GPU of compute capability >= 8.9, not {capability}"
        out_features, in_features = layer.weight_shape
        if in_features % SCALED_MM_ALIGN or out_features % SCALED_MM_ALIGN:
            return f"{self.name} on CUDA needs in and out features that are multiples of {SCALED_MM_ALIGN}, not {in_features} -> {out_features}"
        return None

    def handles(self, layer: "QuantizedLayer") -> bool:
        """Whether `layer`'s format is one this kernel computes (on some device)."""
        from diffquant.quant.modules import QuantizedLinear

        weight, act = layer.weight_spec, layer.input_spec
        return (isinstance(layer, QuantizedLinear) and weight.dtype == "fp8_e4m3" and weight.granularity == "per_tensor"
                and act is not None and act.dtype == "fp8_e4m3" and act.granularity == "per_tensor")

    def loses_to_dequant(self, layer: "QuantizedLayer") -> str | None:
        if layer_device(layer).type == "cpu":
            return "measured no faster than dequant on the CPU (it converts both operands and runs a float32 GEMM per call)"
        return None

    def linear(self, layer: "QuantizedLinear", x: torch.Tensor) -> torch.Tensor:
        rows = as_rows(x)
        if layer.input_spec.dynamic:
            input_scale = dynamic_fp8_scale(rows, layer.input_spec)
        else:
            input_scale = layer.input_scale
        codes = quantize_fp8(rows, input_scale, FP8)
        y = torch._scaled_mm(codes, layer.weight.t(), scale_a=input_scale, scale_b=layer.weight_scale, out_dtype=torch.float32)
        bias = float_bias(layer)
        if bias is not None:
            y = y.add_(bias)
        y = from_rows(y, x)
        return y if y.dtype == layer.compute_dtype else y.to(layer.compute_dtype)


def dynamic_fp8_scale(x: torch.Tensor, spec: TensorSpec | None = None) -> torch.Tensor:
    """Fake-quant's dynamic per-tensor e4m3 scale (`formats.fp8.choose_fp8_scale` of amax |x|):
    amax / 448 in float32, 1.0 for an all-zero x, raised to 2^-126 when smaller, rounded to the
    nearest value of the spec's `scale_dtype` when it has one; without fake-quant's host-side
    finiteness check, so that the forward traces without a graph break."""
    amax = x.float().abs().amax()
    scale = torch.clamp(amax / FP8_MAX, min=F32_TINY)
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    return scale if spec is None else dynamic_scale_in_dtype(scale, spec)


FP8_SCALED_MM = Fp8ScaledMatmulKernel()
