"""Pieces the native kernels share: inputs as GEMM rows, int8 codes, the int32 epilogue, devices.

A Linear input x [..., K] is run as rows [M, K] (`as_rows`) and the result [M, N] reshaped back
(`from_rows`). `quantize_int8` gives the codes fake-quant gives (`formats.affine.quantize_affine`,
bit for bit); `dynamic_int8_scale` the scale fake-quant's dynamic symmetric rule gives (per
tensor or per token, `choose_qparams_affine` with qmax 127 or half_span 127.5, the spec's
`scale_dtype` rounding), without its host-side finiteness check, so that it traces without a
graph break. `int8_matmul` is `torch._int_mm` (exact int32 accumulation; on
CUDA inputs of 16 rows or fewer are padded with zero rows, which the kernel requires), and
`scale_accumulator_` the float32 epilogue acc · scale + bias, written over the accumulator.

Example:
    >>> codes = quantize_int8(torch.tensor([[0.5, 1.5, -300.0]]), torch.tensor(1.0))
    >>> codes.tolist()  # half to even, saturated
    [[0, 2, -128]]
    >>> acc = int8_matmul(codes, torch.tensor([[2], [1], [1]], dtype=torch.int8))
    >>> acc.tolist(), scale_accumulator_(acc, torch.tensor([0.5]), torch.tensor([1.0])).tolist()
    ([[-126]], [[-62.0]])
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from diffquant.quant.kernels.base import Kernel
from diffquant.quant.spec import TensorSpec
from diffquant.quant.weights.base import dynamic_scale_in_dtype

INT8_QMIN, INT8_QMAX = -128, 127
F32_TINY = torch.finfo(torch.float32).tiny  # 2^-126: fake-quant's smallest scale
# torch._int_mm on CUDA checks "self.size(0) needs to be greater than 16" and K, N "a multiple of 8".
CUDA_INT_MM_MIN_ROWS = 17
CUDA_INT_MM_ALIGN = 8
# Unit roundoff of each compute dtype (half the distance from 1 to the next value).
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as a row-contiguous [M, K] (a view where possible)."""
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return rows if rows.is_contiguous() else rows.contiguous()


