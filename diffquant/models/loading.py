"""Load a preset's pipeline, pick its target submodule, and seed its per-prompt generators.

Every source goes through the pipeline class's own `from_pretrained`: a hub id, a local pipeline
directory, or `tiny://<family>`, which is first resolved to the directory the tiny builder saved.
So the tiny models exercise exactly the loading path of the real ones. Loader failures become
one-line `ConfigError`s that name the source and the fix.

Example:
    >>> from diffquant.models.presets import resolve_model
    >>> preset = resolve_model("tiny-sdxl")
    >>> pipe = load_pipeline(preset)
    >>> type(get_target(pipe, preset)).__name__
    'UNet2DConditionModel'
    >>> generator = seeded_generator(seed=0, prompt_index=0, device="cpu")
    >>> pipe("a cat", generator=generator, height=64, width=64, num_inference_steps=2).images[0].size
    (64, 64)
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from diffquant.errors import ConfigError, DiffquantError
from diffquant.models.presets import TINY_SCHEME, TORCH_DTYPES, ModelPreset
from diffquant.models.tiny import quiet_progress_bars, tiny_pipeline_dir

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

# A prime larger than any prompt count, so (seed, prompt_index) -> seed is one-to-one for every
# prompt index below it, and nearby seeds do not share prompt streams.
_PROMPT_SEED_STRIDE = 1_000_003
_MAX_ERROR_CHARS = 200


OFFLOAD_MODES = ("model", "sequential")


def load_pipeline(
    preset: ModelPreset, device: str = "cpu", torch_dtype: str | None = None,
    device_map: str | None = None, offload: str | None = None,
) -> DiffusionPipeline:
    """Load the preset's pipeline with `from_pretrained`, place it, hide progress bars.

    Placement, for models larger than one device: `device_map` (e.g. `balanced`) is passed to
    `from_pretrained`, which spreads the components over the visible devices; `offload` keeps the
    weights in CPU memory and moves them to `device` as they run (`model`: a whole component at a
    time, `enable_model_cpu_offload`; `sequential`: a layer at a time). Otherwise the pipeline
    moves to `device`. `torch_dtype` overrides the preset's (one of float32, float16, bfloat16).
    Tiny sources are built on first use into `diffquant.paths.tiny_model_cache()`.

    Example:
        >>> from diffquant.models.presets import resolve_model
        >>> load_pipeline(resolve_model("tiny-flux")).transformer.dtype
        torch.bfloat16
    """
    dtype_name = torch_dtype or preset.torch_dtype
    if dtype_name not in TORCH_DTYPES:
        raise ConfigError(
            f"torch_dtype {dtype_name!r} is not allowed", f"use one of {', '.join(TORCH_DTYPES)}"
        )
    if offload is not None and offload not in OFFLOAD_MODES:
        raise ConfigError(f"offload {offload!r} is not allowed", f"use one of {', '.join(OFFLOAD_MODES)}")
    if offload is not None and device_map is not None:
        raise ConfigError("--device-map and --offload both place the weights", "pass only one of them")
    if offload == "sequential" and torch.device(device).type == "cpu":
        # accelerate's layer-by-layer hooks fail when the execution device is the CPU itself.
        raise ConfigError("--offload sequential moves layers from CPU memory to a GPU", "pass --device cuda, or use --offload model")
    pipeline_cls = _pipeline_class(preset)
    source = resolve_source(preset)
    dtype_kwarg = {_dtype_keyword(): getattr(torch, dtype_name)}
    placement = {"device_map": device_map} if device_map is not None else {}
    try:
        with quiet_progress_bars() if preset.is_tiny else nullcontext():
            pipe = pipeline_cls.from_pretrained(
                source, variant=preset.variant, revision=preset.revision, **dtype_kwarg, **placement
            )
    except DiffquantError:
        raise
    except Exception as exc:  # noqa: BLE001 - every loader failure becomes one line, chained
        raise loader_error(preset, source, exc) from exc
    try:
        if offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        elif offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=device)
        elif device_map is None:
            # Half precision runs on the CPU with current torch; diffusers' warning predates that.
            pipe.to(device, silence_dtype_warnings=True)
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise ConfigError(
            f"cannot move model {preset.name!r} to device {device!r} ({_first_line(exc)})",
            "pass a device this torch build can use, e.g. --device cpu or --device cuda",
        ) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


def get_target(pipe: DiffusionPipeline, preset: ModelPreset) -> torch.nn.Module:
    """The submodule diffquant quantizes: `getattr(pipe, preset.target)`.

    Raises ConfigError listing the pipeline's nn.Module components when there is no such module.
    """
    module = getattr(pipe, preset.target, None)
    if isinstance(module, torch.nn.Module):
        return module
    modules = sorted(
        name for name, value in pipe.components.items() if isinstance(value, torch.nn.Module)
    )
    raise ConfigError(
        f"{type(pipe).__name__} of model {preset.name!r} has no submodule {preset.target!r}",
        f"set target to one of its modules: {', '.join(modules) or '(none)'}",
    )


def seeded_generator(seed: int, prompt_index: int, device: str) -> torch.Generator:
    """The generator for one prompt, seeded from (seed, prompt_index) alone.

    A resumed run therefore reproduces each prompt exactly, whichever prompts ran before it.
    Distinct prompt indices below 1_000_003 under one seed never share a stream.

    Example:
        >>> a = torch.randn(2, generator=seeded_generator(7, 3, "cpu"))
        >>> torch.equal(a, torch.randn(2, generator=seeded_generator(7, 3, "cpu")))
        True
    """
    if seed < 0 or prompt_index < 0:
        raise ConfigError(
            f"seed {seed} and prompt index {prompt_index} must be >= 0", "pass a non-negative seed"
        )
    # torch seeds are 64-bit; the modulus keeps huge seeds valid without changing small ones.
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * _PROMPT_SEED_STRIDE + prompt_index) % 2**63)
    return generator


def _dtype_keyword() -> str:
    """`dtype` where the installed diffusers deprecates `torch_dtype` for it, else `torch_dtype`."""
    from diffusers.utils import deprecation_utils

    deprecated = hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE")
    return "dtype" if deprecated else "torch_dtype"


def _pipeline_class(preset: ModelPreset) -> type[DiffusionPipeline]:
    import diffusers

    pipeline_cls = getattr(diffusers, preset.pipeline_class, None)
    is_pipeline = isinstance(pipeline_cls, type) and issubclass(
        pipeline_cls, diffusers.DiffusionPipeline
    )
    if not is_pipeline:
        raise ConfigError(
            f"model preset {preset.name!r}: diffusers {diffusers.__version__} has no pipeline "
            f"class {preset.pipeline_class!r}",
            "fix pipeline_class (e.g. StableDiffusionXLPipeline) or use DiffusionPipeline",
        )
    return pipeline_cls


def resolve_source(preset: ModelPreset) -> str:
    """A local directory or hub id that from_pretrained accepts; tiny sources are built here."""
    if preset.is_tiny:
        family = preset.source[len(TINY_SCHEME) :]
        try:
            return str(tiny_pipeline_dir(family))
        except OSError as exc:
            raise ConfigError(
                f"cannot build tiny pipeline {preset.source} ({_first_line(exc)})",
                "set DIFFQUANT_CACHE to a writable directory",
            ) from exc
    path = Path(preset.source).expanduser()
    looks_local = path.is_absolute() or preset.source.startswith((".", "~")) or path.exists()
    if looks_local:
        if not path.is_dir():
            raise ConfigError(
                f"model {preset.name!r}: local source {path} does not exist",
                "point source to a pipeline directory saved with save_pretrained",
            )
        if not (path / "model_index.json").is_file():
            raise ConfigError(
                f"model {preset.name!r}: {path} is not a diffusers pipeline (no model_index.json)",
                "point source to the folder save_pretrained wrote, or a hub snapshot folder",
            )
        return str(path)
    return preset.source


def loader_error(preset: ModelPreset, source: str, exc: Exception) -> ConfigError:
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"cannot load model {preset.name!r} from {source}"
    if preset.revision or preset.variant:
        what += f" (revision {preset.revision or 'main'}, variant {preset.variant or 'none'})"
    chain = _exception_chain(exc)
    if any(isinstance(e, GatedRepoError) for e in chain):
        fix = f"accept the license of {source} on huggingface.co and log in with `hf auth login`"
    elif any(isinstance(e, RevisionNotFoundError) for e in chain):
        fix = "fix the preset's revision (a branch, tag or commit of the repo)"
    elif any(isinstance(e, RepositoryNotFoundError) for e in chain):
        fix = "check the hub id, or log in with `hf auth login` if the repo is private"
    elif preset.is_tiny:
        fix = f"delete {source} so the tiny pipeline is rebuilt"
    elif Path(source).is_dir():
        fix = f"check that {source} is a complete {preset.pipeline_class} saved by save_pretrained"
    elif isinstance(exc, OSError):
        fix = (
            f"it is not in the local Hugging Face cache and the hub is not reachable: download it "
            f"where there is network (`hf download {source}`) and copy the cache (HF_HOME), or "
            f"set the preset's source to a local pipeline directory"
        )
    else:
        variant = f" with {preset.variant} variant files" if preset.variant else ""
        fix = f"check that {source} is a {preset.pipeline_class}{variant}"
    return ConfigError(f"{what}: {type(exc).__name__}: {_first_line(exc)}", fix)


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 1] + "…"
