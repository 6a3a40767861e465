"""int4 / uint4 group-wise weight-only Linear layers through torch's int4 kernels.

CPU: `torch._weight_int4pack_mm_for_cpu`; CUDA: `torch._weight_int4pack_mm` (tinygemm). Layers:
weight int4 or uint4, per_group with g in 32 / 64 / 128, symmetric or with a zero point; no input
quantizer. SVDQuant w4a16 layers too: the module smooths x and adds the low-rank branch, the
residual runs here.

Both kernels compute, per weight, w = (q - 8) · scale + zero from kernel codes q in 0..15 and a
[K/g, N, 2] table of (scale, zero) in x's dtype. With the checkpoint's code c, zero point zp
(0 when symmetric) and scale s: q = c + 8 for int4 (the nibble XOR 8), q = c for uint4, so

    w = (c - zp) · s = (q - 8) · s + (8 - shift - zp) · s,    shift = 8 (int4) or 0 (uint4)

The table is built per call from the stored float32 `weight_scale` [N, K/g] (and
`weight_zero_point`): zero = (8 - shift - zp) · s in float32, both cast to the compute dtype
(one layer's temporary, N · K/g · 2 values). The packing the kernels read is made once in
`attach` and replaces the `weight_packed` buffer (the same bytes: resident memory stays the
checkpoint's); `stored_tensors()` and `detach()` give the checkpoint's bytes back through the
inverse permutation (`int4_layout`), bit for bit, checked in `attach` on the real weight.

Error bound against `exact` (same layer, same input). With S = |x| · |ŵ|ᵀ + |b|, u the compute
dtype's unit roundoff, u₃₂ = 2⁻²⁴, and Z = |x| · s̄ᵀ (s̄ [N, K] the group scales, expanded):

    symmetric:  |y_native - y_exact| <= (6 u + 2 (K + 4) u₃₂) · S
    zero point: |y_native - y_exact| <= (6 u + 2 (K + 4) u₃₂) · S + 80 u · Z

Symmetric (zero = 0): this kernel rounds s to the compute dtype (u), forms (q - 8) · s (u),
accumulates (K u₃₂), rounds the output and then the biased output (2u); `exact` rounds ŵ (u + u₃₂),
accumulates (K u₃₂) and rounds the output (u). With a zero point the two terms (q - 8) · s and
zero are each up to 8 s and 16 s while their sum ŵ may be near 0, so their roundings (z in
float32, s̃ and z̃ to the compute dtype, the product and the sum) are bounded by the scale, not by
|ŵ|: <= u (3 · 8 s + 4 · 16 s) + u₃₂ · 16 s <= 80 u s per weight.
Measured max |Δ| / S on this machine (K = 256): 2.5e-7 in float32, 2.3e-3 in bfloat16 (at most
a tenth of the bound).

Dispatch (`unsupported`): K a multiple of g and g in 32 / 64 / 128. CPU: N a multiple of 16
(the packer checks it), compute dtype float32, bfloat16 or float16 (the table must be in x's
dtype). CUDA: bfloat16 compute dtype, N a multiple of 8, K a multiple of 32 (inner_k_tiles 8,
4 or 2).

`auto` rule (`loses_to_dequant`), measured by benchmarks/bench_inference.py (RESULTS.md) on an
AMD EPYC with AVX512-VNNI, torch 2.13, bf16, 1 thread: the CPU kernel is built for few tokens (LLM
decoding). At diffusion token counts it loses to `dequant` (one dequantization plus a bf16 GEMM):
4096 x 1280 -> 5120 921 ms against 310 ms, 4096 x 3072 -> 3072 2423 ms against 1050 ms; its
float32 path is not vectorized (3.1 s at 4096 x 640 -> 640 against 70 ms). It wins with few tokens
(4 x 3072 -> 3072: 0.9 ms against 40 ms; 256 x 640 -> 640: 4.9 ms against 8.1 ms), so the crossover
is a few hundred tokens. A layer's token count is unknown at load time and diffusion layers run
thousands, so on the CPU `auto` takes `Int4WeightOnlyByTokensKernel` (`INT4_BY_TOKENS`): this
kernel for calls of at most 256 tokens, else the weight dequantized from the packed layout per call
and a bf16 GEMM (`dequant`'s numbers, bit for bit); `native` mode takes this kernel alone. On CUDA
`auto` takes this kernel.

Example:
    >>> from diffquant.quant.modules import QuantizedLinear
    >>> from diffquant.quant.spec import TensorSpec
    >>> from diffquant.quant.weights import quantize_weight
    >>> w = torch.linspace(-1, 1, 16 * 32).reshape(16, 32)
    >>> layer = QuantizedLinear(quantize_weight(w, TensorSpec("int4", "per_group", group_size=32)), None, torch.float32)
    >>> expected = layer(torch.ones(1, 32))  # exact
    >>> layer.set_kernel(INT4_WEIGHT_ONLY)
    >>> bool(torch.allclose(layer(torch.ones(1, 32)), expected, atol=1e-6)), layer.weight_packed.shape
    (True, torch.Size([16, 16]))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

import torch.nn.functional as F

from diffquant.quant.formats.affine import dequantize_affine
from diffquant.quant.kernels.gemm import NativeKernel, as_rows, biased_rows, layer_device, tokens
from diffquant.quant.kernels.int4_layout import (
    SIGNED_OFFSET, checkpoint_bytes, checkpoint_nibbles, cpu_blocks, cpu_pack, cuda_inner_k_tiles, cuda_pack,
    from_cpu_layout, from_cuda_layout, kernel_codes,
)  # fmt: skip
from diffquant.quant.weights import Stored
from diffquant.quant.weights.base import blocked, scale_view, unblocked

if TYPE_CHECKING:
    from diffquant.quant.modules import QuantizedLayer, QuantizedLinear

GROUP_SIZES = (32, 64, 128)
CPU_ROW_MULTIPLE = 16  # "_convert_weight_to_int4pack_cpu : expect N to be dividable by 16"
CUDA_ROW_MULTIPLE = 8
CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUT_ATTRIBUTE = "_int4_layout"  # (device type, inner_k_tiles, CPU row blocks) of the packed weight while attached


class Int4WeightOnlyKernel(NativeKernel):
    """int4 / uint4 group-wise weights x 16/32-bit activations (module docstring)."""

    name = "torch._weight_int4pack_mm"
    op = "torch._weight_int4pack_mm"  # the torch op, as named in reasons (shared with the by-tokens variant)

    def device_reason(self, layer: "QuantizedLayer", device: torch.device, capability: tuple[int, int] | None) -> str | None:
        out_features, in_features = layer.weight_shape
        if device.type == "cpu":
            if out_features % CPU_ROW_MULTIPLE:
                return f"{self.op} on the CPU needs out features that are a multiple of {CPU_ROW_MULTIPLE}, not {out_features}"
            if layer.compute_dtype not in CPU_DTYPES:
                return f"{self.op} on the CPU needs a float32, bfloat16 or float16 compute dtype, not {layer.compute_dtype}"
            try:
                cpu_blocks(out_features)
            except RuntimeError as error:
                return str(error)
            return None
        if device.type == "cuda":
            if layer.compute_dtype != torch.bfloat16:
                return f"{self.op} on CUDA needs a bfloat16 compute dtype, not {layer.compute_dtype}"
            if out_features % CUDA_ROW_MULTIPLE or cuda_inner_k_tiles(in_features) is None:
                return (f"{self.op} on CUDA needs out features a multiple of {CUDA_ROW_MULTIPLE} and in features a multiple "
                        f"of 32, not {in_features} -> {out_features}")
        return None

    def handles(self, layer: "QuantizedLayer") -> bool:
        """Whether `layer`'s format is one this kernel computes (on some device)."""
        from diffquant.quant.modules import QuantizedLinear

        weight = layer.weight_spec
        return (isinstance(layer, QuantizedLinear) and layer.input_spec is None and weight.dtype in ("int4", "uint4")
                and weight.granularity == "per_group" and weight.group_size in GROUP_SIZES)

    def loses_to_dequant(self, layer: "QuantizedLayer") -> str | None:
        if layer_device(layer).type == "cpu":
            return "measured slower than dequant on the CPU at diffusion token counts (a few-token kernel: 3x at 4096 tokens)"
        return None

    # Layout: the kernel's packing replaces the checkpoint's bytes while attached.
    def attach(self, layer: "QuantizedLayer") -> None:
        stored = layer.weight_packed
        n, k = layer.weight_shape
        codes = kernel_codes(checkpoint_nibbles(stored), self._signed(layer))
        if stored.device.type == "cuda":
            tiles = cuda_inner_k_tiles(k)
            packed = cuda_pack(codes, tiles)
        else:
            tiles = 0
            packed = cpu_pack(codes)
            if not torch.equal(from_cpu_layout(packed, n, k), codes):
                raise RuntimeError(f"torch's CPU int4 layout for {n} x {k} does not invert as derived; cannot keep the checkpoint's bytes")
        layer._buffers["weight_packed"] = packed
        setattr(layer, LAYOUT_ATTRIBUTE, (stored.device.type, tiles, cpu_blocks(n) if not tiles else None))

    def detach(self, layer: "QuantizedLayer") -> None:
        if getattr(layer, LAYOUT_ATTRIBUTE, None) is None:
            return
        layer._buffers["weight_packed"] = self._checkpoint_packed(layer)
        setattr(layer, LAYOUT_ATTRIBUTE, None)

    def stored_tensors(self, layer: "QuantizedLayer") -> Stored:
        stored = super().stored_tensors(layer)
        stored["weight_packed"] = self._checkpoint_packed(layer)
        return stored

    def _checkpoint_packed(self, layer: "QuantizedLayer") -> torch.Tensor:
        n, k = layer.weight_shape
        device_type, tiles, _ = getattr(layer, LAYOUT_ATTRIBUTE)
        packed = layer.weight_packed
        codes = from_cuda_layout(packed, n, k, tiles) if device_type == "cuda" else from_cpu_layout(packed, n, k)
        return checkpoint_bytes(codes, self._signed(layer))

    @staticmethod
    def _signed(layer: "QuantizedLayer") -> bool:
        return layer.weight_spec.dtype == "int4"

    # Forward.
    def scales_and_zeros(self, layer: "QuantizedLayer", dtype: torch.dtype) -> torch.Tensor:
        """The kernel's [K/g, N, 2] (scale, zero) table in `dtype` (module docstring)."""
        scale = layer.weight_scale.float()
        zero_point = getattr(layer, "weight_zero_point", None)
        if zero_point is None:
            zero = torch.zeros_like(scale)
        else:
            shift = SIGNED_OFFSET if self._signed(layer) else 0
            zero = (SIGNED_OFFSET - shift - zero_point.float()) * scale
        return torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()

    def linear(self, layer: "QuantizedLinear", x: torch.Tensor) -> torch.Tensor:
        rows = as_rows(x)
        table = self.scales_and_zeros(layer, rows.dtype)
        group = layer.weight_spec.group_size
        if rows.is_cuda:
            y = torch._weight_int4pack_mm(rows, layer.weight_packed, group, table)
        else:
            y = torch._weight_int4pack_mm_for_cpu(rows, layer.weight_packed, group, table)
        return biased_rows(y, layer, x)


