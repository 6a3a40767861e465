"""int8 weight-only Linear layers through `torch._weight_int8pack_mm` (16/32-bit activations).

Layers: weight int8 symmetric per_channel (`weight_scale` [N, 1]) or per_tensor (the one scale
expanded to [N] per call); no input quantizer. SVDQuant layers too (the module smooths x and adds
the low-rank branch).

Computation, x [..., K] in the compute dtype -> y [..., N]:

    y = (x @ q_wᵀ) · s_w + b        torch._weight_int8pack_mm(x [M, K], q_w int8 [N, K], s_w [N])

The op wants the scales in x's dtype (measured, torch 2.13 CPU: "expected scalar type BFloat16
but found Float" otherwise), so s_w is rounded to the compute dtype per call ([N] values, a
temporary); the bias is added in float32 afterwards. The stored codes are read as they are: no
packed copy.

Error bound against `exact` (same layer, same input): both compute Σ_k x_k q_k s_w + b.
`exact` rounds ŵ = q s_w to the compute dtype (u), sums with float32 accumulation (K u₃₂) and
rounds the output (u); this kernel rounds s_w (u), accumulates (K u₃₂), rounds the output, adds
the bias in float32 and rounds again (2u + u₃₂). With S = |x| · |ŵ|ᵀ + |b|, u the compute dtype's
unit roundoff and u₃₂ = 2⁻²⁴:

    |y_native - y_exact| <= (6 u + 2 (K + 4) u₃₂) · S

Measured max |Δ| / S on this machine (K = 256): 2.6e-7 in float32, 2.2e-3 in bfloat16.

Dispatch: CPU and CUDA, compute dtype float32, bfloat16 or float16; other devices no.

`auto` rule (`loses_to_dequant`), measured by benchmarks/bench_inference.py (RESULTS.md) on an
AMD EPYC with AVX512-VNNI, torch 2.13, bf16, 1 thread: the CPU kernel is built for few tokens (LLM
decoding). At diffusion token counts it loses to `dequant`'s one dequantization plus a bf16 GEMM:
4096 x 1280 -> 5120 881 ms against 288 ms, 4096 x 3072 -> 3072 1951 ms against 466 ms; its float32
path is slower still (2.0 s at 4096 x 640 -> 640 against 70 ms). It wins with few tokens
(4 x 3072 -> 3072: 1.0 ms against 40 ms; a Flux double block at 64 + 16 tokens: 0.43 s against
1.5 s), the crossover being a few hundred tokens (dequantizing costs ~4 ns a weight, the op ~0.02
ns a weight and token more than a bf16 GEMM). A layer's token count is not known at load time and diffusion layers run hundreds to
thousands of tokens per call, on the CPU `auto` takes `Int8WeightOnlyByTokensKernel`
(`INT8_WEIGHT_ONLY_BY_TOKENS`): this kernel for calls of at most 128 tokens, else `dequant`'s
computation (the stored codes are unchanged, so it is `dequant` bit for bit); `native` mode takes
this kernel alone. On CUDA `auto` takes this kernel.

Example:
    >>> from diffquant.quant.modules import QuantizedLinear
    >>> from diffquant.quant.spec import TensorSpec
    >>> from diffquant.quant.weights import quantize_weight
    >>> layer = QuantizedLinear(quantize_weight(torch.tensor([[1.0, -2.0]]), TensorSpec("int8", "per_channel")), None, torch.float32)
    >>> layer.set_kernel(INT8_WEIGHT_ONLY)
    >>> layer(torch.tensor([[1.0, 1.0]]))  # (64 - 127) * 2/127
    tensor([[-0.9921]])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from diffquant.quant.kernels.gemm import NativeKernel, as_rows, biased_rows, layer_device, tokens
from diffquant.quant.kernels.reference import DEQUANT

if TYPE_CHECKING:
    from diffquant.quant.modules import QuantizedLayer, QuantizedLinear

COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Int8WeightOnlyKernel(NativeKernel):
    """16/32-bit activations x int8 weights with per-channel scales (module docstring)."""

    name = "torch._weight_int8pack_mm"
    op = "torch._weight_int8pack_mm"  # the torch op, as named in reasons (shared with the by-tokens variant)

    def device_reason(self, layer: "QuantizedLayer", device: torch.device, capability: tuple[int, int] | None) -> str | None:
        if layer.compute_dtype not in COMPUTE_DTYPES:
            return f"{self.op} needs a float32, bfloat16 or float16 compute dtype, not {layer.compute_dtype}"
        return None

    def handles(self, layer: "QuantizedLayer") -> bool:
        """Whether `layer`'s format is one this kernel computes (on some device)."""
        from diffquant.quant.modules import QuantizedLinear

        weight = layer.weight_spec
        return (isinstance(layer, QuantizedLinear) and layer.input_spec is None and weight.dtype == "int8"
                and weight.symmetric and weight.granularity in ("per_tensor", "per_channel"))

    def loses_to_dequant(self, layer: "QuantizedLayer") -> str | None:
        if layer_device(layer).type == "cpu":
            return "measured slower than dequant on the CPU at diffusion token counts (a matrix-vector kernel: 3x at 4096 tokens)"
        return None

    def linear(self, layer: "QuantizedLinear", x: torch.Tensor) -> torch.Tensor:
        rows = as_rows(x)
        scale = layer.weight_scale.reshape(-1).to(rows.dtype).expand(layer.out_features)
        y = torch._weight_int8pack_mm(rows, layer.weight, scale.contiguous())
        return biased_rows(y, layer, x)


INT8_WEIGHT_ONLY = Int8WeightOnlyKernel()


class Int8WeightOnlyByTokensKernel(Int8WeightOnlyKernel):
    """`auto`'s int8 weight-only kernel on the CPU: `torch._weight_int8pack_mm` for inputs of at
    most `max_native_tokens` tokens (1.25x faster than dequant on a Flux double block at 80
    tokens), else `dequant` (module docstring)."""

    name = "torch._weight_int8pack_mm (<= 128 tokens, else dequant)"
    max_native_tokens = 128

    def loses_to_dequant(self, layer: "QuantizedLayer") -> str | None:
        return None

    def linear(self, layer: "QuantizedLinear", x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda or tokens(x) <= self.max_native_tokens:
            return super().linear(layer, x)
        return DEQUANT.linear(layer, x)


INT8_WEIGHT_ONLY_BY_TOKENS = Int8WeightOnlyByTokensKernel()
