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

import contextlib
import copy
import inspect
import math
import typing
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
)
from diffquant.artifacts.calibration_writer import CalibrationWriter
from diffquant.artifacts.location import ArtifactLocation, checked_name
from diffquant.artifacts.locking import OutputLock
from diffquant.artifacts.replace import OWN_NAME, RANK_MANIFEST, owned_files, recover_generation, recover_switch, refuse_nested, replacing
from diffquant.artifacts.shard_formats import ShardFormat
from diffquant.errors import ArtifactError, ConfigError
from diffquant.artifacts.fingerprint import module_fingerprint, weights_fingerprint
from diffquant.models.live import check_call_kwargs, detect_family, jsonable_kwargs, scheduler_record, sequence_sha256, state_sha256
from diffquant.models.loading import get_target, load_pipeline, seeded_generator
from diffquant.models.submodule import load_submodule
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
        if isinstance(self.shard_size_mb, bool) or not isinstance(self.shard_size_mb, (int, float)) or not math.isfinite(self.shard_size_mb) \
                or self.shard_size_mb <= 0:
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
    if not preset.is_tiny and Path(preset.source).expanduser().is_dir():
        refuse_nested(out, Path(preset.source).expanduser(), "model directory", "--out")
    # One writer per output: rank 0 holds the lock for the whole data-parallel run.
    with OutputLock(out) if ranks.is_main else contextlib.nullcontext():
        return _calibrate_into(out, settings, preset, prompt_set, pipeline_kwargs, identity, ranks, show_progress)


def _calibrate_into(out: ArtifactLocation, settings: CalibrationSettings, preset: ModelPreset, prompt_set: PromptSet,
                    pipeline_kwargs: dict[str, Any], identity: dict[str, Any], ranks: Ranks, show_progress: bool) -> CalibrationResult:
    existing, replaced = _existing_run(out, identity, settings.overwrite, ranks)
    if existing is not None and existing["status"] == "complete" and "rank" not in existing:
        _check_same_weights(out, existing, load_submodule(preset, device="cpu"))
        return CalibrationResult(out.target, existing, existing["num_prompts_done"], already_complete=True, is_main_rank=ranks.is_main)

    device = ranks.device(identity["device"])
    pipe = load_pipeline(preset, device=device, device_map=settings.device_map, offload=settings.offload)
    _check_pipeline_kwargs(pipe, pipeline_kwargs)
    target = get_target(pipe, preset)
    if existing is not None:
        _check_same_weights(out, existing, target)
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

    # An --overwrite is built beside the old artifact (every rank into the same place) and published in one step.
    with replacing(out, replaced, publisher=ranks.is_main) as build:
        final = capture_prompts(
            target, build.location, manifest, range(start, block.stop), call_pipe, int(settings.shard_size_mb * (1 << 20)),
            never_called=(f"the pipeline never called its {preset.target!r} submodule",
                          "pass --target with the submodule that runs at every denoising step (unet or transformer)"),
            progress={"total": len(block), "initial": start - block.start, "desc": f"calibrate{f' rank {ranks.rank}' if ranks.world > 1 else ''}",
                      "disable": not show_progress, "position": ranks.rank},
            writer_names=names,
        )
        if ranks.world > 1:
            ranks.barrier()
            if ranks.is_main:
                final = merge_rank_manifests(build.location, ranks.world)
    final = build.published or final
    if ranks.world > 1:
        ranks.barrier()
    return CalibrationResult(out.target, final, done_before, already_complete=False, is_main_rank=ranks.is_main)


def _check_same_weights(out: ArtifactLocation, manifest: dict[str, Any], target: torch.nn.Module) -> None:
    """Refuse to resume or to call complete a run whose model's weights have changed since."""
    recorded = manifest.get("model", {}).get("target_weights_sha256")
    if recorded is not None and recorded != weights_fingerprint(target):
        raise ArtifactError(
            f"{out} holds a calibration run of {manifest['model'].get('name')!r} whose weights differ from the model's now "
            "(fine-tuned, fused or re-saved since)",
            "calibrate into another --out, or pass --overwrite to replace the run",
        )


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
    with OutputLock(location):
        return _calibrate_pipe_into(location, pipe, module, target, prompt_set, preset, identity, live, scheduler, steps, seed, device,
                                    pipeline_kwargs, prompt_kwargs, overwrite, shard_size_mb, show_progress)


