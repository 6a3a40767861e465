"""Quantized types: what a format stores, as data, built by factories and kept in one registry.

Code looks a type up (`get_qtype("nvfp4")`) and reads its fields; it never compares bare names.
The numerics live in `diffquant.quant.formats`; a QType only says which element grid, code range,
storage dtype, block size and scale dtype a format uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffquant.quant.formats.e2m1 import E2M1_MAX, E2M1_VALUES
from diffquant.quant.formats.fp8 import FP8_E4M3_MAX, FP8_E5M2_MAX
from diffquant.quant.formats.mxfp4 import MXFP4_BLOCK_SIZE
from diffquant.quant.formats.nvfp4 import NVFP4_BLOCK_SIZE


@dataclass(frozen=True)
class QType:
    """A quantized number type.

    Attributes:
        name: registry key, e.g. "int4", "nvfp4".
        bits: bits per element code (4 or 8), not counting scales.
        is_floating_point: elements are floats (FP8, E2M1) rather than integers.
        signed: the element range holds negative values.
        storage_dtype: torch dtype of the stored codes (uint8 for packed 4-bit codes).
        qmin, qmax: code range for integer types (ints); -max / +max of the element format for
            floating types (448.0, 57344.0, 6.0).
        block_size: elements per scale fixed by the format (MXFP4 32, NVFP4 16); None when the
            recipe chooses the granularity (per-tensor / per-channel / per-group).
        scale_dtype: dtype of the stored (first-level) scale: float32, uint8 E8M0 bytes for MXFP4,
            float8_e4m3fn for NVFP4.
        packed: two codes per byte along the last dim (low nibble = even index).
        element: element encoding, the key of its magnitude grid: "int", "e4m3", "e5m2", "e2m1".
        has_global_scale: a second, per-tensor float32 scale multiplies the block scales (NVFP4).
        description: one line for summaries and `--help`.
    """

    name: str
    bits: int
    is_floating_point: bool
    signed: bool
    storage_dtype: torch.dtype
    qmin: int | float
    qmax: int | float
    block_size: int | None
    scale_dtype: torch.dtype
    packed: bool
    element: str
    has_global_scale: bool = False
    description: str = ""


def _int_qtype(bits: int, signed: bool) -> QType:
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    name = f"{'' if signed else 'u'}int{bits}"
    packed = bits == 4
    storage = torch.uint8 if packed or not signed else torch.int8
    layout = ", two codes per byte" if packed else ""
    return QType(
        name=name, bits=bits, is_floating_point=False, signed=signed, storage_dtype=storage,
        qmin=qmin, qmax=qmax, block_size=None, scale_dtype=torch.float32, packed=packed,
        element="int",
        description=f"{name} affine codes [{qmin}, {qmax}]{layout}, float32 scale",
    )  # fmt: skip


def _fp8_qtype(name: str, dtype: torch.dtype, fp8_max: float, element: str) -> QType:
    return QType(
        name=name, bits=8, is_floating_point=True, signed=True, storage_dtype=dtype,
        qmin=-fp8_max, qmax=fp8_max, block_size=None, scale_dtype=torch.float32, packed=False,
        element=element, description=f"FP8 {element.upper()} (max {fp8_max:g}), float32 scale",
    )  # fmt: skip


def _fp4_qtype(
    name: str, block_size: int, scale_dtype: torch.dtype, global_scale: bool, description: str
) -> QType:
    return QType(
        name=name, bits=4, is_floating_point=True, signed=True, storage_dtype=torch.uint8,
        qmin=-E2M1_MAX, qmax=E2M1_MAX, block_size=block_size, scale_dtype=scale_dtype,
        packed=True, element="e2m1", has_global_scale=global_scale, description=description,
    )  # fmt: skip


QTYPES: dict[str, QType] = {
    qt.name: qt
    for qt in (
        _int_qtype(8, signed=True),
        _int_qtype(8, signed=False),
        _int_qtype(4, signed=True),
        _int_qtype(4, signed=False),
        _fp8_qtype("fp8_e4m3", torch.float8_e4m3fn, FP8_E4M3_MAX, "e4m3"),
        _fp8_qtype("fp8_e5m2", torch.float8_e5m2, FP8_E5M2_MAX, "e5m2"),
        _fp4_qtype(
            "mxfp4", MXFP4_BLOCK_SIZE, torch.uint8, False,
            "OCP MXFP4: E2M1 codes, one E8M0 scale (uint8 byte) per 32",
        ),
        _fp4_qtype(
            "nvfp4", NVFP4_BLOCK_SIZE, torch.float8_e4m3fn, True,
            "NVFP4: E2M1 codes, one E4M3 scale per 16, float32 per-tensor scale",
        ),
    )
}  # fmt: skip


def get_qtype(name: str) -> QType:
    """The registered QType called `name`; ValueError listing the allowed names otherwise.

    Example:
        >>> get_qtype("int4").qmax
        7
    """
    if name not in QTYPES:
        raise ValueError(f"unknown qtype {name!r}; allowed: {', '.join(QTYPES)}")
    return QTYPES[name]


def magnitude_grid(qtype: QType) -> torch.Tensor:
    """Sorted float32 tensor of the element format's non-negative representable magnitudes.

    Scales are not applied. int types: 0..qmax (int8 0..127, the symmetric range; uint8 0..255;
    int4 0..7; uint4 0..15). fp8: every non-negative finite value (E4M3 127 values up to 448,
    E5M2 124 values up to 57344). e2m1 (MXFP4, NVFP4): {0, 0.5, 1, 1.5, 2, 3, 4, 6}.

    Example:
        >>> magnitude_grid(get_qtype("nvfp4"))
        tensor([0.0000, 0.5000, 1.0000, 1.5000, 2.0000, 3.0000, 4.0000, 6.0000])
    """
    if qtype.element not in _GRIDS:
        raise ValueError(
            f"qtype {qtype.name!r} has element {qtype.element!r}; known: {', '.join(_GRIDS)}"
        )
    return _GRIDS[qtype.element](qtype)


def _int_grid(qtype: QType) -> torch.Tensor:
    return torch.arange(0, int(qtype.qmax) + 1, dtype=torch.float32)


def _fp8_grid(qtype: QType) -> torch.Tensor:
    # Bytes 0x00..0x7F are the sign-0 half of the encoding, in increasing magnitude order.
    values = torch.arange(0, 0x80, dtype=torch.uint8).view(qtype.storage_dtype).float()
    return values[torch.isfinite(values)]


def _e2m1_grid(qtype: QType) -> torch.Tensor:
    return torch.tensor(E2M1_VALUES[:8], dtype=torch.float32)


_GRIDS: dict[str, Callable[[QType], torch.Tensor]] = {
    "int": _int_grid,
    "e4m3": _fp8_grid,
    "e5m2": _fp8_grid,
    "e2m1": _e2m1_grid,
}
