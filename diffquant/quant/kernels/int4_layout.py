"""The packed int4 layouts torch's int4 kernels read, and the way back to the checkpoint's.

Checkpoint layout (storage-and-formats.md §4.3): `weight_packed` uint8 [N, K/2], byte =
nibble[2k] | nibble[2k+1] << 4, signed codes as two's-complement nibbles. torch's int4 kernels
read kernel codes q = c + 8 in 0..15 for a signed code c (the nibble XOR 8) and q = c for an
unsigned one, in a layout of their own, a permutation of the same N·K nibbles (same bytes):

- CPU (`torch._convert_weight_to_int4pack_for_cpu(q int32 [N, K], 1)` -> uint8 [N, K/2]): the
  rows are cut into blocks of B rows (B = 64 on AVX512 builds, other sizes on other builds and for
  the tail rows); a block is stored k-major, [K][B] nibbles, its B lanes in an order of the
  build's own (AVX512: byte j = rows j and j + 32). `cpu_blocks(N)` derives the blocks and lane
  orders on the running machine by packing the row indices of an [N, 2] probe, bit plane by bit
  plane (4 bits per pack), and caches them per N (a few hundred bytes); `to_cpu_layout` /
  `from_cpu_layout` apply them to any K. `Int4WeightOnlyKernel.attach` checks the round trip on
  the real weight, so a build whose layout does not fit this model is refused, never misread.
- CUDA (`torch._convert_weight_to_int4pack(uint8 [N, K/2], inner_k_tiles)` -> int32 tiles): a
  tiling in both N and K; `nibble_sources` derives the full permutation on the device by packing
  the bit planes of the nibble indices (transient memory, recomputed when the checkpoint layout is
  asked for: only `state_dict()`, `detach` and device moves ask).

Example:
    >>> q = torch.arange(16 * 4, dtype=torch.int32).reshape(16, 4) % 16  # kernel codes [N = 16, K = 4]
    >>> bool(torch.equal(to_cpu_layout(q), cpu_pack(q))), bool(torch.equal(from_cpu_layout(cpu_pack(q), 16, 4), q.to(torch.uint8)))
    (True, True)
    >>> kernel_codes(checkpoint_nibbles(torch.tensor([[0x8F]], dtype=torch.uint8)), signed=True).tolist()  # c = -1, -8
    [[7, 0]]
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from diffquant.quant.formats.pack import pack_nibbles, unpack_nibbles

SIGNED_OFFSET = 8  # kernel code q = c + 8 for signed int4: the two's-complement nibble XOR 8


def checkpoint_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The checkpoint's nibbles uint8 [N, K] from its bytes uint8 [N, K/2]."""
    return unpack_nibbles(packed)


def kernel_codes(nibbles: torch.Tensor, signed: bool) -> torch.Tensor:
    """Kernel codes q in 0..15 (uint8) from checkpoint nibbles (signed: q = c + 8 = nibble ^ 8)."""
    return nibbles ^ SIGNED_OFFSET if signed else nibbles


def checkpoint_bytes(codes: torch.Tensor, signed: bool) -> torch.Tensor:
    """The inverse of `kernel_codes` then `checkpoint_nibbles`: uint8 [N, K/2] from q [N, K]."""
    return pack_nibbles(kernel_codes(codes.to(torch.uint8), signed))


@dataclass(frozen=True)
class Block:
    """B rows of the CPU layout: they start at nibble K · `start` and are stored [K][B], lane
    j holding row `rows[j]`."""

    start: int
    rows: tuple[int, ...]


def nibble_sources(pack: Callable[[torch.Tensor], torch.Tensor], n: int, k: int, device: torch.device) -> torch.Tensor:
    """For each nibble of `pack`'s output (bytes in memory order, low nibble first), the flat index
    n_row · K + k_col of the input code it holds (int64 [N · K]).

    pack: int32 kernel codes [N, K] in 0..15 -> packed tensor (any dtype: read as bytes). Derived
    by packing the 4-bit planes of the indices, so it holds for any nibble permutation.
    """
    index = torch.arange(n * k, device=device, dtype=torch.int64).reshape(n, k)
    sources = torch.zeros(n * k, device=device, dtype=torch.int64)
    for shift in range(0, max((n * k - 1).bit_length(), 1), 4):
        packed = pack(((index >> shift) & 15).to(torch.int32)).contiguous().view(torch.uint8).reshape(-1)
        sources |= torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1).to(torch.int64) << shift
    return sources


