"""The `torchao` matmul of w8a8 Linear layers (input spec `matmul: torchao`): the GEMM from the
codes as torchao 0.18 computes it, so that a recipe exported to torchao
(`int8_dynamic`, `fp8_dynamic`) gets its runtime's numbers in diffquant.

int8 (torchao's `Int8Tensor` linear with `act_quant_kwargs`, `int8_tensor.py`; on the CPU
`kernel/intmm.py` `_int_scaled_matmul_cpu`), with t the compute dtype:

    acc = q_x @ q_wᵀ                                   int32, exact
    y   = fl_t(fl32(fl_t(fl32(acc) · s_x) · s_w) + b)  `int_scaled_matmul(q_x, q_wᵀ, s_x).to(t)`,
                                                       then `* w_scales` (t times float32 widens to
                                                       float32), `y += bias`, `.to(t)`

s_x is float32 ([M, 1] per token, [] per tensor), s_w float32 [N] (a per-tensor scale repeated).
In a float32 model the inner rounding is none; in a float16 model fl16(acc · s_x) can overflow to
inf before · s_w, as it does in torchao.

fp8 e4m3 (torchao's `Float8Tensor` per tensor, `addmm_float8_unwrapped_inference`:
`torch._scaled_mm(q_x, q_wᵀ, s_x, s_w, bias, out_dtype=t)`). Where torch 2.13 emulates the op on
the CPU it scales each operand in float32 and runs a float32 GEMM, and this computes the same:

    y = fl_t(fl32(fl32(q_x · s_x) @ fl32(q_w · s_w)ᵀ) + b)

bit for bit with `torch._scaled_mm` and the native fp8 kernel there (measured on an AMD EPYC:
K = 64, 1024, 3072, float32 and bf16 outputs; the same float32 GEMM, so the same sums). It holds
a float32 copy of the weight per call, as the emulation does. Where oneDNN runs fp8 natively on a
CPU, and on CUDA (fp8 tensor cores, `use_fast_accum`), the sums go in another order: agreement is
then within the float32 sums' error, (K + 3) · 2^-24 of Σ|x̂ ŵ| + |b|, before the output
rounding (what the tests check).

Who computes it: the `exact` and `dequant` kernels run `code_linear` for such layers (int8
never dequantizes the weight), and the native int8 kernel (`int8_mm.INT8_MM`) ends in the same
`int8_epilogue` on the same exact accumulator (`torch._int_mm`; on CUDA, where `_int_mm` needs K
and N multiples of 8, a float64 GEMM of the codes, exact below 2^53), so the two agree bit for
bit. Conv2d layers keep the dequantized GEMM (torchao quantizes Linear layers).

Example:
    >>> acc = torch.tensor([[1001]], dtype=torch.int32)
    >>> int8_epilogue(acc, torch.tensor([[0.01]]), torch.tensor([1.0]), None, torch.bfloat16).item()  # bf16(10.01)
    10.0
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from diffquant.quant.formats.fp8 import quantize_fp8
from diffquant.quant.kernels.gemm import CUDA_INT_MM_ALIGN, as_rows, dynamic_int8_scale, from_rows, int8_matmul, quantize_int8

if TYPE_CHECKING:
    from diffquant.quant.modules import QuantizedLayer, QuantizedLinear


def uses_code_matmul(layer: "QuantizedLayer") -> bool:
    """Whether `layer` is a Linear layer (channels last: `channel_dim` -1; Conv2d's is 1) whose input
    spec asks for `matmul: torchao`. Asked in every forward, so it imports nothing."""
    return layer.channel_dim == -1 and layer.input_spec is not None and layer.input_spec.matmul == "torchao"


def int8_epilogue(acc: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                  dtype: torch.dtype) -> torch.Tensor:
    """torchao's int8 epilogue fl_t(fl32(fl_t(fl32(acc) · s_x) · s_w) + b) (module docstring).

    acc int32 [M, N]; input_scale float32 [] or [M, 1]; weight_scale float32 [N] (or []);
    bias [N] in any float dtype, or None; the result [M, N] in `dtype`.
    """
    y = (acc.float() * input_scale).to(dtype).float() * weight_scale
    if bias is not None:
        y += bias.float()
    return y.to(dtype)


def exact_int8_matmul(codes: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """codes int8 [M, K] @ weight_t int8 [K, N] as exact int32 on any device: `torch._int_mm`
    where it runs, else a float64 GEMM of the codes (exact: |acc| <= K · 128² < 2^53)."""
    if codes.is_cuda and (weight_t.shape[0] % CUDA_INT_MM_ALIGN or weight_t.shape[1] % CUDA_INT_MM_ALIGN):
        return (codes.double() @ weight_t.double()).to(torch.int32)
    return int8_matmul(codes, weight_t)


def code_linear(layer: "QuantizedLinear", x: torch.Tensor) -> torch.Tensor:
    """The layer's output for input x [..., K] under the `torchao` matmul (module docstring)."""
    from diffquant.quant.kernels.fp8_scaled_mm import FP8, dynamic_fp8_scale

    rows = as_rows(x)
    spec = layer.input_spec
    if spec.dtype == "int8":
        input_scale = dynamic_int8_scale(rows, spec)
        acc = exact_int8_matmul(quantize_int8(rows, input_scale, spec.rounding == "half_even_reciprocal"), layer.weight.t())
        return from_rows(int8_epilogue(acc, input_scale, layer.weight_scale.float().reshape(-1), layer.bias, layer.compute_dtype), x)
    input_scale = dynamic_fp8_scale(rows, spec)
    y = (quantize_fp8(rows, input_scale, FP8).float() * input_scale) @ (layer.weight.float() * layer.weight_scale.float()).t()
    if layer.bias is not None:
        y += layer.bias.float()
    return from_rows(y.to(layer.compute_dtype), x)