def _calibrate_pipe_into(location: ArtifactLocation, pipe: Any, module: torch.nn.Module, target: str, prompt_set: PromptSet,
                         preset: ModelPreset, identity: dict[str, Any], live: dict[str, Any], scheduler: dict[str, Any], steps: int,
                         seed: int, device: str, pipeline_kwargs: dict[str, Any], prompt_kwargs: Callable[[int], dict[str, Any]] | None,
                         overwrite: bool, shard_size_mb: float, show_progress: bool) -> CalibrationResult:
    existing, replaced = _existing_run(location, identity, overwrite, Ranks())
    if existing is not None:
        _check_same_weights(location, existing, module)
    if existing is not None and existing["status"] == "complete":
        return CalibrationResult(location.target, existing, existing["num_prompts_done"], already_complete=True)
    manifest = existing or _new_manifest(identity, preset, prompt_set, module)
    manifest["model"]["target_state_sha256"] = live["target_state_sha256"]
    manifest["pipeline"].update(scheduler=scheduler, prompt_kwargs_sha256=live["prompt_kwargs_sha256"])
    done_before = manifest["num_prompts_done"]

    def call_pipe(prompt_index: int) -> None:
        pipe(prompt_set.prompts[prompt_index], num_inference_steps=steps, generator=seeded_generator(seed, prompt_index, device),
             output_type="latent", **pipeline_kwargs, **(prompt_kwargs(prompt_index) if prompt_kwargs else {}))

    with replacing(location, replaced) as build:
        final = capture_prompts(
            module, build.location, manifest, range(done_before, len(prompt_set)), call_pipe, int(shard_size_mb * (1 << 20)),
            never_called=(f"{type(pipe).__name__}(...) never called its {target!r} ({type(module).__name__})",
                          "pass the submodule that runs at every denoising step, e.g. pipe.unet or pipe.transformer"),
            progress={"total": len(prompt_set), "initial": done_before, "desc": "calibrate", "disable": not show_progress},
        )
    return CalibrationResult(location.target, build.published or final, done_before, already_complete=False)


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
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed = value  # not a YAML scalar: the text itself
        if not isinstance(parsed, (type(None), bool, int, float, str)):
            raise ConfigError(f"--set {pair!r} is a {type(parsed).__name__}, not a scalar", "pass a number, true/false, or text")
        kwargs[key.strip()] = parsed
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


def _prepare_output(out: ArtifactLocation, identity: dict[str, Any], overwrite: bool) -> tuple[dict[str, Any] | None, set[str] | None]:
    """Create `out`; return the manifest of a run to resume (or None for a fresh start), and, for
    an `--overwrite`, the names of the old artifact's files (the new one is built beside it and
    published in one step, `replace.replacing`).

    diffquant deletes only in a directory that holds one of its manifests, and there only the
    files the manifest lists and its own names (`owned_files`)."""
    if out.local is not None:
        recover_switch(out.local)
    else:
        recover_generation(out)
    out.make()
    entries = out.names()
    if entries and all(OWN_NAME.match(name) and name.endswith(PARTIAL_SUFFIX) for name in entries):
        for name in entries:  # killed while writing the very first manifest
            out.remove(name)
        entries = []
    if not entries:
        return None, None
    has_manifest = out.is_file(MANIFEST_NAME)
    rank_manifests = [name for name in entries if RANK_MANIFEST.match(name)]
    if not has_manifest and not rank_manifests:
        raise ArtifactError(
            f"output directory {out} is not empty and holds no calibration manifest, so diffquant will not write or delete there"
            + (" (--overwrite replaces only diffquant artifacts)" if overwrite else ""),
            "choose an empty or new --out",
        )
    if overwrite:
        return None, owned_files(out)
    if not has_manifest:
        parts = [out.read_json(name) for name in rank_manifests]
        if not any(part.get("shards") for part in parts):  # no rank committed anything: start afresh
            for name in sorted(owned_files(out)):
                out.remove(name)
            return None, None
        _check_identity(out, parts[0], identity)
        return None, None
    manifest = read_manifest(out)
    if manifest["status"] != "complete" and not manifest["shards"]:
        # A run that failed or was killed before committing a shard holds nothing worth keeping,
        # so it does not bind the directory to its settings.
        for name in sorted(owned_files(out)):
            out.remove(name)
        return None, None
    _check_identity(out, manifest, identity)
    if manifest["status"] != "complete":
        _drop_uncommitted_files(out, manifest, SHARD_PREFIX)
    return manifest, None


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


