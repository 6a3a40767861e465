"""Stage one: run the pipeline over the prompts and stream the target submodule's inputs to disk.

For every prompt, the pipeline generates with a generator seeded from (seed, prompt index) while a
forward pre-hook captures each call of the target submodule (`pipe.unet` or `pipe.transformer`).
Samples flow through a bounded queue to a writer thread that writes deduplicated, size-bounded
safetensors shards and commits each one to `manifest.json`. The manifest records the settings, so
re-running the same command resumes after the last committed prompt and ends with the same
samples, bit for bit, as an uninterrupted run; a different command into the same directory is
refused unless `--overwrite`.
"""

from __future__ import annotations

import copy
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from diffquant import __version__
from diffquant.artifacts.atomic import PARTIAL_SUFFIX
from diffquant.artifacts.calibration_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SHARD_PREFIX,
    empty_contents,
    json_sha256,
    rank_manifest_name,
    rank_shard_prefix,
    read_manifest,
    remove_artifact_files,
)
from diffquant.artifacts.calibration_writer import CalibrationWriter
from diffquant.artifacts.location import ArtifactLocation
from diffquant.artifacts.shard_formats import ShardFormat
from diffquant.errors import ArtifactError, ConfigError
from diffquant.artifacts.fingerprint import module_fingerprint
from diffquant.models.live import check_call_kwargs, detect_family, jsonable_kwargs, scheduler_record, sequence_sha256, state_sha256
from diffquant.models.loading import get_target, load_pipeline, seeded_generator
from diffquant.models.presets import ModelPreset, resolve_model
from diffquant.paths import ARTIFACTS_DIR, resolve_device
from diffquant.prompts import PromptSet, load_prompts
from diffquant.stages.capture import SubmoduleInputCapture
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
        if self.shard_size_mb <= 0:
            raise ConfigError(f"--shard-size-mb {self.shard_size_mb} is not positive", "pass a size in MB > 0, e.g. 256")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"--steps {self.steps} is not allowed", "pass --steps >= 1")
        ShardFormat(self.shard_format, self.compression)  # validates both


@dataclass(frozen=True)
class CalibrationResult:
    out: Path | str
    manifest: dict[str, Any]
    resumed_from_prompt: int
    already_complete: bool
    is_main_rank: bool = True


def calibrate(settings: CalibrationSettings, show_progress: bool = True) -> CalibrationResult:
    """Run stage one as described in the module docstring; returns the final manifest."""
    preset = resolve_model(settings.model, settings.target).with_overrides(torch_dtype=settings.dtype, steps=settings.steps)
    prompt_set = load_prompts(settings.prompts, settings.num_prompts, seed=settings.seed, shuffle=settings.shuffle)
    pipeline_kwargs = {**preset.pipeline_kwargs, **settings.pipeline_kwargs}
    reserved = sorted(set(pipeline_kwargs) & RESERVED_PIPELINE_KWARGS)
    if reserved:
        raise ConfigError(
            f"--set {', '.join(reserved)} is decided by diffquant itself",
            "use --steps for the step count and --seed for the generators; drop the --set",
        )
    ranks = current_ranks(resolve_device(settings.device))
    identity = _run_identity(settings, preset, prompt_set, pipeline_kwargs, ranks.world)
    out = ArtifactLocation(settings.out or ARTIFACTS_DIR / "calib" / f"{preset.name}-{json_sha256(identity)[:8]}")
    check_shared_store(out, ranks.world)
    existing = _existing_run(out, identity, settings.overwrite, ranks)
    if existing is not None and existing["status"] == "complete" and "rank" not in existing:
        return CalibrationResult(out.target, existing, existing["num_prompts_done"], already_complete=True, is_main_rank=ranks.is_main)

    device = ranks.device(identity["device"])
    pipe = load_pipeline(preset, device=device, device_map=settings.device_map, offload=settings.offload)
    _check_pipeline_kwargs(pipe, pipeline_kwargs)
    target = get_target(pipe, preset)
    block = ranks.prompt_block(len(prompt_set.prompts))
    manifest = existing or _new_manifest(identity, preset, prompt_set, target, {"device_map": settings.device_map, "offload": settings.offload})
    if ranks.world > 1:
        manifest["rank"] = {"index": ranks.rank, "of": ranks.world, "prompts": [block.start, block.stop]}
    done_before = manifest["num_prompts_done"]
    start = block.start + done_before
    prompts = prompt_set.prompts
    names = {} if ranks.world == 1 else {"manifest_name": rank_manifest_name(ranks.rank), "shard_prefix": rank_shard_prefix(ranks.rank)}

    def call_pipe(prompt_index: int) -> None:
        pipe(prompts[prompt_index], num_inference_steps=preset.steps, generator=seeded_generator(settings.seed, prompt_index, device),
             output_type="latent", **pipeline_kwargs)

    final = capture_prompts(
        target, out, manifest, range(start, block.stop), call_pipe, int(settings.shard_size_mb * (1 << 20)),
        never_called=(f"the pipeline never called its {preset.target!r} submodule",
                      "pass --target with the submodule that runs at every denoising step (unet or transformer)"),
        progress={"total": len(block), "initial": start - block.start, "desc": f"calibrate{f' rank {ranks.rank}' if ranks.world > 1 else ''}",
                  "disable": not show_progress, "position": ranks.rank},
        writer_names=names,
    )
    if ranks.world > 1:
        ranks.barrier()
        if ranks.is_main:
            final = merge_rank_manifests(out, ranks.world)
        ranks.barrier()
    return CalibrationResult(out.target, final, done_before, already_complete=False, is_main_rank=ranks.is_main)


