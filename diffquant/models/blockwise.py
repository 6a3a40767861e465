"""Block-by-block placement: a submodule's weights stay home (the CPU), each block visits the device.

Stage two runs calibration samples through the denoiser of a model that may not fit on the device
whole. `BlockwiseOnload` keeps every onload unit (see `onload_units`) at `home`, copies a unit to the
device in a forward pre-hook and points it back at its home tensors in a forward hook (nothing is
copied back: weights are read-only here), so the device holds one block, the own tensors of the
root and of split modules, and the sample. Work outside forward (quantizing a block's layers on
the device) uses `holding`. A per-unit depth count makes nested onloads (a held unit whose forward
runs) move once.

This is an alternative to accelerate's `device_map`/offload (see `placement.py`), not a layer on it:
accelerate's hooks cannot run with the CPU as execution device, and two placers would fight.

Example:
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> expected = model(torch.ones(1, 8))
    >>> with BlockwiseOnload(model, "cpu") as placement:
    ...     out = model(torch.ones(1, 8))
    >>> torch.equal(out, expected)
    True
    >>> placement.report()["peak_resident_bytes"] <= placement.report()["total_bytes"]
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from itertools import chain
from typing import Self

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from diffquant.errors import ConfigError

_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def onload_units(model: nn.Module, max_unit_bytes: int | None = None) -> list[tuple[str, nn.Module]]:
    """The modules moved to the device as a whole, as `(dotted name, module)` in registration order.

    The rule: each top-level child of `model` is a unit, except that a container child
    (`nn.ModuleList`, `nn.Sequential`, `nn.ModuleDict`) gives one unit per element (`down_blocks.0`,
    `transformer_blocks.3`). Diffusers keeps its repeated blocks in such lists, so they are the
    natural units; the stem and head layers (`conv_in`, `x_embedder`, `proj_out`) are small and
    go as they are. Children without parameters or buffers are skipped: they have nothing to move.
    A unit above `max_unit_bytes` is split the same way into its own children, recursively (SDXL's
    `up_blocks.0` is 47 % of the UNet; its ten-layer transformers split into single layers); a
    module without children stays a unit whatever its size. The own tensors of the root and of
    every split module belong to no unit (`split_modules`).
    """
    return _plan(model, max_unit_bytes)[0]


def split_modules(model: nn.Module, max_unit_bytes: int | None = None) -> list[tuple[str, nn.Module]]:
    """The root and the modules `onload_units` split: their own tensors stay on the device."""
    return _plan(model, max_unit_bytes)[1]


def _plan(model: nn.Module, max_unit_bytes: int | None) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    units: list[tuple[str, nn.Module]] = []
    split: list[tuple[str, nn.Module]] = [("", model)]
    pending = _members("", model)
    while pending:
        name, module = pending.pop(0)
        children = _members(name, module)
        if max_unit_bytes is not None and _nbytes(module) > max_unit_bytes and children:
            split.append((name, module))
            pending[:0] = children
        else:
            units.append((name, module))
    return units, split


def _members(prefix: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The children of `module` with tensors, containers expanded into their elements."""
    members: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        entries = [(f"{full}.{key}", item) for key, item in child.named_children()] if isinstance(child, _CONTAINERS) else [(full, child)]
        members += [(entry_name, entry) for entry_name, entry in entries if _nbytes(entry) > 0]
    return members


