"""Stage one: run the pipeline over the prompts and stream the target submodule's inputs to disk.

`calibrate_pipe` is the stage, on a pipeline object: `diffquant.calibrate` hands it the user's
pipe, and `calibrate(CalibrationSettings)`, the command line's, resolves the preset, the prompts and
the `--set` keywords, loads the preset's pipeline and hands it over the same way. For every
prompt, the pipeline generates with a generator seeded from (seed, prompt index) while a forward
pre-hook captures each call of the target (`stages/capture.py`); a writer thread writes
deduplicated, size-bounded shards and commits each to `manifest.json`. The manifest records the
run's settings (`artifacts/calibration_records.py`): a preset's run records the preset, a live
pipe's what can be read off the object (`models/live.py`). Re-running with the same settings
resumes after the last committed prompt and ends with the same samples, bit for bit, as an
uninterrupted run; other settings into the same directory are refused unless `--overwrite`
(`artifacts/calibration_run.py`, which also merges the manifests of data-parallel ranks).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from diffquant.artifacts.calibration_format import json_sha256
from diffquant.artifacts.calibration_records import CalibrationManifest, RankRecord
from diffquant.artifacts.calibration_run import check_same_weights, check_shared_store, merge_ranks, open_run
from diffquant.artifacts.location import ArtifactLocation
from diffquant.artifacts.locking import OutputLock
from diffquant.artifacts.replace import refuse_nested, replacing
from diffquant.artifacts.shard_formats import ShardFormat
from diffquant.errors import ConfigError
from diffquant.models.live import check_call_kwargs, check_set_kwargs, describe_live_pipe, new_manifest, run_settings
from diffquant.models.loading import get_target, load_pipeline, seeded_generator
from diffquant.models.presets import ModelPreset, resolve_model
from diffquant.paths import ARTIFACTS_DIR, resolve_device
from diffquant.prompts import PromptSet, load_prompts
from diffquant.stages.capture import capture_prompts
from diffquant.stages.ranks import Ranks, current_ranks

DEFAULT_NUM_PROMPTS = 10
DEFAULT_SHARD_SIZE_MB = 256.0
RESERVED_PIPELINE_KWARGS = frozenset({"prompt", "num_inference_steps", "generator", "output_type", "return_dict"})


@dataclass(frozen=True)
class CalibrationSettings:
    """Everything that decides the content of a calibration artifact (and `out`, where it goes)."""

    model: str
    out: Path | str | None = None
    prompts: str | None = None
    num_prompts: int | None = DEFAULT_NUM_PROMPTS
    shuffle: bool = False
    steps: int | None = None
    seed: int = 0
    shard_size_mb: float = DEFAULT_SHARD_SIZE_MB
    device: str = "auto"
    dtype: str | None = None
    target: str | None = None
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    shard_format: str = "safetensors"
    compression: str = "none"
    device_map: str | None = None
    offload: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.shard_size_mb, bool) or not isinstance(self.shard_size_mb, (int, float)) or not math.isfinite(self.shard_size_mb) \
                or self.shard_size_mb <= 0:
            raise ConfigError(f"--shard-size-mb {self.shard_size_mb} is not positive", "pass a size in MB > 0, e.g. 256")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"--steps {self.steps} is not allowed", "pass --steps >= 1")
        ShardFormat(self.shard_format, self.compression)  # validates both


@dataclass(frozen=True)
class CalibrationResult:
    out: Path | str
    record: CalibrationManifest
    resumed_from_prompt: int
    already_complete: bool
    is_main_rank: bool = True

    @property
    def manifest(self) -> dict[str, Any]:
        """The final manifest as the JSON document written to `manifest.json`."""
        return self.record.to_json()


@dataclass(frozen=True)
class PresetRun:
    """The command line's run of a preset: what the artifact records in place of the live pipe's
    description, with its shard format, placement and data-parallel ranks."""

    preset: ModelPreset
    settings: CalibrationSettings
    ranks: Ranks


def calibrate(settings: CalibrationSettings, show_progress: bool = True) -> CalibrationResult:
    """The command line's stage one: resolve `settings`, load the preset's pipeline, `calibrate_pipe` it."""
    preset = resolve_model(settings.model, settings.target).with_overrides(torch_dtype=settings.dtype, steps=settings.steps)
    prompt_set = load_prompts(settings.prompts, settings.num_prompts, seed=settings.seed, shuffle=settings.shuffle)
    pipeline_kwargs = {**preset.pipeline_kwargs, **settings.pipeline_kwargs}
    reserved = sorted(set(pipeline_kwargs) & RESERVED_PIPELINE_KWARGS)
    if reserved:
        raise ConfigError(f"--set {', '.join(reserved)} is decided by diffquant itself",
                          "use --steps for the step count and --seed for the generators; drop the --set")
    ranks = current_ranks(resolve_device(settings.device))
    pipe = load_pipeline(preset, device=ranks.device(resolve_device(settings.device)), device_map=settings.device_map, offload=settings.offload)
    get_target(pipe, preset)  # a one-line error for a --target the pipeline does not have
    check_set_kwargs(pipe, pipeline_kwargs)
    return calibrate_pipe(pipe, preset.target, prompt_set, settings.out, steps=preset.steps, seed=settings.seed,
                          pipeline_kwargs=pipeline_kwargs, overwrite=settings.overwrite, shard_size_mb=settings.shard_size_mb,
                          show_progress=show_progress, preset_run=PresetRun(preset, settings, ranks))


def calibrate_pipe(pipe: Any, target: str, prompt_set: PromptSet, out: Path | str | None, *, steps: int, seed: int = 0,
                   pipeline_kwargs: dict[str, Any] | None = None, prompt_kwargs: Callable[[int], dict[str, Any]] | None = None,
                   overwrite: bool = False, shard_size_mb: float = DEFAULT_SHARD_SIZE_MB, show_progress: bool = True,
                   preset_run: PresetRun | None = None) -> CalibrationResult:
    """Capture `pipe.<target>` while `pipe(prompt, num_inference_steps=steps, generator=..., output_type="latent",
    **pipeline_kwargs, **prompt_kwargs(i))` runs for each prompt i. Without `preset_run` the artifact records the live
    pipe (`describe_live_pipe`): its class, scheduler, the target's fingerprints and the per-prompt arguments' hash."""
    pipeline_kwargs, module = dict(pipeline_kwargs or {}), getattr(pipe, target)
    shard_bytes = int(shard_size_mb * (1 << 20))
    if preset_run is None:
        check_call_kwargs(pipe, {**pipeline_kwargs, **(prompt_kwargs(0) if prompt_kwargs else {})}, RESERVED_PIPELINE_KWARGS, "keyword")
        described = describe_live_pipe(pipe, target, steps, pipeline_kwargs, prompt_kwargs, len(prompt_set))
        preset, ranks, device, placement = described.preset, Ranks(), described.device, None
        record = run_settings(preset, prompt_set, preset.pipeline_kwargs, seed=seed, device=device, shard_size_bytes=shard_bytes,
                              shard_format=ShardFormat().describe(), live=described.live)
    else:
        preset, ranks, settings = preset_run.preset, preset_run.ranks, preset_run.settings
        device, placement = ranks.device(resolve_device(settings.device)), {"device_map": settings.device_map, "offload": settings.offload}
        record = run_settings(preset, prompt_set, pipeline_kwargs, seed=seed, device=resolve_device(settings.device), shard_size_bytes=shard_bytes,
                              shard_format=ShardFormat(settings.shard_format, settings.compression).describe(), num_processes=ranks.world)
    location = ArtifactLocation(out or ARTIFACTS_DIR / "calib" / f"{preset.name}-{json_sha256(record.to_json())[:8]}")
    check_shared_store(location, ranks.world)
    if preset_run is not None and not preset.is_tiny and Path(preset.source).expanduser().is_dir():
        refuse_nested(location, Path(preset.source).expanduser(), "model directory", "--out")
    # One writer per output: rank 0 holds the lock for the whole data-parallel run.
    with OutputLock(location) if ranks.is_main else contextlib.nullcontext():
        opened = open_run(location, record, overwrite, ranks)
        if opened.manifest is not None:
            check_same_weights(location, opened.manifest, module)
        if opened.complete:
            return CalibrationResult(location.target, opened.manifest, opened.manifest.num_prompts_done, True, ranks.is_main)
        manifest = opened.manifest or new_manifest(record, preset, prompt_set, module, placement, None if preset_run else described.scheduler)
        block = ranks.prompt_block(len(prompt_set))
        if ranks.world > 1:
            manifest.rank = RankRecord(ranks.rank, ranks.world, (block.start, block.stop))
        done_before = manifest.num_prompts_done
        start = block.start + done_before

        def call_pipe(index: int) -> None:
            pipe(prompt_set.prompts[index], num_inference_steps=steps, generator=seeded_generator(seed, index, device), output_type="latent",
                 **pipeline_kwargs, **(prompt_kwargs(index) if prompt_kwargs else {}))

        never_called = (f"{type(pipe).__name__}(...) never called its {target!r} ({type(module).__name__})",
                        "pass --target with the submodule that runs at every denoising step (unet or transformer)" if preset_run else
                        "pass the submodule that runs at every denoising step, e.g. pipe.unet or pipe.transformer")
        # An --overwrite is built beside the old artifact (every rank into the same place) and published in one step.
        with replacing(location, opened.replaced, publisher=ranks.is_main) as build:
            final = capture_prompts(module, build.location, manifest, range(start, block.stop), call_pipe, shard_bytes, never_called,
                                    len(block), show_progress, ranks.rank, ranks.world)
            final = merge_ranks(build.location, ranks, final)
        final = CalibrationManifest.from_json(build.published, f"{location}/manifest.json") if build.published is not None else final
        if ranks.world > 1:
            ranks.barrier()  # every rank returns once rank 0 has published
    return CalibrationResult(location.target, final, done_before, already_complete=False, is_main_rank=ranks.is_main)