def capture_prompts(target: torch.nn.Module, out: ArtifactLocation, manifest: dict[str, Any], prompt_indices: range,
                    call_pipe: Callable[[int], Any], shard_bytes: int, never_called: tuple[str, str],
                    progress: dict[str, Any], writer_names: dict[str, str] | None = None) -> dict[str, Any]:
    """The capture loop: for each prompt index, `call_pipe(index)` runs the pipeline while every
    call of `target` is streamed into `out`; returns the finished manifest. A prompt during which
    `target` never ran is a ConfigError of `never_called` (what, fix)."""
    with (
        tqdm(unit="prompt", **progress) as bar,
        CalibrationWriter(out, manifest, shard_bytes, **(writer_names or {})) as writer,
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


def calibrate_pipe(pipe: Any, target: str, prompt_set: PromptSet, out: Path | str | None, *, steps: int, seed: int = 0,
                   pipeline_kwargs: dict[str, Any] | None = None, prompt_kwargs: Callable[[int], dict[str, Any]] | None = None,
                   overwrite: bool = False, shard_size_mb: float = DEFAULT_SHARD_SIZE_MB, show_progress: bool = True) -> CalibrationResult:
    """Stage one on a pipeline object the caller holds (`diffquant.calibrate`): `pipe.<target>` is
    captured while `pipe(prompt, num_inference_steps=steps, generator=..., output_type="latent",
    **pipeline_kwargs, **prompt_kwargs(i))` runs for each prompt i.

    The artifact records the live pipe (`diffquant.models.live`): pipeline class, scheduler, the
    target's class, config hash and full state sha256, the family its exclude patterns come from,
    and a hash of the per-prompt arguments; resume and refusal work as in `calibrate`.
    """
    pipeline_kwargs = dict(pipeline_kwargs or {})
    module = getattr(pipe, target)
    first = prompt_kwargs(0) if prompt_kwargs else {}
    check_call_kwargs(pipe, {**pipeline_kwargs, **first}, RESERVED_PIPELINE_KWARGS, "keyword")
    family = detect_family(module)
    base = resolve_model(family) if family else None
    source = str(getattr(pipe, "name_or_path", None) or getattr(pipe.config, "_name_or_path", "") or type(pipe).__name__)
    preset = ModelPreset(
        name=Path(source).name or type(pipe).__name__, family=family or "custom", source=source, pipeline_class=type(pipe).__name__,
        torch_dtype=str(module.dtype).removeprefix("torch."), target=target, steps=steps, pipeline_kwargs=jsonable_kwargs(pipeline_kwargs),
        quant_exclude=base.quant_exclude if base else (), svd_exclude=base.svd_exclude if base else (),
    )
    device = str(getattr(pipe, "_execution_device", None) or pipe.device)  # under cpu offload, where the target runs
    settings = CalibrationSettings(model=preset.name, out=out, seed=seed, shard_size_mb=shard_size_mb, device=device, overwrite=overwrite)
    scheduler = scheduler_record(pipe)
    live = {
        "scheduler_class": scheduler.get("class"),
        "scheduler_config_sha256": json_sha256(scheduler.get("config")),
        **{f"target_{key}": value for key, value in module_fingerprint(module).items()},
        "target_state_sha256": state_sha256(module),
        "prompt_kwargs_sha256": sequence_sha256(map(prompt_kwargs, range(len(prompt_set))), len(prompt_set)) if prompt_kwargs else None,
    }
    identity = {**_run_identity(settings, preset, prompt_set, preset.pipeline_kwargs), "live": live}
    location = ArtifactLocation(out or ARTIFACTS_DIR / "calib" / f"{preset.name}-{json_sha256(identity)[:8]}")
    existing = _existing_run(location, identity, overwrite, Ranks())
    if existing is not None and existing["status"] == "complete":
        return CalibrationResult(location.target, existing, existing["num_prompts_done"], already_complete=True)
    manifest = existing or _new_manifest(identity, preset, prompt_set, module)
    manifest["model"]["target_state_sha256"] = live["target_state_sha256"]
    manifest["pipeline"].update(scheduler=scheduler, prompt_kwargs_sha256=live["prompt_kwargs_sha256"])
    done_before = manifest["num_prompts_done"]

    def call_pipe(prompt_index: int) -> None:
        pipe(prompt_set.prompts[prompt_index], num_inference_steps=steps, generator=seeded_generator(seed, prompt_index, device),
             output_type="latent", **pipeline_kwargs, **(prompt_kwargs(prompt_index) if prompt_kwargs else {}))

    final = capture_prompts(
        module, location, manifest, range(done_before, len(prompt_set)), call_pipe, int(shard_size_mb * (1 << 20)),
        never_called=(f"{type(pipe).__name__}(...) never called its {target!r} ({type(module).__name__})",
                      "pass the submodule that runs at every denoising step, e.g. pipe.unet or pipe.transformer"),
        progress={"total": len(prompt_set), "initial": done_before, "desc": "calibrate", "disable": not show_progress},
    )
    return CalibrationResult(location.target, final, done_before, already_complete=False)


def check_shared_store(out: ArtifactLocation, world: int) -> None:
    """Refuse a `memory://` output for data-parallel ranks: each process has its own memory store."""
    if world > 1 and out.url.startswith("memory://"):
        raise ConfigError(f"--out {out} is a memory:// store, which each rank's process holds apart",
                          "give data-parallel ranks a store they share: a local directory, s3://, gs://")


def merge_rank_manifests(out: ArtifactLocation, world: int) -> dict[str, Any]:
    """Join the rank manifests of a data-parallel run into `manifest.json` (rank order = prompt
    order), then delete them. Sample positions, counters and the schema are combined."""
    parts = [out.read_json(rank_manifest_name(rank)) for rank in range(world)]
    unfinished = [part["rank"]["index"] for part in parts if part["status"] != "complete"]
    if unfinished:
        raise ArtifactError(f"ranks {unfinished} of {out} did not finish", "re-run the same command to resume them")
    merged = copy.deepcopy(parts[0])
    del merged["rank"]
    merged.update(empty_contents())
    for part in parts:
        for shard in part["shards"]:
            merged["shards"].append({**shard, "first_sample": merged["num_samples"]})
            merged["num_samples"] += shard["num_samples"]
        for key in ("num_prompts_done", "raw_bytes", "stored_bytes"):
            merged[key] += part[key]
        for path, entry in part["schema"].items():
            known = merged["schema"].setdefault(path, entry)
            if known != entry:
                merged["schema"][path] = {"const": None, "varies": True} if "const" in entry else {**known, "shape": None, "varies": True}
    out.write_json(MANIFEST_NAME, merged)
    for rank in range(world):
        out.remove(rank_manifest_name(rank))
    return merged


def parse_set_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """`--set KEY=VALUE` pairs to kwargs; values are parsed as YAML scalars (5.0, true, 256, text)."""
    import yaml

    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r} is not KEY=VALUE", "write e.g. --set guidance_scale=5.0")
        kwargs[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return kwargs


def _run_identity(settings: CalibrationSettings, preset: ModelPreset, prompt_set: PromptSet, pipeline_kwargs: dict[str, Any],
                  num_processes: int = 1) -> dict[str, Any]:
    return {
        "model": preset.name,
        "source": preset.source,
        "revision": preset.revision,
        "pipeline_class": preset.pipeline_class,
        "torch_dtype": preset.torch_dtype,
        "variant": preset.variant,
        "target": preset.target,
        "prompts_sha256": prompt_set.sha256,
        "num_prompts": len(prompt_set.prompts),
        "steps": preset.steps,
        "seed": settings.seed,
        "pipeline_kwargs": pipeline_kwargs,
        "device": resolve_device(settings.device),
        "shard_size_bytes": int(settings.shard_size_mb * (1 << 20)),
        "shard_format": ShardFormat(settings.shard_format, settings.compression).describe(),
        "num_processes": num_processes,
    }


def _prepare_output(out: ArtifactLocation, identity: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """Create `out`, and return the manifest of a run to resume (or None for a fresh start)."""
    out.make()
    entries = out.names()
    leftovers = [name for name in entries if name.endswith(PARTIAL_SUFFIX) or name.startswith(".tmp")]
    if entries and len(leftovers) == len(entries):  # killed while writing the very first manifest
        for name in leftovers:
            out.remove(name)
        entries = []
    if not entries:
        return None
    if overwrite:
        remove_artifact_files(out)
        return None
    if not out.is_file(MANIFEST_NAME):
        rank_manifests = [name for name in entries if name.startswith("manifest.rank") and name.endswith(".json")]
        if not rank_manifests:
            raise ArtifactError(
                f"output directory {out} is not empty and holds no calibration manifest",
                "choose an empty --out, or pass --overwrite",
            )
        parts = [out.read_json(name) for name in rank_manifests]
        if not any(part["shards"] for part in parts):  # no rank committed anything: start afresh
            remove_artifact_files(out)
            return None
        _check_identity(out, parts[0], identity)
        return None
    manifest = read_manifest(out)
    if manifest["status"] != "complete" and not manifest["shards"]:
        # A run that failed or was killed before committing a shard holds nothing worth keeping,
        # so it does not bind the directory to its settings.
        remove_artifact_files(out)
        return None
    _check_identity(out, manifest, identity)
    if manifest["status"] != "complete":
        _drop_uncommitted_files(out, manifest, SHARD_PREFIX)
    return manifest


def _rank_resume_state(out: ArtifactLocation, identity: dict[str, Any], rank: int) -> dict[str, Any] | None:
    """The manifest of this rank's earlier, unfinished run (its leftovers removed), or None."""
    if not out.is_file(rank_manifest_name(rank)):
        return None
    manifest = out.read_json(rank_manifest_name(rank))
    _check_identity(out, manifest, identity)
    _drop_uncommitted_files(out, manifest, rank_shard_prefix(rank))
    return manifest


def _check_identity(out: ArtifactLocation, manifest: dict[str, Any], identity: dict[str, Any]) -> None:
    if manifest.get("settings") != identity:
        changed = sorted(key for key in identity if manifest.get("settings", {}).get(key) != identity[key])
        raise ArtifactError(
            f"{out} holds a calibration run with other settings ({', '.join(changed)} differ)",
            "re-run the original command to resume it, choose another --out, or pass --overwrite",
        )


def _existing_run(out: ArtifactLocation, identity: dict[str, Any], overwrite: bool, ranks: Ranks) -> dict[str, Any] | None:
    """The manifest this process resumes from: rank 0 checks and prepares `out` while the other
    ranks wait; then a data-parallel rank takes the merged manifest (when the run is complete) or
    its own rank manifest. None means a fresh start."""
    existing = _prepare_output(out, identity, overwrite) if ranks.is_main else None
    ranks.barrier()
    if ranks.world > 1:
        merged = read_manifest(out) if out.is_file(MANIFEST_NAME) else None
        existing = merged if merged is not None else _rank_resume_state(out, identity, ranks.rank)
    return existing


def _drop_uncommitted_files(out: ArtifactLocation, manifest: dict[str, Any], prefix: str) -> None:
    """Delete what a killed run (or rank) left behind that its manifest does not list, among the
    files of its own shard prefix (in a store, a shard written in place but never committed);
    check the listed shards."""
    listed = {shard["file"] for shard in manifest["shards"]}
    for name in out.names():
        if not name.startswith(prefix) and not (prefix == SHARD_PREFIX and name.startswith(".tmp")):
            continue
        if name.endswith(PARTIAL_SUFFIX) or name.startswith(".tmp") or name not in listed:
            out.remove(name)
    for shard in manifest["shards"]:
        if not out.exists(shard["file"]) or out.size(shard["file"]) != shard["bytes"]:
            raise ArtifactError(
                f"shard {out}/{shard['file']} listed in the manifest is missing or has the wrong size",
                "the artifact was damaged; pass --overwrite to start again",
            )


def _new_manifest(identity: dict[str, Any], preset: ModelPreset, prompt_set: PromptSet, target: torch.nn.Module,
                  placement: dict[str, str | None] | None = None) -> dict[str, Any]:
    placement = placement or {}
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "status": "in_progress",
        "settings": identity,
        "settings_sha256": json_sha256(identity),
        "model": {
            "name": preset.name,
            "family": preset.family,
            "source": preset.source,
            "revision": preset.revision,
            "pipeline_class": preset.pipeline_class,
            "torch_dtype": preset.torch_dtype,
            "variant": preset.variant,
            "target": preset.target,
            "quant_exclude": list(preset.quant_exclude),
            "svd_exclude": list(preset.svd_exclude),
            **{f"target_{key}": value for key, value in module_fingerprint(target).items()},
        },
        "pipeline": {"steps": identity["steps"], "seed": identity["seed"], "kwargs": identity["pipeline_kwargs"], "output_type": "latent"},
        # Placement changes where weights live, not what is computed, so it is no part of the settings.
        "placement": {"device_map": placement.get("device_map"), "offload": placement.get("offload")},
        "prompts": {
            "source": prompt_set.source,
            "count": len(prompt_set.prompts),
            "sha256": prompt_set.sha256,
            "list": list(prompt_set.prompts),
        },
        "library_versions": _library_versions(),
        "shard_format": identity["shard_format"],
        **empty_contents(),
    }


def _check_pipeline_kwargs(pipe: Any, kwargs: dict[str, Any]) -> None:
    # Named parameters only: pipelines that also take **kwargs drop unknown names silently.
    parameters = {name for name, p in inspect.signature(pipe.__call__).parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    unknown = sorted(set(kwargs) - parameters)
    if unknown:
        raise ConfigError(
            f"{type(pipe).__name__} does not accept {', '.join(unknown)}",
            f"--set takes keywords of pipe(...), e.g. {', '.join(sorted(p for p in parameters if p in ('height', 'width', 'guidance_scale', 'max_sequence_length', 'negative_prompt')))}",
        )


def _library_versions() -> dict[str, str]:
    import diffusers
    import safetensors
    import transformers

    return {
        "diffquant": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }
