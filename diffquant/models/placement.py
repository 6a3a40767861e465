"""Where stage two's submodule lives while it is quantized: one small protocol, three placements.

`Placement` is what stage two asks of a placement: load the submodule (`load`), keep it placed
for the run (`placed`), visit the layers to quantize in order with each one's weights on the device
(`visit`, `layer_weights`), say where a finished quantized layer goes (`home_of`), take note
that layers were replaced (`after_swaps`), gather the state dict to write (`state_dict`) and report
(`report`, for the manifest). The three implementations:

* `WholeModel`: the submodule on one device (or a module the caller placed themselves);
* `AcceleratePlaced`: spread by accelerate (`device_map`, CPU or disk offload). Such a module keeps
  some weights on the meta device and loads them in its forward hook; a layer's weight is read
  inside `onloaded(module)` and the state dict is gathered with `materialized_state_dict`, so a
  model that never fits in memory whole is quantized layer by layer with its hooks in place;
* `Blockwise`: the weights stay in CPU memory and each block visits the device while it runs or
  while its layers are quantized (`blockwise.BlockwiseOnload`).

The shape follows diffusers' `hooks/group_offloading.py` (groups of blocks moved around their
forward, applied and removed as a unit); `BlockwiseOnload` is ours because it must also hold a
block on the device outside its forward, while its layers are quantized, and count the bytes.

Example:
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    >>> placement = placement_for("cpu")
    >>> with placement.placed(model):
    ...     names = list(placement.visit(["0", "1"]))
    >>> names, placement.report()
    (['0', '1'], {'mode': 'whole', 'device': 'cpu', 'device_map': None})
    >>> with (blocks := placement_for("cpu", blockwise=True, max_block_share=1.0)).placed(model):
    ...     _ = model(torch.ones(1, 4))
    >>> blocks.report()["mode"], blocks.report()["transfers"]
    ('blockwise', 2)
"""

from __future__ import annotations

import contextlib
import itertools
from itertools import chain
from typing import Any, Iterator, Protocol, Sequence

import torch
from accelerate.utils import align_module_device, has_offloaded_params

from diffquant.models.blockwise import BlockwiseOnload
from diffquant.models.presets import ModelPreset
from diffquant.models.submodule import load_submodule

# Block by block, a block holding more than this share of the submodule's weights is split into its children.
DEFAULT_MAX_BLOCK_SHARE = 0.1


class Placement(Protocol):
    """What stage two needs of a placement (module docstring); `placed` brackets the whole run."""

    mode: str
    device: str

    def load(self, preset: ModelPreset) -> torch.nn.Module: ...
    def placed(self, model: torch.nn.Module) -> contextlib.AbstractContextManager[Any]: ...
    def visit(self, names: Sequence[str]) -> Iterator[str]: ...
    def layer_weights(self, module: torch.nn.Module) -> contextlib.AbstractContextManager[Any]: ...
    def home_of(self, module: torch.nn.Module) -> torch.device: ...
    def after_swaps(self) -> None: ...
    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]: ...
    def report(self) -> dict[str, Any]: ...


def placement_for(device: str, *, blockwise: bool = False, max_block_share: float | None = None, device_map: str | None = None,
                  max_memory: dict[str, str] | None = None, offload_folder: str | None = None) -> Placement:
    """The placement of a run's settings: block by block, accelerate's device map, or whole."""
    if blockwise:
        return Blockwise(device, DEFAULT_MAX_BLOCK_SHARE if max_block_share is None else max_block_share)
    if device_map:
        return AcceleratePlaced(device, device_map, max_memory, offload_folder)
    return WholeModel(device)


class WholeModel:
    """The submodule on `device` (or wherever the caller put it: every layer is read inside
    `onloaded`, which is a no-op for a module accelerate did not offload)."""

    mode = "whole"

    def __init__(self, device: str) -> None:
        self.device = device

    def load(self, preset: ModelPreset) -> torch.nn.Module:
        return load_submodule(preset, device=self.device)

    @contextlib.contextmanager
    def placed(self, model: torch.nn.Module) -> Iterator["WholeModel"]:
        yield self

    def visit(self, names: Sequence[str]) -> Iterator[str]:
        yield from names

    def layer_weights(self, module: torch.nn.Module) -> contextlib.AbstractContextManager[Any]:
        return onloaded(module)

    def home_of(self, module: torch.nn.Module) -> torch.device:
        return execution_device(module)

    def after_swaps(self) -> None:
        pass

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return materialized_state_dict(model)

    def report(self) -> dict[str, Any]:
        """How the submodule was placed, and the device memory it took (bytes)."""
        report: dict[str, Any] = {"mode": self.mode, "device": self.device, "device_map": None}
        return {**report, **_cuda_peak(self.device)}


class AcceleratePlaced(WholeModel):
    """The submodule as accelerate places it (`device_map`, `max_memory`, `offload_folder`)."""

    mode = "device_map"

    def __init__(self, device: str, device_map: str, max_memory: dict[str, str] | None = None, offload_folder: str | None = None) -> None:
        super().__init__(device)
        self.device_map, self.max_memory, self.offload_folder = device_map, max_memory, offload_folder

    def load(self, preset: ModelPreset) -> torch.nn.Module:
        return load_submodule(preset, device=self.device, device_map=self.device_map, max_memory=self.max_memory,
                              offload_folder=self.offload_folder)

    def report(self) -> dict[str, Any]:
        return {**super().report(), "device_map": self.device_map}


class Blockwise(WholeModel):
    """The weights at home in CPU memory, one block at a time on `device` (`BlockwiseOnload`),
    blocks above `max_block_share` of the weights split into their children. The layers of one
    block are quantized while it is held on the device, and each finished layer goes home."""

    mode = "blockwise"

    def __init__(self, device: str, max_block_share: float = DEFAULT_MAX_BLOCK_SHARE) -> None:
        super().__init__(device)
        self.max_block_share = max_block_share
        self.blocks: BlockwiseOnload | None = None

    def load(self, preset: ModelPreset) -> torch.nn.Module:
        return load_submodule(preset, device="cpu")

    @contextlib.contextmanager
    def placed(self, model: torch.nn.Module) -> Iterator["Blockwise"]:
        with BlockwiseOnload(model, self.device, max_unit_share=self.max_block_share) as self.blocks:
            yield self

    def visit(self, names: Sequence[str]) -> Iterator[str]:
        blocks = self._onload()
        for unit, group in itertools.groupby(names, key=blocks.unit_of):
            with blocks.holding(unit) if unit is not None else contextlib.nullcontext():
                yield from group

    def home_of(self, module: torch.nn.Module) -> torch.device:
        return self._onload().home

    def after_swaps(self) -> None:
        self._onload().attach()  # a replaced top-level layer (conv_in, x_embedder) is a unit of its own

    def report(self) -> dict[str, Any]:
        report: dict[str, Any] = {"mode": self.mode, "device": self.device, "device_map": None}
        return {**report, **(self.blocks.report() if self.blocks is not None else {}), **_cuda_peak(self.device)}

    def _onload(self) -> BlockwiseOnload:
        if self.blocks is None:
            raise RuntimeError("Blockwise placement used outside `placed(model)`")
        return self.blocks


def _cuda_peak(device: str) -> dict[str, int]:
    return {"cuda_max_memory_allocated_bytes": torch.cuda.max_memory_allocated(device)} if device.startswith("cuda") else {}


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