def from_rows(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y [M, N] shaped back to x's leading dims [..., N]."""
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def quantize_int8(x: torch.Tensor, scale: torch.Tensor, reciprocal: bool = False) -> torch.Tensor:
    """int8 codes clamp(round_half_even(x / scale), -128, 127), equal to `quantize_affine`'s:
    divided in float32 (or, `reciprocal`, x · fl(1 / scale)), NaN -> 0, +-inf saturate. x [M, K]
    any float dtype, scale float32 [] or [M, 1]."""
    if x.dtype != torch.float32:
        x = x.float()
    y = torch.mul(x, 1.0 / scale) if reciprocal else torch.div(x, scale)
    return y.round_().nan_to_num_(nan=0.0).clamp_(INT8_QMIN, INT8_QMAX).to(torch.int8)


def dynamic_int8_scale(x: torch.Tensor, spec: TensorSpec | None = None) -> torch.Tensor:
    """Fake-quant's dynamic symmetric int8 scale of x [M, K] under `spec` (default: per tensor,
    qmax rule): max(|min|, |max|) / 127 (or / 127.5, `scale_rule: half_span`) in float32, 1.0 for
    an all-zero range, raised to 2^-126 when smaller, then rounded to the nearest value of the
    spec's `scale_dtype`. float32 [] per tensor, [M, 1] per token."""
    if spec is not None and spec.granularity == "per_token":
        low, high = torch.aminmax(x.float(), dim=-1, keepdim=True)
    else:
        low, high = torch.aminmax(x.float())
    span = torch.maximum(low.abs(), high.abs())
    divisor = (INT8_QMAX - INT8_QMIN) / 2 if spec is not None and spec.scale_rule == "half_span" else INT8_QMAX
    scale = torch.clamp(span / divisor, min=F32_TINY)
    scale = torch.where(span == 0, torch.ones_like(scale), scale)
    return scale if spec is None else dynamic_scale_in_dtype(scale, spec)


def int8_matmul(codes: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """int32 [M, N] = codes int8 [M, K] @ weight_t int8 [K, N], exact (no overflow below
    K = 2^31 / 128^2 = 131072). On CUDA, M <= 16 rows are padded with zero rows."""
    rows = codes.shape[0]
    if codes.is_cuda and rows < CUDA_INT_MM_MIN_ROWS:
        return torch._int_mm(pad_rows(codes, CUDA_INT_MM_MIN_ROWS), weight_t)[:rows]
    return torch._int_mm(codes, weight_t)


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [M, K] with zero rows appended up to `rows` (unchanged when it has as many)."""
    missing = rows - x.shape[0]
    return x if missing <= 0 else torch.cat([x, x.new_zeros(missing, x.shape[1])])


def scale_accumulator_(acc: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """float32 acc · scale + bias, written over acc's own memory (acc int32 [M, N] contiguous).

    scale float32 [] or [N], bias float32 [N] or None: two float32 roundings per element. Each
    int32 slot becomes the float32 of the same 4 bytes, so no second [M, N] buffer is allocated
    (for large M a fresh allocation's page faults cost more than the cast itself). row_scale
    float32 [M, 1] (per-token input scales), when given, multiplies first: (acc · row) · scale + b,
    three roundings.
    """
    out = acc.view(torch.float32)
    out.copy_(acc)
    if row_scale is not None:
        out.mul_(row_scale)
    if bias is None:
        return out.mul_(scale)
    return torch.addcmul(bias, out, scale, out=out)


def float_bias(layer: torch.nn.Module) -> torch.Tensor | None:
    """The layer's bias in float32 (N values, converted per call), or None."""
    bias = layer.bias
    return None if bias is None else (bias if bias.dtype == torch.float32 else bias.float())


def biased_rows(y: torch.Tensor, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A 16/32-bit kernel's output rows y [M, N] plus the layer's bias (added in float32, back in
    y's dtype), shaped like the input x [..., K] -> [..., N]."""
    bias = float_bias(layer)
    if bias is not None:
        y = (y.float() + bias).to(y.dtype)
    return from_rows(y, x)


def layer_device(layer: torch.nn.Module) -> torch.device:
    return getattr(layer, layer.stored_names[0]).device


def cpu_has_int8_dot() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX512-VNNI or AVX-VNNI on x86, the
    dot-product extension on ARM), which make int8 GEMMs faster than float ones. Read from
    /proc/cpuinfo's flags; False where they cannot be read."""
    return bool(_cpu_flags() & {"avx512_vnni", "avx_vnni", "asimddp"})


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """A CUDA device's compute capability, None for other devices."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def tokens(x: torch.Tensor) -> int:
    """M: the rows x [..., K] runs as."""
    return x.numel() // max(x.shape[-1], 1)


def no_kernel_reason(layer: torch.nn.Module, device: torch.device) -> str:
    """Why a layer has no native kernel at all, e.g. `no native kernel for nvfp4 weights with
    dynamic nvfp4 inputs on cpu` (kernels_for keeps one such line per layer)."""
    from diffquant.quant.modules import QuantizedLinear

    if not isinstance(layer, QuantizedLinear):
        return f"no native Conv2d kernel on {device.type} (no im2col path: it runs dequantized)"
    weight, act = layer.weight_spec, layer.input_spec
    inputs = "16-bit inputs" if act is None else f"{'dynamic' if act.dynamic else 'static'} {act.dtype} {_granularity(act)} inputs"
    return f"no native kernel for {weight.dtype} {_granularity(weight)} weights with {inputs} on {device.type}"


def _granularity(spec: object) -> str:
    granularity = getattr(spec, "granularity")
    return {"per_tensor": "per-tensor", "per_channel": "per-channel", "per_token": "per-token"}.get(granularity, f"group-{getattr(spec, 'group_size')}")


class NativeKernel(Kernel):
    """A low-precision torch kernel. `handles(layer)` says which formats it computes (on some
    device), `device_reason(layer, device, capability)` what else the layer's device needs; both
    make up `unsupported`, whose reasons name the torch op (`op`, the kernel's name by default)."""

    path = "native"

    @property
    def op(self) -> str:
        return self.name

    def unsupported(self, layer: torch.nn.Module) -> str | None:
        device = layer_device(layer)
        return self.reason_on(layer, device, cuda_capability(device))

    def reason_on(self, layer: torch.nn.Module, device: torch.device, capability: tuple[int, int] | None) -> str | None:
        """Why this kernel cannot run `layer` on `device` (of compute `capability` when CUDA), or None."""
        if not self.handles(layer):
            return no_kernel_reason(layer, device)
        if device.type not in ("cpu", "cuda"):
            return f"{self.op} runs on cpu and cuda, not {device.type}"
        return self.device_reason(layer, device, capability)

    def handles(self, layer: torch.nn.Module) -> bool:
        """Whether `layer`'s format is one this kernel computes (on some device)."""
        raise NotImplementedError

    def device_reason(self, layer: torch.nn.Module, device: torch.device, capability: tuple[int, int] | None) -> str | None:
        """What the cpu or cuda `device` lacks for `layer`, or None."""
        return None
