"""Two 4-bit codes per byte, and signed INT4 <-> two's complement nibbles.

Layout (storage-and-formats.md §4.3, the order of compressed-tensors, Quark FP4, ModelOpt and
torchao `pack_uint4`): along the last dim, byte k = c[2k] | c[2k + 1] << 4, i.e. the low nibble
holds the even index. No AWQ-style reorder. Signed INT4 q in [-8, 7] is stored as c = q & 0xF.
"""

from __future__ import annotations

import torch


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes in [0, 15], shape [..., K] with K even, into uint8 bytes [..., K // 2].

    Example:
        >>> pack_nibbles(torch.tensor([1, 2, 3, 4], dtype=torch.uint8))
        tensor([33, 67], dtype=torch.uint8)
    """
    if codes.dtype != torch.uint8:
        raise ValueError(
            f"pack_nibbles expects uint8 codes, got dtype {codes.dtype}; "
            "convert signed INT4 with int4_to_nibbles first"
        )
    if codes.dim() < 1 or codes.shape[-1] % 2 != 0:
        raise ValueError(
            f"pack_nibbles needs an even last dim, got shape {tuple(codes.shape)}; "
            "pad K to an even length"
        )
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"4-bit codes must be in [0, 15], got a maximum of {int(codes.max())}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: uint8 [..., K // 2] -> uint8 codes [..., K] in [0, 15].

    Example:
        >>> unpack_nibbles(torch.tensor([0x21, 0x43], dtype=torch.uint8))
        tensor([1, 2, 3, 4], dtype=torch.uint8)
    """
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_nibbles expects uint8 bytes, got dtype {packed.dtype}")
    if packed.dim() < 1:
        raise ValueError("unpack_nibbles needs a tensor with at least one dim, got a 0-d tensor")
    codes = torch.empty(*packed.shape[:-1], packed.shape[-1] * 2, dtype=torch.uint8, device=packed.device)
    torch.bitwise_and(packed, 0x0F, out=codes[..., 0::2])  # written straight into the strided halves:
    torch.bitwise_right_shift(packed, 4, out=codes[..., 1::2])  # no temporaries of the codes' size
    return codes


def int4_to_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Signed INT4 codes in [-8, 7] (any integer dtype) -> uint8 two's complement nibbles q & 0xF.

    Example:
        >>> int4_to_nibbles(torch.tensor([-8, -1, 0, 7]))
        tensor([ 8, 15,  0,  7], dtype=torch.uint8)
    """
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise ValueError(f"int4_to_nibbles expects an integer tensor, got dtype {q.dtype}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError(
            f"signed INT4 codes must be in [-8, 7], got [{int(q.min())}, {int(q.max())}]"
        )
    if q.dtype == torch.int8:
        # An int8's byte is its two's complement, whose low four bits are the int4 nibble: no
        # wider copy (int4 weights are quantized straight to int8 codes).
        return q.view(torch.uint8) & 0x0F
    return (q.to(torch.int16) & 0x0F).to(torch.uint8)


def nibbles_to_int4(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 nibbles in [0, 15] -> int8 signed INT4 values in [-8, 7] (two's complement).

    Example:
        >>> nibbles_to_int4(torch.tensor([8, 15, 0, 7], dtype=torch.uint8))
        tensor([-8, -1,  0,  7], dtype=torch.int8)
    """
    if nibbles.dtype != torch.uint8:
        raise ValueError(f"nibbles_to_int4 expects uint8 nibbles, got dtype {nibbles.dtype}")
    if nibbles.numel() and int(nibbles.max()) > 15:
        raise ValueError(f"nibbles must be in [0, 15], got a maximum of {int(nibbles.max())}")
    # (n XOR 8) - 8 is n for n < 8 and n - 16 for n >= 8, in place on the one int8 copy.
    return nibbles.to(torch.int8).bitwise_xor_(8).sub_(8)