class BlockwiseOnload:
    """Keeps `model` at `home` and moves each onload unit to `device` only while it is in use.

    `max_unit_share` bounds a unit's share of the model's bytes (`onload_units` splits bigger ones);
    1.0 keeps the top-level blocks whole.

    Accounting (bytes of parameters and buffers): `resident_bytes` is the own tensors of the root
    and of split modules (`root_bytes`, always on the device) plus the units onloaded now;
    `peak_resident_bytes` is its maximum, `transfers` the unit moves to the device.
    `root_bytes` and `total_bytes` are measured on each `attach()`; `largest_unit_bytes` is the
    largest unit seen since construction.
    Hooks added to a unit after `attach()` sit inside ours: a pre-hook sees the unit onloaded, a
    forward hook sees it home again (fine for hooks that read inputs and outputs, as stage two's
    do); call `attach()` again to put ours outermost.
    """

    def __init__(self, model: nn.Module, device: str | torch.device, home: str | torch.device = "cpu",
                 max_unit_share: float = 1.0) -> None:
        _refuse_placed(model)
        if not 0.0 < max_unit_share <= 1.0:
            raise ConfigError(f"block share {max_unit_share} is not in (0, 1]", "pass a fraction of the model, e.g. 0.1")
        self.model = model
        self.device = torch.device(device)
        self.home = torch.device(home)
        self.max_unit_bytes = int(_nbytes(model) * max_unit_share)
        self._units = dict(onload_units(model, self.max_unit_bytes))
        self._depth: dict[str, int] = {}
        self._onloaded: dict[str, int] = {}
        self._homes: dict[str, list[_Home]] = {}
        self._pinned_homes: list[_Home] = []
        self._handles: list[RemovableHandle] = []
        self.root_bytes = self.largest_root_bytes = self.total_bytes = self.largest_unit_bytes = 0
        self.peak_resident_bytes = self.transfers = self.largest_visitor_bytes = 0

    def __enter__(self) -> Self:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def attach(self) -> None:
        """(Re)install the hooks on the units found by name now; units not in use go home.

        After replacing a unit or a layer inside one, call again: the current modules get the
        hooks, the replaced ones lose theirs. A unit held right now is moved (whole) to the device.
        """
        _refuse_placed(self.model)
        self._remove_hooks()
        _restore(self._pinned_homes)
        self._units = dict(onload_units(self.model, self.max_unit_bytes))
        for name, unit in self._units.items():
            if self._depth.get(name, 0):
                _restore(self._homes.pop(name, []))
                self._homes[name] = _onload(unit, self.device)
                self._onloaded[name] = _nbytes(unit)
            else:
                unit.to(self.home)
            # Ours first before forward and last after it (among hooks there now); always_call
            # moves the unit home also when its forward raises.
            pre = unit.register_forward_pre_hook(lambda m, args, n=name: self._enter(n, m), prepend=True)
            post = unit.register_forward_hook(lambda m, args, out, n=name: self._exit(n, m), always_call=True)
            self._handles += [pre, post]
        pinned = [module for _, module in split_modules(self.model, self.max_unit_bytes)]
        self._pinned_homes = [home for module in pinned for home in _onload(module, self.device, recurse=False)]
        self.root_bytes = sum(_nbytes(module, recurse=False) for module in pinned)
        # Re-attached after layers were replaced, the split (and so the root's share) can change.
        self.largest_root_bytes = max(self.largest_root_bytes, self.root_bytes)
        self.total_bytes = _nbytes(self.model)
        self.largest_unit_bytes = max([self.largest_unit_bytes, *(_nbytes(u) for u in self._units.values())])
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)

    def detach(self) -> None:
        """Remove the hooks and put everything, units and the root's own tensors, back home."""
        self._remove_hooks()
        for homes in self._homes.values():
            _restore(homes)
        _restore(self._pinned_homes)
        self.model.to(self.home)
        self._homes.clear()
        self._pinned_homes = []
        self._depth.clear()
        self._onloaded.clear()

    @property
    def resident_bytes(self) -> int:
        """Bytes this placement keeps on the device now: root tensors plus onloaded units."""
        return self.root_bytes + sum(self._onloaded.values())

    def unit_of(self, module_name: str) -> str | None:
        """The unit that the dotted `module_name` lies in (a unit maps to itself), else None."""
        return next((u for u in self._units if module_name == u or module_name.startswith(u + ".")), None)

    @contextlib.contextmanager
    def holding(self, unit_name: str) -> Iterator[nn.Module]:
        """Within the block, unit `unit_name` is on the device, also across forwards of the model."""
        if unit_name not in self._units:
            raise ValueError(f"{unit_name!r} is not an onload unit; units are {list(self._units)}")
        try:
            self._enter(unit_name, self.model.get_submodule(unit_name))
            yield self.model.get_submodule(unit_name)
        finally:
            # Looked up again: the caller may have replaced the unit while holding it.
            self._exit(unit_name, self.model.get_submodule(unit_name))

    @contextlib.contextmanager
    def visiting(self, module: nn.Module) -> Iterator[nn.Module]:
        """Within the block, `module` (one outside the model, e.g. a quantized layer being
        measured against the original) is on the device and counted as resident."""
        key = f"<visitor {id(module)}>"
        homes = _onload(module, self.device)
        self._onloaded[key] = _nbytes(module)
        self.largest_visitor_bytes = max(self.largest_visitor_bytes, self._onloaded[key])
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        try:
            yield module
        finally:
            _restore(homes)
            del self._onloaded[key]

    def report(self) -> dict[str, int]:
        """The accounting, for a run's manifest."""
        keys = ("resident_bytes", "peak_resident_bytes", "largest_unit_bytes", "largest_visitor_bytes", "root_bytes", "largest_root_bytes",
                "total_bytes", "transfers")
        return {key: int(getattr(self, key)) for key in keys}

    def _enter(self, name: str, unit: nn.Module) -> None:
        # Counted before the move: if the move fails, the matching exit still runs and undoes it.
        depth = self._depth.get(name, 0)
        self._depth[name] = depth + 1
        if depth == 0:
            self._onloaded[name] = nbytes = _nbytes(unit)
            self.largest_unit_bytes = max(self.largest_unit_bytes, nbytes)
            self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
            self.transfers += 1
            self._homes[name] = _onload(unit, self.device)

    def _exit(self, name: str, unit: nn.Module) -> None:
        depth = self._depth.get(name, 0)
        if depth == 0:
            return  # a pre-hook registered before ours raised, so ours never entered
        self._depth[name] = depth - 1
        if depth == 1:
            _restore(self._homes.pop(name, []))
            del self._onloaded[name]

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _nbytes(module: nn.Module, recurse: bool = True) -> int:
    """Bytes of `module`'s parameters and buffers (each shared tensor once)."""
    tensors = chain(module.parameters(recurse=recurse), module.buffers(recurse=recurse))
    return sum(t.numel() * t.element_size() for t in tensors)