INT4_WEIGHT_ONLY = Int4WeightOnlyKernel()


class Int4WeightOnlyByTokensKernel(Int4WeightOnlyKernel):
    """`auto`'s int4 kernel on the CPU: the int4 kernel for inputs of at most `max_native_tokens`
    tokens, where it beats dequantizing (module docstring: 10x on a Flux double block at 80
    tokens), else the weight dequantized from the packed layout into a temporary and a float GEMM
    (bit for bit `dequant`'s weight and GEMM, so `exact`'s output). Same packed layout and bytes."""

    name = "torch._weight_int4pack_mm (<= 256 tokens, else dequant)"
    max_native_tokens = 256

    def loses_to_dequant(self, layer: "QuantizedLayer") -> str | None:
        return None

    def linear(self, layer: "QuantizedLinear", x: torch.Tensor) -> torch.Tensor:
        if layer.weight_packed.is_cuda or tokens(x) <= self.max_native_tokens:
            return super().linear(layer, x)
        return F.linear(x, self.dequantized_weight(layer, x.dtype), layer.bias)

    def dequantized_weight(self, layer: "QuantizedLayer", dtype: torch.dtype) -> torch.Tensor:
        """(c - zp) · s in float32 from the packed layout, cast to `dtype` once: `QuantizedWeight.dequantize`'s numbers."""
        n, k = layer.weight_shape
        spec = layer.weight_spec
        codes = from_cpu_layout(layer.weight_packed, n, k, getattr(layer, LAYOUT_ATTRIBUTE)[2]).to(torch.int32)
        if self._signed(layer):
            codes = codes - SIGNED_OFFSET
        zero_point = getattr(layer, "weight_zero_point", None)
        zp = scale_view(zero_point, spec) if zero_point is not None else None
        return unblocked(dequantize_affine(blocked(codes, spec), scale_view(layer.weight_scale, spec), zp), spec).to(dtype)


INT4_BY_TOKENS = Int4WeightOnlyByTokensKernel()
