"""w8a8 int8 Linear layers through `torch._int_mm`: int8 x int8 -> exact int32, on CPU and CUDA.

Layers: weight int8 symmetric per_tensor or per_channel (`weight` int8 [N, K], `weight_scale`
[] or [N, 1]); input int8 symmetric per_tensor, static (`input_scale`) or dynamic (one scale per
call, fake-quant's rule: qmax or half_span, `scale_dtype` rounding), or dynamic per_token (one
scale per row of x, the int8_dynamic recipe). SVDQuant layers too (the module smooths x and
adds the low-rank branch). Conv2d layers stay `dequant` (see the README's kernel table: no
im2col path).

Computation, x [..., K] -> y [..., N]:

    q_x = clamp(round_half_even(x / s_x), -128, 127)   int8 [M, K]: fake-quant's codes, bit for bit
                                                        (x · fl(1 / s_x) with half_even_reciprocal)
    acc = q_x @ q_wᵀ                                    int32 [M, N], exact
    y   = acc · (s_x · s_w) + b                         float32, then cast to the compute dtype
                                                        ((acc · s_x) · s_w + b per token)

With `matmul: torchao` on the input spec the epilogue is torchao's, `torchao_matmul.int8_epilogue`
(fl_t(fl32(fl_t(fl32(acc) · s_x) · s_w) + b)), the one the `exact` path computes on the same
accumulator: the two outputs are then equal bit for bit.

The GEMM reads the stored codes through a transposed view (column-major [K, N], what cuBLAS
wants; on the CPU as fast as a contiguous copy), so nothing but the checkpoint stays resident:
s_x · s_w ([] or [N]) and the float32 bias are per-call temporaries.

Error bound against `exact` (same layer, same input). Both compute Σ_k x̂_k ŵ_k + b from the
same codes (x̂ = q_x s_x, ŵ = q_w s_w): this kernel exactly up to <= 4 float32 roundings in its
epilogue, `exact` with a float GEMM in the compute dtype. With S = |x̂| · |ŵ|ᵀ + |b| per output
element, u the compute dtype's unit roundoff and u₃₂ = 2⁻²⁴:

    |y_native - y_exact| <= (6 u + 2 (K + 4) u₃₂) · S

(`exact` rounds x̂ and ŵ to the compute dtype, sums K products with float32 accumulation and
rounds the output: <= 3u + (K + 2) u₃₂; this kernel <= 4 u₃₂ + u; the bound is the one all
native kernels share, with room to spare). Measured max |Δ| / S on this machine (K = 256,
tests/test_kernels.py's layers): 1.2e-7 in float32 (bound 3.1e-5), 2.1e-3 in bfloat16 (bound
2.3e-2). It holds on any CPU: it assumes nothing about the order of the float GEMM's sums.

Dispatch (`unsupported`): CPU any shape (measured: M = 1, K = 7, N = 3 work and are exact);
CUDA K and N multiples of 8 (inputs of M <= 16 rows are padded, `gemm.int8_matmul`); other
devices no. The dynamic scale skips fake-quant's host-side finiteness check (a NaN / inf input
gives NaN outputs instead of an error), so the forward traces without a graph break.

`auto` rule (`loses_to_dequant`), measured by benchmarks/bench_inference.py (RESULTS.md) on an
AMD EPYC with AVX512-VNNI, torch 2.13, bf16 compute dtype, 1 thread: native beats `dequant` at
every shape, since it does strictly less work (no weight dequantization, an int8 GEMM instead of
a float one): 4096 x 640 -> 640 17 ms against 36 ms (bf16 nn.Linear 19 ms), 4096 x 1280 -> 5120
200 ms against 322 ms (bf16 261 ms), 4096 x 3072 -> 3072 495 ms against 1192 ms (bf16 928 ms);
at the tiny models' 2..154 tokens too (the old bench_native: ~1.2x faster than fake-quant). So on
a CPU with int8 dot-product instructions and on CUDA `auto` takes it for every layer. Without
them (an AVX2 CPU without AVX-VNNI) `_int_mm` runs on plain integer SIMD and measured slower
than float GEMMs (issue 13: 0.30x-0.42x of fp32 per UNet call), so there `auto` keeps `dequant`.

Example:
    >>> from diffquant.quant.modules import QuantizedLinear
    >>> from diffquant.quant.spec import TensorSpec
    >>> from diffquant.quant.weights import quantize_weight
    >>> spec = TensorSpec("int8", dynamic=True)
    >>> layer = QuantizedLinear(quantize_weight(torch.tensor([[1.0, -2.0]]), TensorSpec("int8")), None, torch.float32, spec)
    >>> layer.set_kernel(INT8_MM)
    >>> layer(torch.tensor([[1.0, 1.0]]))  # codes [127, 127] · [64, -127] = -8001, times (1/127) (2/127)
    tensor([[-0.9921]])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from diffquant.quant.kernels.gemm import (
    NativeKernel, CUDA_INT_MM_ALIGN, as_rows, cpu_has_int8_dot, dynamic_int8_scale, float_bias, from_rows,
    int8_matmul, layer_device, quantize_int8, scale_accumulator_,
)  # fmt: skip
from diffquant.quant.kernels.torchao_matmul import int8_epilogue

if TYPE_CHECKING:
    from diffquant.quant.modules import QuantizedLayer, QuantizedLinear


class Int8MatmulKernel(NativeKernel):
    """int8 x int8 -> int32 GEMM (`torch._int_mm`) for w8a8 int8 Linear layers (module docstring)."""

    name = "torch._int_mm"

    def device_reason(self, layer: "QuantizedLayer", device: torch.device, capability: tuple[int, int] | None) -> str | None:
        out_features, in_features = layer.weight_shape
        if device.type == "cuda" and (in_features % CUDA_INT_MM_ALIGN or out_features % CUDA_INT_MM_ALIGN):
            return f"{self.name} on CUDA needs in and out features that are multiples of {CUDA_INT_MM_ALIGN}, not {in_features} -> {out_features}"
        return None

    def handles(self, layer: "QuantizedLayer") -> bool:
        """Whether `layer`'s format is one this kernel computes (on some device)."""
        from diffquant.quant.modules import QuantizedLinear

        weight, act = layer.weight_spec, layer.input_spec
        return (isinstance(layer, QuantizedLinear) and weight.dtype == "int8" and weight.symmetric
                and weight.granularity in ("per_tensor", "per_channel") and act is not None and act.dtype == "int8"
                and act.symmetric and (act.granularity == "per_tensor" or (act.granularity == "per_token" and act.dynamic)))

    def loses_to_dequant(self, layer: "QuantizedLayer") -> str | None:
        if layer_device(layer).type == "cpu" and not cpu_has_int8_dot():
            return "measured slower than dequant on a CPU without int8 dot-product instructions (no VNNI)"
        return None

    def linear(self, layer: "QuantizedLinear", x: torch.Tensor) -> torch.Tensor:
        rows = as_rows(x)
        weight_scale = layer.weight_scale.reshape(-1)
        act = layer.input_spec
        if act.dynamic:
            input_scale = dynamic_int8_scale(rows, act)
        else:
            input_scale = layer.input_scale
        acc = int8_matmul(quantize_int8(rows, input_scale, act.rounding == "half_even_reciprocal"), layer.weight.t())
        if act.matmul == "torchao":  # the exact path's epilogue on the same exact accumulator: bit for bit
            return from_rows(int8_epilogue(acc, input_scale, weight_scale, layer.bias, layer.compute_dtype), x)
        if act.granularity == "per_token":
            y = scale_accumulator_(acc, weight_scale, float_bias(layer), row_scale=input_scale)
        else:
            y = scale_accumulator_(acc, input_scale * weight_scale, float_bias(layer))
        y = from_rows(y, x)
        return y if y.dtype == layer.compute_dtype else y.to(layer.compute_dtype)


INT8_MM = Int8MatmulKernel()
