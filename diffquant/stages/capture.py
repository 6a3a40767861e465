"""Capture the inputs of one submodule during pipeline runs, with a removable forward pre-hook.

Each call of the target is bound to its forward signature, so a captured sample is a dict keyed by
parameter names: exactly what `module(**sample)` takes back. Tensors are detached and copied to
the CPU in their own dtype; an input that is the same tensor, unchanged, as at an earlier step of
the same prompt (text embeddings, time ids, Flux's ids) is copied once and handed on again, which
is what keeps capture cheap. Removing the hook leaves the module exactly as it was.

`capture_prompts` is the capture loop of stage one, for a preset's pipeline and a live one alike:
it runs the pipeline once per prompt with the hook on the target and a `CalibrationWriter` taking
the samples, and returns the finished manifest.

Example:
    >>> from diffquant.models.loading import load_pipeline
    >>> from diffquant.models.presets import resolve_model
    >>> pipe = load_pipeline(resolve_model("tiny-sdxl"))
    >>> samples = []
    >>> with SubmoduleInputCapture(pipe.unet, samples.append) as capture:
    ...     capture.start_prompt(0)
    ...     images = pipe("a cat", num_inference_steps=3, height=64, width=64).images
    >>> [(sample.prompt_index, sample.step) for sample in samples]
    [(0, 0), (0, 1), (0, 2)]
    >>> samples[0].kwargs["sample"].device.type, samples[0].kwargs["encoder_hidden_states"] is samples[1].kwargs["encoder_hidden_states"]
    ('cpu', True)
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_map_only
from tqdm.auto import tqdm

from diffquant.artifacts.calibration_format import rank_manifest_name, rank_shard_prefix
from diffquant.artifacts.calibration_records import CalibrationManifest
from diffquant.artifacts.calibration_writer import CalibrationWriter, CapturedSample
from diffquant.artifacts.location import ArtifactLocation
from diffquant.errors import ConfigError, DiffquantError

TIMESTEP_NAMES = ("timestep", "timesteps", "t")


class SubmoduleInputCapture:
    """A forward pre-hook that turns every call of `module` into a `CapturedSample` for `sink`."""

    def __init__(self, module: torch.nn.Module, sink: Callable[[CapturedSample], None]) -> None:
        self.module = module
        self.sink = sink
        self.signature = inspect.signature(module.forward)
        self.prompt_index = -1
        self.calls_in_prompt = 0
        self.total_calls = 0
        self._copies: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def __enter__(self) -> "SubmoduleInputCapture":
        self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._copies = {}

    def start_prompt(self, prompt_index: int) -> None:
        """Samples that follow belong to `prompt_index`; step numbering restarts at 0."""
        self.prompt_index = prompt_index
        self.calls_in_prompt = 0
        self._copies = {}

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        bound = self._bind(args, kwargs)
        captured = tree_map_only(torch.Tensor, self._copy_tensor, bound)
        sample = CapturedSample(
            prompt_index=self.prompt_index,
            step=self.calls_in_prompt,
            timestep=_timestep_of(bound),
            kwargs=captured,
        )
        self.calls_in_prompt += 1
        self.total_calls += 1
        self.sink(sample)

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise DiffquantError(
                f"the call of {type(self.module).__name__} does not match its forward signature ({exc})",
                "report this pipeline/model pair; capture needs calls that bind to forward()",
            ) from exc
        arguments: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = self.signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise DiffquantError(
                        f"{type(self.module).__name__} was called with extra positional arguments",
                        "capture supports forward() parameters that can be passed by name",
                    )
            else:
                arguments[name] = value
        return arguments

    def _copy_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        # Inference-mode tensors have no version counter, so an in-place change could not be seen:
        # they are always copied (the writer still stores equal contents once).
        version = None if tensor.is_inference() else tensor._version
        known = self._copies.get(id(tensor))
        if version is not None and known is not None and known[0] is tensor and known[1] == version:
            return known[2]
        copy = tensor.detach().to("cpu", copy=True)
        if version is not None:
            # Keeping `tensor` referenced makes its id unique until the next prompt starts.
            self._copies[id(tensor)] = (tensor, version, copy)
        return copy


def _timestep_of(arguments: dict[str, Any]) -> float | None:
    for name in TIMESTEP_NAMES:
        value = arguments.get(name)
        if isinstance(value, torch.Tensor) and value.numel() > 0:
            return float(value.detach().reshape(-1)[0].float().cpu())
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def capture_prompts(target: torch.nn.Module, out: ArtifactLocation, manifest: CalibrationManifest, prompt_indices: range,
                    call_pipe: Callable[[int], Any], shard_bytes: int, never_called: tuple[str, str], block_size: int,
                    show_progress: bool = True, rank: int = 0, world: int = 1) -> CalibrationManifest:
    """The capture loop: for each prompt index, `call_pipe(index)` runs the pipeline while every
    call of `target` is streamed into `out` from `manifest` on; returns the finished manifest. A
    prompt during which `target` never ran is a ConfigError of `never_called` (what, fix). Rank
    `rank` of a data-parallel run (of `world`) writes its own manifest and shard names; its block
    holds `block_size` prompts, of which `prompt_indices` are left."""
    names = {} if world == 1 else {"manifest_name": rank_manifest_name(rank), "shard_prefix": rank_shard_prefix(rank)}
    progress = {"total": block_size, "initial": block_size - len(prompt_indices), "disable": not show_progress, "position": rank,
                "desc": f"calibrate rank {rank}" if world > 1 else "calibrate"}
    with (
        tqdm(unit="prompt", **progress) as bar,
        CalibrationWriter(out, manifest, shard_bytes, **names) as writer,
        SubmoduleInputCapture(target, writer.add) as capture,
    ):
        for prompt_index in prompt_indices:
            capture.start_prompt(prompt_index)
            with torch.no_grad():
                call_pipe(prompt_index)
            if capture.calls_in_prompt == 0:
                raise ConfigError(*never_called)
            writer.end_prompt(prompt_index)
            bar.update(1)
            bar.set_postfix(samples=capture.total_calls, mb_written=f"{writer.progress.bytes_written / 2**20:.1f}")
        writer.finish()
    return writer.manifest
