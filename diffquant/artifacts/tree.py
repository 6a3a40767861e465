"""Flatten a captured forward-kwargs dict into named tensors plus a JSON structure, and back.

A structure is a JSON tree: `{"dict": {key: node}}`, `{"tuple": [node, ...]}`,
`{"list": [node, ...]}`, `{"tensor": path}` or `{"const": value}` where value is None, a bool,
an int, a float or a str. Paths name tensors: dict keys joined by `.`, sequence items as `[i]`,
e.g. `added_cond_kwargs.text_embeds` or `controlnet_residuals[2]`.

Example:
    >>> structure, tensors = flatten_sample({"x": torch.ones(2), "cfg": {"scale": 1.5}})
    >>> structure
    {'dict': {'x': {'tensor': 'x'}, 'cfg': {'dict': {'scale': {'const': 1.5}}}}}
    >>> unflatten_sample(structure, tensors)["cfg"]["scale"]
    1.5
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from diffquant.errors import DiffquantError

Structure = dict[str, Any]
CONSTANT_TYPES = (type(None), bool, int, float, str)


def flatten_sample(sample: Mapping[str, Any]) -> tuple[Structure, dict[str, torch.Tensor]]:
    """Split a nested kwargs dict into (structure, {path: tensor}); tensors are not copied."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten(sample, "", tensors)
    return structure, tensors


def unflatten_sample(structure: Structure, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Rebuild the nested object `flatten_sample` split; tuples come back as tuples."""
    if "tensor" in structure:
        return tensors[structure["tensor"]]
    if "const" in structure:
        return structure["const"]
    if "dict" in structure:
        return {key: unflatten_sample(node, tensors) for key, node in structure["dict"].items()}
    if "tuple" in structure:
        return tuple(unflatten_sample(node, tensors) for node in structure["tuple"])
    if "list" in structure:
        return [unflatten_sample(node, tensors) for node in structure["list"]]
    raise DiffquantError(f"unknown structure node {sorted(structure)}", "the artifact is corrupt; recalibrate")


def tensor_paths(structure: Structure) -> list[str]:
    """Every tensor path in the structure, in traversal order (the reader checks a shard's sample
    records against them)."""
    if "tensor" in structure:
        return [structure["tensor"]]
    children: list[Structure] = []
    if "dict" in structure:
        children = list(structure["dict"].values())
    elif "tuple" in structure or "list" in structure:
        children = structure.get("tuple", structure.get("list"))
    return [path for child in children for path in tensor_paths(child)]


def constant_leaves(structure: Structure, prefix: str = "") -> dict[str, Any]:
    """Every constant leaf as {path: value}, for schemas and summaries."""
    if "const" in structure:
        return {prefix: structure["const"]}
    items: list[tuple[str, Structure]] = []
    if "dict" in structure:
        items = [(_join(prefix, key), node) for key, node in structure["dict"].items()]
    elif "tuple" in structure or "list" in structure:
        nodes = structure.get("tuple", structure.get("list"))
        items = [(f"{prefix}[{i}]", node) for i, node in enumerate(nodes)]
    out: dict[str, Any] = {}
    for path, node in items:
        out.update(constant_leaves(node, path))
    return out


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _flatten(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Structure:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {"tensor": path}
    if isinstance(obj, Mapping):
        nodes = {}
        for key, value in obj.items():
            if not isinstance(key, str) or "." in key or "[" in key:
                raise DiffquantError(
                    f"captured input {path or '<root>'} has key {key!r} that cannot be stored",
                    "keys must be strings without '.' or '['",
                )
            nodes[key] = _flatten(value, _join(path, key), tensors)
        return {"dict": nodes}
    if isinstance(obj, (tuple, list)):
        kind = "tuple" if isinstance(obj, tuple) else "list"
        return {kind: [_flatten(item, f"{path}[{i}]", tensors) for i, item in enumerate(obj)]}
    if isinstance(obj, CONSTANT_TYPES):
        if isinstance(obj, float) and not math.isfinite(obj):
            raise DiffquantError(f"captured input {path} is {obj}", "only finite float constants can be stored")
        return {"const": obj}
    raise DiffquantError(
        f"captured input {path or '<root>'} has type {type(obj).__name__}, which cannot be stored",
        "only tensors, dicts, tuples, lists, None, bool, int, float and str are supported",
    )
