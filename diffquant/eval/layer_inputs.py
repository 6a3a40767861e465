"""Captured per-layer inputs kept in an unlinked temporary file instead of process memory.

The quality report compares each quantized layer with the float layer it replaces on that layer's
own held-out inputs, captured in one reference pass before any layer is quantized. Held in memory
they cost rows x K x dtype bytes per layer and sample: about 0.18 of an SD 1.5 UNet's float32
weights at 2 samples and 256 rows, and that memory would sit beside the whole float model at the
start of quantization, when memory peaks. `SpilledLayerInputs` appends each captured tensor's
bytes to a temporary file (`tempfile.TemporaryFile`: in `TMPDIR`, removed when closed or when the
process ends) and reads a layer's tensors back, bit for bit, only when that layer is measured, so
the process holds one layer's inputs at a time. The file's pages are the kernel's page cache, which
it writes out or drops under pressure; on a `tmpfs` TMPDIR they stay in memory, so point TMPDIR
at a disk for real models.

Example:
    >>> import torch
    >>> with SpilledLayerInputs() as spilled:
    ...     spilled.append("proj", torch.arange(6, dtype=torch.bfloat16).reshape(2, 3))
    ...     spilled.append("proj", torch.ones(1, 3))
    ...     [t.tolist() for t in spilled.pop("proj")]
    [[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], [[1.0, 1.0, 1.0]]]
    >>> spilled.bytes_written
    24
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class _Extent:
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()


class SpilledLayerInputs:
    """Named lists of CPU tensors, stored in one temporary file; `pop` reads a name's list back."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="diffquant-layer-inputs-")
        self._extents: dict[str, list[_Extent]] = {}
        self.bytes_written = 0

    def append(self, name: str, tensor: torch.Tensor) -> None:
        """Write `tensor`'s bytes at the end of the file and remember where, under `name`."""
        data = tensor.detach().to("cpu").contiguous()
        self._extents.setdefault(name, []).append(_Extent(self.bytes_written, data.dtype, tuple(data.shape)))
        if data.numel():
            self._file.seek(self.bytes_written)
            self._file.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self.bytes_written += data.numel() * data.element_size()

    def pop(self, name: str) -> list[torch.Tensor]:
        """The tensors appended under `name`, in order (an empty list for a name never seen)."""
        tensors = []
        for extent in self._extents.pop(name, []):
            buffer = torch.empty(extent.nbytes, dtype=torch.uint8)
            if extent.nbytes:
                self._file.seek(extent.offset)
                read = self._file.readinto(memoryview(buffer.numpy()))
                if read != extent.nbytes:
                    raise OSError(f"the layer-input spill file ended after {read} of {extent.nbytes} bytes of {name}")
            tensors.append(buffer.view(extent.dtype).reshape(extent.shape))
        return tensors

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SpilledLayerInputs:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
