"""Reduce a tensor to one statistic per scale, in the shape the scale has: the amax (or min / max)
the format tests choose their scales from."""

from __future__ import annotations

import torch

from diffquant.quant.formats.blocks import to_blocks

GRANULARITIES = ("per_tensor", "per_channel", "per_group")
REDUCTIONS = ("amax", "min", "max")


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