def _existing_run(out: ArtifactLocation, identity: dict[str, Any], overwrite: bool, ranks: Ranks) -> tuple[dict[str, Any] | None, set[str] | None]:
    """The manifest this process resumes from: rank 0 checks and prepares `out` while the other
    ranks wait; then a data-parallel rank takes the merged manifest (when the run is complete) or
    its own rank manifest. None means a fresh start. An `--overwrite` starts afresh on every rank,
    each building into the replacement (only rank 0 knows, and later deletes, the old files)."""
    existing, replaced = _prepare_output(out, identity, overwrite) if ranks.is_main else (None, None)
    ranks.barrier()
    if ranks.world > 1 and overwrite:
        if not ranks.is_main:
            replaced = set() if out.names() else None  # rank 0 waits at the next barrier: `out` is as it left it
        ranks.barrier()
        return None, replaced
    if ranks.world > 1:
        merged = read_manifest(out) if out.is_file(MANIFEST_NAME) else None
        existing = merged if merged is not None else _rank_resume_state(out, identity, ranks.rank)
    return existing, replaced


def _drop_uncommitted_files(out: ArtifactLocation, manifest: dict[str, Any], prefix: str) -> None:
    """Delete what a killed run (or rank) left behind that its manifest does not list, among the
    files of its own shard prefix (in a store, a shard written in place but never committed);
    check the listed shards."""
    listed = {checked_name(shard["file"], f"{out}/{MANIFEST_NAME}") for shard in manifest["shards"]}
    for name in out.names():
        if not name.startswith(prefix) or not OWN_NAME.match(name):
            continue
        if name.endswith(PARTIAL_SUFFIX) or name not in listed:
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
            "target_weights_sha256": weights_fingerprint(target),
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
    """Refuse `--set` keywords that `pipe(...)` does not name, values whose type its annotation
    does not allow (`height=abc`, `guidance_scale=` for a float), and sizes the VAE cannot take."""
    # Named parameters only: pipelines that also take **kwargs drop unknown names silently.
    parameters = {name: p for name, p in inspect.signature(pipe.__call__).parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        raise ConfigError(
            f"{type(pipe).__name__} does not accept {', '.join(unknown)}",
            f"--set takes keywords of pipe(...), e.g. {', '.join(sorted(p for p in parameters if p in ('height', 'width', 'guidance_scale', 'max_sequence_length', 'negative_prompt')))}",
        )
    try:
        hints = typing.get_type_hints(pipe.__call__)
    except Exception:  # an annotation that does not evaluate: fall back to the raw ones
        hints = {name: p.annotation for name, p in parameters.items()}
    for name, value in kwargs.items():
        allowed = _simple_types(hints.get(name, inspect.Parameter.empty))
        if allowed is not None and not _value_fits(value, allowed):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise ConfigError(f"--set {name}={value!r} is a {type(value).__name__}, {type(pipe).__name__} takes {names}",
                              f"write e.g. --set {name}={_example(allowed)}")
    factor = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    for name in ("height", "width"):
        value = kwargs.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % factor):
            raise ConfigError(f"--set {name}={value!r} is not a positive multiple of {factor}", f"use e.g. --set {name}={factor * 32}")


def _simple_types(annotation: Any) -> tuple[type, ...] | None:
    """The scalar types an annotation allows (int, float, str, bool, None), or None when it allows
    anything else too (lists, tensors, generators): then the pipeline checks the value itself."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return None
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)) else (annotation,)
    if not all(option in (int, float, str, bool, type(None)) for option in options):
        return None
    return tuple(options)


def _value_fits(value: Any, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return isinstance(value, allowed)


def _example(allowed: tuple[type, ...]) -> str:
    return {int: "512", float: "5.0", str: "text", bool: "true"}.get(next(t for t in allowed if t is not type(None)), "VALUE") if any(t is not type(None) for t in allowed) else "null"


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