# Where a tensor lives at home: (module, attribute, is a parameter, the home tensor).
_Home = tuple[nn.Module, str, bool, torch.Tensor]


def _onload(module: nn.Module, device: torch.device, recurse: bool = True) -> list[_Home]:
    """Point `module`'s parameters (in place, keeping their identity) and buffers at copies on
    `device`; returns the home tensors, which `_restore` puts back without copying anything back.

    Weights are read-only while onloaded (stage two never writes them), so the device copies are
    dropped, not copied home: one host-to-device transfer per onload. Copies are made outside
    inference mode even inside it, so no inference tensor is left in the model.
    """
    homes: list[_Home] = []
    with torch.inference_mode(False):
        for sub in module.modules() if recurse else [module]:
            for key, param in sub._parameters.items():
                if param is not None:
                    homes.append((sub, key, True, param.data))
                    param.data = param.data.to(device, non_blocking=True)
            for key, buffer in sub._buffers.items():
                if buffer is not None:
                    homes.append((sub, key, False, buffer))
                    sub._buffers[key] = buffer.to(device, non_blocking=True)
    return homes


def _restore(homes: list[_Home]) -> None:
    """Point every tensor `_onload` moved back at its home tensor."""
    with torch.inference_mode(False):
        for module, key, is_parameter, home in homes:
            if is_parameter:
                module._parameters[key].data = home
            else:
                module._buffers[key] = home


def _refuse_placed(model: nn.Module) -> None:
    """Raise ConfigError for a model that accelerate placed (hooks or meta tensors)."""
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        raise ConfigError(
            "block-by-block mode cannot run on a submodule placed by accelerate (device_map/offload)",
            "use either --blockwise or --device-map, not both",
        )
    if any(t.is_meta for t in chain(model.parameters(), model.buffers())):
        raise ConfigError(
            "block-by-block mode needs real weights, but the submodule has meta tensors (offloaded or not loaded)",
            "load the model without --device-map/offload when using --blockwise",
        )