def cpu_pack(codes: torch.Tensor) -> torch.Tensor:
    """torch's CPU int4 packing of kernel codes [N, K] (any integer dtype, 0..15)."""
    return torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


@functools.lru_cache(maxsize=None)
def cpu_blocks(n: int) -> tuple[Block, ...]:
    """The row blocks of the CPU layout for N rows, derived on this machine (module docstring).

    Raises RuntimeError when the layout is not k-major blocks of rows (a torch build this model
    does not describe).
    """
    sources = nibble_sources(cpu_pack, n, 2, torch.device("cpu"))
    rows, cols = (sources // 2).tolist(), (sources % 2).tolist()
    blocks, position = [], 0
    while position < 2 * n:
        width = cols.index(1, position) - position if 1 in cols[position:] else 0
        lanes = rows[position:position + width]
        if width == 0 or rows[position + width:position + 2 * width] != lanes or any(cols[position:position + width]) \
                or not all(cols[position + width:position + 2 * width]):
            raise RuntimeError(f"torch's CPU int4 layout for {n} rows is not k-major blocks of rows; cannot map it back to the checkpoint")
        blocks.append(Block(position // 2, tuple(lanes)))
        position += 2 * width
    return tuple(blocks)


def to_cpu_layout(codes: torch.Tensor) -> torch.Tensor:
    """Kernel codes [N, K] -> the CPU kernel's packed uint8 [N, K/2] (what `cpu_pack` returns)."""
    n, k = codes.shape
    codes = codes.to(torch.uint8)
    parts = [codes[list(block.rows)].t().reshape(-1) for block in cpu_blocks(n)]
    nibbles = torch.cat(parts)
    return (nibbles[0::2] | (nibbles[1::2] << 4)).reshape(n, k // 2)


def from_cpu_layout(packed: torch.Tensor, n: int, k: int, blocks: tuple[Block, ...] | None = None) -> torch.Tensor:
    """The CPU kernel's packed [N, K/2] -> kernel codes uint8 [N, K] (`blocks`: `cpu_blocks(N)`,
    passed in by a traced forward so that it does not call the cached derivation)."""
    flat = packed.reshape(-1)
    nibbles = torch.stack([flat & 15, flat >> 4], dim=-1).reshape(-1)
    codes = torch.empty(n, k, dtype=torch.uint8, device=packed.device)
    for block in blocks if blocks is not None else cpu_blocks(n):
        width = len(block.rows)
        codes[list(block.rows)] = nibbles[k * block.start:k * (block.start + width)].reshape(k, width).t()
    return codes


def cuda_inner_k_tiles(k: int) -> int | None:
    """The largest inner_k_tiles (8, 4, 2) whose K tile (16 · tiles) divides K, or None."""
    return next((tiles for tiles in (8, 4, 2) if k % (16 * tiles) == 0), None)


def cuda_pack(codes: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """torch's CUDA int4 packing of kernel codes [N, K] (its uint8 input: high nibble = even k)."""
    q = codes.to(torch.uint8)
    return torch._convert_weight_to_int4pack((q[:, 0::2] << 4) | q[:, 1::2], inner_k_tiles)


def from_cuda_layout(packed: torch.Tensor, n: int, k: int, inner_k_tiles: int) -> torch.Tensor:
    """The CUDA kernel's packed tiles -> kernel codes uint8 [N, K] (permutation derived on the device)."""
    sources = nibble_sources(lambda q: cuda_pack(q, inner_k_tiles), n, k, packed.device)
    flat = packed.contiguous().view(torch.uint8).reshape(-1)
    nibbles = torch.stack([flat & 15, flat >> 4], dim=-1).reshape(-1)
    codes = torch.empty(n * k, dtype=torch.uint8, device=packed.device)
    codes[sources] = nibbles
    return codes.reshape(n, k)
