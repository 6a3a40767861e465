"""Nunchaku's MMA-tiled layouts: the byte order its W4A4 kernels read weights, scales and the
low-rank branch in (pure functions over tensors).

The layouts follow nunchaku's `NunchakuWeightPacker` (nunchaku/lora/flux/packer.py, itself from
deepcompressor's backend; Apache-2.0), with its defaults for 4-bit weights: warp tile N = 128,
MMA K tile = 64, two K tiles unrolled. Written here from the algorithm, not copied:

- `pack_int4_weight`: codes [N, K] (4-bit, signed two's complement or E2M1) -> int8 [N, K/2].
  N splits as (N/128, 8 packs, 2, 8 lanes) and K as (K/64, 2, 4 lanes, 8 registers); the tiles go
  in the order (n tile, k tile, n pack, n lane, k lane, n half, k half, register) and each run of
  8 codes fills one little-endian int32, code j in bits 4j..4j+3 (so byte b = c[2b] | c[2b+1] << 4).
- `pack_scales`: 16-bit per-group scales [N, G] -> [G, N] (a flat buffer); within each 128-row
  tile the rows go 0 1 8 9 | 2 3 10 11 | 4 5 12 13 | 6 7 14 15 | 16 17 24 25 ... (each lane of
  the MMA accumulator holds two adjacent rows of two 8-row halves). Vectors over N (bias,
  smooth_factor, wcscales) use the same order with G = 1.
- `pack_micro_scales`: NVFP4's E4M3 block scales [N, K/16] -> [K/16, N]: per 128-row tile and
  64-wide K step, the 4 scales of a row are one 32-bit word, and the words go lane by lane with
  rows 0 32 64 96 | 8 40 72 104 | ... (PTX `mma ... block_scale` thread-id selection).
- `pack_lowrank`: the 16-bit low-rank factors, down [in, rank] and up [out, rank], in 16 x 16
  fragments of (2 x 8 lanes) x (2 x 4 lanes x 2 registers).

Shapes must be whole tiles (N and K multiples of 128, rank a multiple of 16); the exporter checks.

Example:
    >>> codes = torch.arange(128 * 128, dtype=torch.int32).reshape(128, 128) % 16
    >>> pack_int4_weight(codes).shape
    torch.Size([128, 64])
"""

from __future__ import annotations

import torch

WARP_N = 128  # rows per warp tile
MMA_K = 64  # 4-bit codes per MMA K tile
K_ALIGN = 2 * MMA_K  # the kernels unroll two K tiles without a bounds check
RANK_ALIGN = 16


def pack_int4_weight(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [N, K] (any integer dtype, low 4 bits used) -> int8 [N, K/2] in MMA tile order."""
    n, k = codes.shape
    nibbles = (codes.to(torch.int32) & 0xF).to(torch.uint8)
    tiled = nibbles.reshape(n // WARP_N, 8, 2, 8, k // MMA_K, 2, 4, 8).permute(0, 4, 1, 3, 6, 2, 5, 7)
    pairs = tiled.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).view(torch.int8).reshape(n, k // 2)


def pack_scales(scales: torch.Tensor) -> torch.Tensor:
    """16-bit scales [N, G] -> [G, N] buffer (G = 1 for a vector over N; returns [N] then)."""
    n, groups = scales.shape
    tiled = scales.reshape(n // WARP_N, 8, 2, 4, 2, groups).permute(0, 5, 1, 3, 2, 4)
    flat = tiled.reshape(-1)
    return flat if groups == 1 else flat.reshape(groups, n)


def pack_micro_scales(scales: torch.Tensor) -> torch.Tensor:
    """E4M3 block scales [N, K/16] -> [K/16, N] buffer."""
    n, blocks = scales.shape
    tiled = scales.reshape(n // WARP_N, 4, 4, 8, blocks // 4, 4).permute(0, 4, 3, 2, 1, 5)
    return tiled.reshape(blocks, n)


def pack_lowrank(weight: torch.Tensor, down: bool) -> torch.Tensor:
    """A 16-bit low-rank factor in fragment order. down: [rank, in] -> [in, rank]; up: [out, rank] -> [out, rank]."""
    if down:
        rank, width = weight.shape
        frags = weight.reshape(rank // 16, 16, width // 16, 16).permute(2, 0, 1, 3)
    else:
        width, rank = weight.shape
        frags = weight.reshape(width // 16, 16, rank // 16, 16).permute(0, 2, 1, 3)
    frags = frags.reshape(width // 16, rank // 16, 2, 8, 2, 4, 2).permute(0, 1, 3, 5, 2, 4, 6)
    return frags.reshape(width, rank)


def pack_awq_int4(unsigned: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes [N, K] (0..15) -> int32 [N/4, K/2] in TinyChat's AWQ order (the
    `awq_w4a16` kernels): along K, each 32 codes become four 16-bit words, word j holding codes
    j, j+8, j+16, j+24 in its nibbles 0..3; then, per 4 rows and 64 codes, the 16 words of each row
    follow one another (row-interleaved by chunks of 16 words)."""
    n, k = unsigned.shape
    groups = unsigned.to(torch.int32).reshape(n, k // 32, 4, 8)
    words = groups[:, :, 0] | (groups[:, :, 1] << 4) | (groups[:, :, 2] << 8) | (groups[:, :, 3] << 12)
    words = words.reshape(n // 4, 4, k // 64, 16).permute(0, 2, 1, 3).reshape(n // 4, k)
    signed = torch.where(words > 0x7FFF, words - 0x10000, words)  # the 16-bit pattern as int16, explicitly
    return signed.to(torch.int16).contiguous().view(torch.int32)
