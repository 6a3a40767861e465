"""Submodules spread over devices or offloaded by accelerate (`device_map`, disk/CPU offload).

Such a module keeps some weights on the meta device and loads them in its forward hook. Stage two
reads each layer's weight inside `onloaded(module)` and gathers the state dict with
`materialized_state_dict`, so a model that never fits in memory whole is quantized layer by layer
while its accelerate hooks stay in place.
"""

from __future__ import annotations

import contextlib
from itertools import chain
from typing import Iterator

import torch
from accelerate.utils import align_module_device, has_offloaded_params


@contextlib.contextmanager
def onloaded(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, an offloaded module's own weights are real tensors (on its execution device)."""
    if has_offloaded_params(module):
        with align_module_device(module):
            yield module
    else:
        yield module


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where `module` computes: its accelerate hook's execution device, else its weight's device."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device)
    return next((p.device for p in module.parameters(recurse=False) if not p.is_meta), torch.device("cpu"))


def materialized_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every offloaded tensor loaded (to the CPU), one module at a time."""
    if not any(p.is_meta for p in model.parameters()):
        return model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        with onloaded(module):
            persistent = ((k, b) for k, b in module._buffers.items() if k not in module._non_persistent_buffers_set)
            for key, tensor in chain(module._parameters.items(), persistent):
                if tensor is not None:
                    out[prefix + key] = tensor.detach().to("cpu").clone()
    return out
