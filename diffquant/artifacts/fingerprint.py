"""Identify a submodule by class, config and weights, so artifacts can be matched to the model they came from.

`module_fingerprint` covers the architecture (class and public config). `weights_fingerprint`
covers the values, cheaply, by a fixed sampling rule: for every tensor of the state dict, in name
order, the hash takes its name, dtype and shape and the bytes of `SAMPLES_PER_TENSOR` elements at
evenly spaced flat positions `round(i * (n - 1) / (k - 1))`, i = 0..k-1 (all elements when n <= k).
A fine-tune, a fused LoRA (a dense update of every element of a layer), a re-save in another dtype
or a swapped checkpoint changes sampled elements of nearly every tensor, so it changes the hash;
an edit of a few elements that no sample hits does not (the price of hashing ~0.1% of an SD
UNet's values instead of all of them). Tensors on the meta device have no values: only their
name, dtype and shape count.

Example:
    >>> layer = torch.nn.Linear(4, 2)
    >>> torch.nn.init.zeros_(layer.bias)  # doctest: +ELLIPSIS
    Parameter...
    >>> before = weights_fingerprint(layer)
    >>> with torch.no_grad():
    ...     layer.weight.add_(1.0)  # doctest: +ELLIPSIS
    Parameter...
    >>> weights_fingerprint(layer) == before
    False
"""

from __future__ import annotations

import contextlib
import hashlib
from itertools import chain
from typing import Any

import torch
from accelerate.utils import align_module_device, has_offloaded_params

from diffquant.artifacts.calibration_format import json_sha256

SAMPLES_PER_TENSOR = 256


def module_fingerprint(module: torch.nn.Module) -> dict[str, Any]:
    """`{"class": ..., "config_sha256": ...}` of a diffusers model.

    The hash covers the model's config without private keys (`_name_or_path`, `_diffusers_version`),
    so the same architecture loaded from another directory or by another diffusers version matches.
    """
    config = getattr(module, "config", None) or {}
    public = {key: value for key, value in dict(config).items() if not key.startswith("_")}
    return {"class": type(module).__name__, "config_sha256": json_sha256(public)}


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 (hex) of the sampled weights of `module`, by the rule in the module docstring."""
    entries: list[tuple[str, torch.Tensor, bytes]] = []
    for prefix, child in module.named_modules():
        # An offloaded (accelerate) module has its weights only while aligned to its device.
        with align_module_device(child) if has_offloaded_params(child) else contextlib.nullcontext():
            persistent = ((k, b) for k, b in child._buffers.items() if k not in child._non_persistent_buffers_set)
            for key, tensor in chain(child._parameters.items(), persistent):
                if tensor is None:
                    continue
                values = b"" if tensor.is_meta or tensor.numel() == 0 else _sampled(tensor).view(torch.uint8).numpy().tobytes()
                entries.append((f"{prefix}.{key}" if prefix else key, tensor, values))
    hasher = hashlib.sha256(f"diffquant-weights-v1|k={SAMPLES_PER_TENSOR}\n".encode())
    for name, tensor, values in sorted(entries, key=lambda entry: entry[0]):
        hasher.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{tuple(tensor.shape)}\n".encode())
        hasher.update(values)
    return hasher.hexdigest()


def _sampled(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().reshape(-1)  # shares tied weights: a tied tensor counts under each name
    count = flat.numel()
    if count > SAMPLES_PER_TENSOR:
        positions = torch.linspace(0, count - 1, SAMPLES_PER_TENSOR, dtype=torch.float64).round().long()
        flat = flat.index_select(0, positions.to(flat.device))
    return flat.to("cpu").contiguous()
