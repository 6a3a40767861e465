"""Block views: [..., K] as [..., K // block_size, block_size] and back, for per-group scales.

Blocks always run along the last dim (K, the input / reduction dim of a Linear weight [out, in]),
which is where every packed format of this project groups its elements. Weights with more than
two dims (Conv2d [out, in, kh, kw]) are treated as [out, in*kh*kw]: dim 0 is the channel dim and
the rest is flattened, the layout the checkpoint stores (storage-and-formats.md §4.3).
"""

from __future__ import annotations

from typing import Callable

import torch

# Elements of one slice of `in_row_slices`, `rows_into` and `affine.quantize_affine` (16 MiB of float32): few enough
# slices that the per-call overhead does not show, small enough that no whole-weight temporary is made.
ROW_SLICE_ELEMENTS = 2**22


def in_row_slices(quantize: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], x: torch.Tensor,
                  max_elements: int = ROW_SLICE_ELEMENTS) -> tuple[torch.Tensor, ...]:
    """`quantize(x)` computed on slices of about `max_elements` along dim 0, outputs joined along dim 0.

    For block formats whose every output row depends only on the same row of x (blocks run along
    the last dim): the result is the one of a single call, element for element, while the float
    temporaries of `quantize` are one slice's, not the tensor's. x of at most two slices, or 1-D,
    goes in one call.

    Example:
        >>> halves = lambda t: (t // 2, t.sum(dim=-1))
        >>> [o.shape for o in in_row_slices(halves, torch.ones(10, 4), max_elements=8)]
        [torch.Size([10, 4]), torch.Size([10])]
    """
    if x.dim() < 2 or x.numel() <= 2 * max_elements:
        return quantize(x)
    step = max(1, max_elements // x[0].numel())
    parts = [quantize(x[start:start + step]) for start in range(0, x.shape[0], step)]
    return tuple(torch.cat(outputs) for outputs in zip(*parts))


def rows_into(compute: Callable[[slice], torch.Tensor], shape: torch.Size, dtype: torch.dtype, device: torch.device,
              max_elements: int = ROW_SLICE_ELEMENTS) -> torch.Tensor:
    """A tensor of `shape` in `dtype` whose rows `rows` are `compute(rows)` cast to `dtype`, filled
    slice by slice along dim 0 (about `max_elements` each): a dequantization whose float32
    temporaries are one slice's, not the weight's. 1-D or small shapes take one slice.

    Example:
        >>> rows_into(lambda rows: torch.arange(12.0).reshape(4, 3)[rows] * 2, torch.Size([4, 3]), torch.float16,
        ...           torch.device("cpu"), max_elements=3)[:, 0].tolist()
        [0.0, 6.0, 12.0, 18.0]
    """
    if len(shape) < 2 or shape.numel() <= 2 * max_elements:
        return compute(slice(None)).to(dtype)
    out = torch.empty(shape, dtype=dtype, device=device)
    step = max(1, max_elements // shape[1:].numel())
    for start in range(0, shape[0], step):
        rows = slice(start, start + step)
        out[rows] = compute(rows)
    return out


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
