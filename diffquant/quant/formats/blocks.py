"""Block views and the reductions behind per-tensor, per-channel and per-group scales.

Blocks always run along the last dim (K, the input / reduction dim of a Linear weight [out, in]),
which is where every packed format of this project groups its elements. Weights with more than
two dims (Conv2d [out, in, kh, kw]) are treated as [out, in*kh*kw]: dim 0 is the channel dim and
the rest is flattened, the layout the checkpoint stores (storage-and-formats.md §4.3).
"""

from __future__ import annotations

import torch

GRANULARITIES = ("per_tensor", "per_channel", "per_group")
REDUCTIONS = ("amax", "min", "max")


def to_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """View [..., K] as [..., K // block_size, block_size] (no copy when x is contiguous).

    Raises ValueError when K is not a multiple of block_size.

    Example:
        >>> to_blocks(torch.arange(8.0).reshape(2, 4), 2).shape
        torch.Size([2, 2, 2])
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if x.dim() < 1:
        raise ValueError("to_blocks needs a tensor with at least one dim, got a 0-d tensor")
    k = x.shape[-1]
    if k % block_size != 0:
        raise ValueError(
            f"last dim K={k} is not a multiple of the block size {block_size}; "
            f"pad K to a multiple of {block_size} or pick a block size that divides {k}"
        )
    return x.reshape(*x.shape[:-1], k // block_size, block_size)


def from_blocks(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_blocks`: [..., n_blocks, block_size] -> [..., n_blocks * block_size]."""
    if x.dim() < 2:
        raise ValueError(
            f"from_blocks needs a tensor with at least 2 dims, got shape {tuple(x.shape)}"
        )
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def reduce_for_granularity(
    x: torch.Tensor, granularity: str, group_size: int | None = None, reduce: str = "amax"
) -> torch.Tensor:
    """Reduce x to one statistic per scale, in the shape the scale will have.

    Args:
        x: floating tensor. per_channel / per_group need at least 2 dims; dim 0 is the channel
            dim and the others are flattened to K (x is seen as [out, K]).
        granularity: "per_tensor" -> shape []; "per_channel" -> [out, 1] (broadcasts against
            x.reshape(out, -1)); "per_group" -> [out, K // group_size, 1] (broadcasts against
            to_blocks(x.reshape(out, -1), group_size)).
        group_size: elements per group along K; required for per_group, must be None otherwise.
        reduce: "amax" (max of |x|), "min" or "max".

    Returns:
        Tensor of x's dtype with the shape above.

    Example:
        >>> reduce_for_granularity(torch.ones(4, 64), "per_group", 16).shape
        torch.Size([4, 4, 1])
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce {reduce!r} is not one of {', '.join(REDUCTIONS)}")
    if granularity != "per_group" and group_size is not None:
        raise ValueError(f"group_size={group_size} is only allowed with granularity 'per_group'")
    if x.numel() == 0:
        raise ValueError(f"cannot reduce an empty tensor of shape {tuple(x.shape)}")
    values = x.abs() if reduce == "amax" else x
    reducer = torch.amin if reduce == "min" else torch.amax
    if granularity == "per_tensor":
        return reducer(values)
    if x.dim() < 2:
        raise ValueError(
            f"granularity {granularity!r} needs a tensor with a channel dim (>= 2 dims), "
            f"got shape {tuple(x.shape)}"
        )
    flat = values.reshape(x.shape[0], -1)
    if granularity == "per_channel":
        return reducer(flat, dim=-1, keepdim=True)
    if group_size is None:
        raise ValueError("granularity 'per_group' needs a group_size (e.g. 32, 64 or 128)")
    return reducer(to_blocks(flat, group_size), dim=-1, keepdim=True)
