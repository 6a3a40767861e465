"""Stage two: quantize the target submodule from a calibration artifact, without the pipeline.

The artifact's shards are memory-mapped into a DataLoader; the submodule alone is loaded and
checked against the artifact (class and config hash). The recipe decides which Linear and Conv2d
layers are quantized and how; static input observers see every selected calibration sample in one
pass of `model(**sample)`, then scales are frozen. A few held-out samples, never seen by the
observers, measure each layer's weight and output SQNR and the submodule's output SQNR. The
quantized state dict goes to `model.safetensors` and every scale, spec and figure to
`quant_manifest.json`, which loads back for generation with no calibration data.

A submodule larger than the device is quantized either spread by accelerate (`device_map`, CPU or
disk offload) or block by block (`blockwise`): the weights stay in CPU memory and each block visits
the device while it runs or while its layers are quantized, so the device holds one block plus
the calibration sample.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from diffquant import __version__
from diffquant.artifacts.calibration_reader import CalibrationArtifact, CalibrationDataset, SampleSelection, calibration_loader
from diffquant.artifacts.calibration_format import json_sha256
from diffquant.artifacts.checkpoint import prepare_checkpoint_dir, write_checkpoint
from diffquant.artifacts.locking import OutputLock
from diffquant.artifacts.replace import refuse_nested
from diffquant.artifacts.stats_cache import StatsCache
from diffquant.artifacts.fingerprint import module_fingerprint
from diffquant.quant import activation_stats
from diffquant.quant.activation_stats import STAT_KINDS, WITNESS_FIELDS, WITNESSED_KINDS, LayerActivationStats, check_against_sample, collect_activation_stats, witness_positions, witness_tolerance
from diffquant.quant.histogram import LAYOUT as HISTOGRAM_LAYOUT
from diffquant.errors import ArtifactError, ConfigError
from diffquant.eval.measure import DEFAULT_LAYER_ROWS, capture_layer_inputs, compare_layer, measure_output, median_and_worst
from diffquant.models.blockwise import BlockwiseOnload
from diffquant.models.live import state_sha256
from diffquant.models.presets import preset_of_artifact
from diffquant.models.placement import execution_device, materialized_state_dict, onloaded
from diffquant.models.submodule import load_submodule
from diffquant.paths import ARTIFACTS_DIR, resolve_device
from diffquant.quant.modules import QuantizedLayer
from diffquant.quant.quantizer import (
    LayerPlan,
    build_quantized_layer,
    plan_layers,
    stat_requests,
    swap_layers,
)
from diffquant.quant.recipe import Recipe
from diffquant.recipes import load_recipe

__all__ = ["DEFAULT_LAYER_ROWS", "DEFAULT_MAX_BLOCK_SHARE", "QuantizeResult", "QuantizeSettings", "quantize"]

# Block by block, a block holding more than this share of the submodule's weights is split into its children.
DEFAULT_MAX_BLOCK_SHARE = 0.1
HOLDOUT_RULE = "the default holdout of 4, adapted to a selection of at most 4 samples: max(1, selected // 2)"
NIBBLE_ORDER = "byte = code[2k] | code[2k+1] << 4 along the input dim (low nibble = even index)"


@dataclass(frozen=True)
class QuantizeSettings:
    """Inputs of one quantize run; selection fields override the recipe's `calibration` block."""

    calib: Path | str
    recipe: str
    out: Path | None = None
    device: str = "auto"
    overwrite: bool = False
    limit: int | None = None
    every: int | None = None
    timestep_min: float | None = None
    timestep_max: float | None = None
    uniform_steps: int | None = None
    max_per_step: int | None = None
    holdout: int | None = None
    num_workers: int = 0
    use_stats_cache: bool = True
    device_map: str | None = None
    max_memory: dict[str, str] | None = None
    offload_folder: str | None = None
    blockwise: bool = False
    max_block_share: float | None = None
    layer_rows: int | None = DEFAULT_LAYER_ROWS
    verify: bool = True

    def __post_init__(self) -> None:
        if self.layer_rows is not None and (isinstance(self.layer_rows, bool) or not isinstance(self.layer_rows, int) or self.layer_rows < 1):
            raise ConfigError(f"--layer-rows {self.layer_rows!r} is not allowed",
                              "pass a number of rows per held-out sample (e.g. 256), or 0 for every row")
        if self.blockwise and (self.device_map is not None or self.offload_folder is not None):
            raise ConfigError("--blockwise and --device-map/--offload-folder are two ways to place the submodule",
                              "use --blockwise (one block on the device at a time) or --device-map, not both")
        if self.max_block_share is not None and not self.blockwise:
            raise ConfigError("--max-block-share only applies block by block", "add --blockwise, or drop --max-block-share")
        if self.max_block_share is not None and not 0.0 < self.max_block_share <= 1.0:
            raise ConfigError(f"--max-block-share {self.max_block_share} is not in (0, 1]", "pass a share of the weights, e.g. 0.1")
        if self.holdout is not None and self.holdout < 1:
            raise ConfigError(f"--holdout {self.holdout} is not allowed", "hold out at least 1 sample for the quality report")
        if self.num_workers < 0:
            raise ConfigError(f"--num-workers {self.num_workers} is negative", "pass 0 (read in the main process) or more")


@dataclass(frozen=True)
class QuantizeResult:
    out: Path | None
    manifest: dict[str, Any]
    model: torch.nn.Module


def quantize(settings: QuantizeSettings, show_progress: bool = True) -> QuantizeResult:
    """Run stage two as described in the module docstring."""
    started = time.perf_counter()
    recipe = load_recipe(settings.recipe)
    artifact = CalibrationArtifact(settings.calib, verify=settings.verify)
    device = resolve_device(settings.device)
    out = settings.out or default_checkpoint_dir(artifact, recipe)
    refuse_nested(out, artifact.location, "calibration artifact", "--out")
    settings = replace(settings, out=out, device=device)
    split_samples(artifact, recipe, settings)  # a selection too small fails before the model loads
    preset = preset_of_artifact(artifact.manifest["model"])
    model = load_submodule(preset, device="cpu" if settings.blockwise else device, device_map=settings.device_map,
                           max_memory=settings.max_memory, offload_folder=settings.offload_folder)
    return quantize_module(model, artifact, recipe, settings, show_progress, started)


def quantize_module(model: torch.nn.Module, artifact: CalibrationArtifact, recipe: Recipe, settings: QuantizeSettings,
                    show_progress: bool = True, started: float | None = None) -> QuantizeResult:
    """Quantize `model`, already loaded (by `quantize`, or the caller's own: `diffquant.quantize`),
    in place from `artifact` with `recipe`; with `settings.out` None nothing is written and the
    result's manifest lists no files. `settings.device` must be resolved (not `auto`). The output's
    writer lock is held from the check of `out` to the checkpoint's publication."""
    started = time.perf_counter() if started is None else started
    with OutputLock(settings.out) if settings.out is not None else contextlib.nullcontext():
        return _quantize_module(model, artifact, recipe, settings, show_progress, started)


def _quantize_module(model: torch.nn.Module, artifact: CalibrationArtifact, recipe: Recipe, settings: QuantizeSettings,
                     show_progress: bool, started: float) -> QuantizeResult:
    device, out = settings.device, settings.out
    calib_ids, holdout_ids, selection = split_samples(artifact, recipe, settings)
    preset = preset_of_artifact(artifact.manifest["model"])
    artifact.check_model(model)
    check_state(model, artifact)
    plans, skipped = plan_layers(model, recipe, preset.quant_exclude, preset.svd_exclude)
    if not plans:
        raise ConfigError(f"recipe {recipe.name} matches no Linear or Conv2d layer of {preset.target}", "loosen the exclude patterns")
    if out is not None:
        prepare_checkpoint_dir(out, settings.overwrite)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    phases = PhaseTimer(load=time.perf_counter() - started)
    max_share = DEFAULT_MAX_BLOCK_SHARE if settings.max_block_share is None else settings.max_block_share
    with BlockwiseOnload(model, device, max_unit_share=max_share) if settings.blockwise else contextlib.nullcontext() as blocks:
        with phases("statistics"):
            stats, cache_report = gather_stats(model, artifact, calib_ids, stat_requests(model, plans, recipe), settings, show_progress)
        with phases("quality_report"):
            layer_inputs, fp_outputs = capture_layer_inputs(model, [plan.name for plan in plans], _samples(artifact, holdout_ids, settings),
                                                            settings.layer_rows, show_progress)
        fp16_bytes = sum(p.numel() * 2 for p in model.parameters())
        with phases("weights"):
            entries, sizes = quantize_in_place(model, plans, stats, recipe, layer_inputs, blocks, phases, show_progress)
        if blocks is not None:
            blocks.attach()  # a replaced top-level layer (conv_in, x_embedder) is a unit of its own
        with phases("quality_report"):
            output_sqnr = measure_output(model, fp_outputs, _samples(artifact, holdout_ids, settings))
    del fp_outputs

    layers = [entries[plan.name] for plan in plans]
    median_layer, worst_layer = median_and_worst([layer["quality"]["output_sqnr_db"] for layer in layers])
    manifest = {
        "diffquant_version": __version__,
        "quantization_config": {
            "recipe": recipe.name,
            "global": recipe.global_spec.to_dict(),
            "svdquant": None if recipe.svdquant is None else {**vars(recipe.svdquant)},
            "packing": NIBBLE_ORDER,
            "scale_conventions": {
                "affine": "x = (q - zero_point) * scale",
                "fp8": "x = float(q) * scale",
                "mxfp4": "x = e2m1(code) * 2^(weight_scale - 127), scale mode floor (OCP MX v1.0)",
                "nvfp4": "x = e2m1(code) * float(weight_scale) * weight_scale_2 (weight_scale_2 = amax / (6 * 448))",
                "svdquant": "y = Q(x / smooth_factor) deq(R)^T + (x / smooth_factor) lora_down^T lora_up^T + bias",
            },
        },
        "recipe": recipe.source,
        "model": {key: value for key, value in artifact.manifest["model"].items()},
        "calibration": {
            "path": str(artifact.path.resolve()) if isinstance(artifact.path, Path) else artifact.path,
            "manifest_sha256": artifact.manifest_sha256,
            "settings_sha256": artifact.manifest["settings_sha256"],
            "selection": selection.describe(),
            "num_calibration_samples": len(calib_ids),
            "holdout_sample_ids": [artifact.records[i].id for i in holdout_ids],
            **({"holdout_rule": HOLDOUT_RULE} if settings.holdout is None and "holdout" not in (recipe.source.get("calibration") or {})
               and len(holdout_ids) != recipe.calibration.holdout else {}),
        },
        "layers": layers,
        "skipped": [{"name": s.name, "reason": s.reason} for s in skipped],
        "quality": {
            "output_sqnr_db": output_sqnr,
            "median_layer_output_sqnr_db": median_layer,
            "worst_layer_output_sqnr_db": worst_layer,
            "holdout_samples": len(holdout_ids),
        },
        "sizes": {"fp16_bytes": fp16_bytes, **sizes},
    }
    manifest["stats_cache"] = cache_report
    manifest["placement"] = placement_report(settings, device, blocks)
    artifact.check_unchanged()
    # The checkpoint writer adds the write phase (weights written, synced and hashed) to the phases.
    manifest["timing"] = {"quantize_seconds": round(time.perf_counter() - started, 3), "phases_seconds": phases.rounded()}
    if out is not None:
        manifest = write_checkpoint(out, materialized_state_dict(model), manifest)
    return QuantizeResult(out, manifest, model)


def check_state(model: torch.nn.Module, artifact: CalibrationArtifact) -> None:
    """Refuse a model whose weights differ from those an artifact of a live pipe recorded
    (`model.target_state_sha256`: a fine-tune, a fused LoRA or an edit since calibration)."""
    recorded = artifact.manifest["model"].get("target_state_sha256")
    if recorded is not None and recorded != state_sha256(model):
        raise ArtifactError(
            f"calibration artifact {artifact.path} was captured from {artifact.manifest['model']['target_class']} weights "
            "that differ from the model's now (fine-tuned, fused or edited since)",
            "quantize the module that was calibrated, or calibrate this one",
        )


def quantize_in_place(
    model: torch.nn.Module,
    plans: list[LayerPlan],
    stats: dict[str, LayerActivationStats],
    recipe: Recipe,
    layer_inputs: dict[str, list[torch.Tensor]],
    blocks: BlockwiseOnload | None,
    phases: "PhaseTimer",
    show_progress: bool,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Quantize every planned layer and put it in the model at once, in place of the float layer.

    Each float layer is released as its quantized replacement goes in, so the model's weights are
    held once, plus one layer. A layer's figures are measured on its captured held-out inputs just
    before the swap (timed as the quality report). Block by block, the layers of one unit are
    quantized while that unit is on the device, and each finished layer goes back to CPU memory.
    Returns each layer's manifest entry and the sizes of the quantized weights.
    """
    modules = dict(model.named_modules())
    entries: dict[str, dict[str, Any]] = {}
    stored_bytes = fp16_bytes = 0
    bar = tqdm(total=len(plans), desc="quantize layers", unit="layer", disable=not show_progress)
    for unit, group in itertools.groupby(plans, key=lambda plan: blocks.unit_of(plan.name) if blocks else None):
        with blocks.holding(unit) if unit is not None else contextlib.nullcontext():
            for plan in group:
                module = modules.pop(plan.name)
                dtype = str(module.weight.dtype).removeprefix("torch.")
                with onloaded(module):
                    layer, facts = build_quantized_layer(module, plan, stats.pop(plan.name, None), recipe.svdquant)
                    with phases.pause("weights"), phases("quality_report"):
                        quality = compare_layer(module, layer, layer_inputs.pop(plan.name))
                    home = blocks.home if blocks is not None else execution_device(module)
                swap_layers(model, {plan.name: layer.to(home)})
                del module
                entries[plan.name] = _layer_entry(plan, layer, facts, quality, dtype)
                stored_bytes += layer.quantized_weight().nbytes
                fp16_bytes += layer.weight_shape.numel() * 2
                bar.update(1)
    bar.close()
    # The quantized weights (codes and scales, without bias and low-rank branch) against the same
    # weights in fp16: the ratio the whole checkpoint approaches when the unquantized layers are a
    # small share of the model, as in the real models.
    sizes = {"quantized_weights_bytes": stored_bytes, "quantized_weights_fp16_bytes": fp16_bytes,
             "quantized_weights_ratio_vs_fp16": stored_bytes / fp16_bytes}
    return entries, sizes


class PhaseTimer:
    """Wall time per phase of a run: `with timer("name"):` adds the block's seconds to the phase;
    `with timer.pause("name"):` takes a nested block's seconds back out of an enclosing phase."""

    def __init__(self, **seconds: float) -> None:
        self.seconds: dict[str, float] = dict(seconds)

    def __call__(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self._timed(name, 1.0)

    def pause(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self._timed(name, -1.0)

    @contextlib.contextmanager
    def _timed(self, name: str, sign: float) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + sign * (time.perf_counter() - start)

    def rounded(self) -> dict[str, float]:
        return {name: round(value, 3) for name, value in self.seconds.items()}


def placement_report(settings: QuantizeSettings, device: str, blocks: BlockwiseOnload | None) -> dict[str, Any]:
    """How the submodule was placed, and the device memory it took (bytes)."""
    mode = "blockwise" if blocks is not None else "device_map" if settings.device_map else "whole"
    report: dict[str, Any] = {"mode": mode, "device": device, "device_map": settings.device_map}
    if blocks is not None:
        report.update(blocks.report())
    if device.startswith("cuda"):
        report["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return report


def gather_stats(
    model: torch.nn.Module,
    artifact: CalibrationArtifact,
    calib_ids: list[int],
    requests: dict[str, set[str]],
    settings: QuantizeSettings,
    show_progress: bool,
) -> tuple[dict[str, LayerActivationStats], dict[str, Any]]:
    """Activation statistics for `requests`: from the cache where valid, else one forward pass
    over the calibration samples for every missing kind (then cached). Returns the statistics and
    what the cache did ({"hits", "computed", "rejected"})."""
    stats: dict[str, LayerActivationStats] = {name: LayerActivationStats() for name in requests}
    cache = StatsCache(artifact.location) if settings.use_stats_cache else None
    key_base = {
        "calibration_manifest_sha256": artifact.manifest_sha256,
        "model": module_fingerprint(model),
        "model_dtype": str(next(model.parameters()).dtype),
        "device_type": torch.device(settings.device).type,
        "samples_sha256": json_sha256([artifact.records[i].id for i in calib_ids]),
        "histogram_layout": list(HISTOGRAM_LAYOUT),
        "witnesses": "sample position of each extreme",  # entries without them (older) are misses, not hits
    }
    missing: dict[str, set[str]] = {}
    store_error: str | None = None
    for kind in STAT_KINDS:
        layers = {name for name, kinds in requests.items() if kind in kinds}
        if not layers:
            continue
        found = cache.lookup({**key_base, "kind": kind}, layers) if cache else None
        if found is not None:
            _check_cache_against_calibration(model, kind, found, artifact, calib_ids, settings, cache)
        if found is None:
            for name in layers:
                missing.setdefault(name, set()).add(kind)
            continue
        for name, tensors in found.items():
            stats[name].set_from_tensors(kind, tensors)
    if missing:
        computed = collect_activation_stats(model, missing, _samples(artifact, calib_ids, settings), len(calib_ids), show_progress)
        for name, layer_stats in computed.items():
            for kind in missing[name]:
                tensors = layer_stats.to_tensors(kind)
                if tensors:  # a layer that never ran has no statistic
                    stats[name].set_from_tensors(kind, tensors)
        if cache is not None:
            artifact.check_unchanged()  # never cache statistics into an artifact that replaced ours
            store_error = _store_stats(cache, key_base, missing, stats)
    report = {"enabled": cache is not None, "hits": cache.hits if cache else [], "rejected": cache.rejected if cache else [],
              "computed": sorted({k for kinds in missing.values() for k in kinds}), "store_error": store_error}
    return stats, report


def _check_cache_against_calibration(model: torch.nn.Module, kind: str, found: dict[str, dict[str, torch.Tensor]],
                                     artifact: CalibrationArtifact, calib_ids: list[int], settings: QuantizeSettings, cache: StatsCache) -> None:
    """Check cached statistics against the calibration they claim to come from, whose sha256 is in
    their key. For each witnessed field (`range`: min and max; `channel_absmax`: the channels), one
    layer (and channel) is drawn at random and the sample that witnesses it is recomputed, one
    forward pass each; every layer must contain what that sample gives and reproduce each extreme
    it witnesses (`check_against_sample`). A field altered in every layer is caught with certainty,
    one altered in k of n layers with probability at least k/n per run. Statistics widened or
    narrowed together with their hash are refused in one line: the cache was altered."""
    if kind not in WITNESSED_KINDS or not found:
        return
    fix = "delete the artifact's stats/ directory (a cache, recomputed on the next run) or pass --no-stats-cache"
    positions: set[int] = set()
    for name, tensors in sorted(found.items()):
        witnessed = witness_positions(kind, tensors)
        if witnessed is None or not all(0 <= p < len(calib_ids) for p in witnessed):
            raise ArtifactError(f"{cache.root}: the cached {kind} statistic of layer {name} has no valid witness samples, "
                                "though its sha256 matches the index (the cache was altered)", fix)
    tolerance = witness_tolerance(next(model.parameters()).dtype)
    draw = random.SystemRandom()
    for field in WITNESS_FIELDS[kind]:
        witness = found[draw.choice(sorted(found))][field].flatten()
        positions.add(int(witness[draw.randrange(witness.numel())]))
    for position in sorted(positions):
        # Through the module, not this stage's name: a check of a few samples is not a pass over the calibration data.
        recomputed = activation_stats.collect_activation_stats(model, {name: {kind} for name in found},
                                                               _samples(artifact, [calib_ids[position]], settings), 1, False)
        for name, stats in sorted(recomputed.items()):
            problem = check_against_sample(kind, found[name], stats.to_tensors(kind), position, tolerance) if stats.to_tensors(kind) else None
            if problem is not None:
                raise ArtifactError(f"{cache.root}: the cached {kind} statistic of layer {name} disagrees with calibration sample "
                                    f"{artifact.records[calib_ids[position]].id} ({problem}), though its sha256 matches the index "
                                    "(the cache was altered)", fix)


def _store_stats(cache: StatsCache, key_base: dict[str, Any], missing: dict[str, set[str]], stats: dict[str, LayerActivationStats]) -> str | None:
    """Cache the statistics just computed; None, or why they could not be (a read-only artifact,
    a store without write access): the cache only saves time, so quantization goes on, warned."""
    try:
        for kind in sorted({k for kinds in missing.values() for k in kinds}):
            layers = [name for name in missing if kind in missing[name]]
            cache.store({**key_base, "kind": kind}, {name: stats[name].to_tensors(kind) for name in layers})
    except Exception as exc:  # any store's own error: the cache is optional, the statistics are in hand
        warnings.warn(f"the statistics cache {cache.root} cannot be written ({exc}); quantizing without caching", stacklevel=3)
        return str(exc)
    return None


def default_checkpoint_dir(artifact: CalibrationArtifact, recipe: Recipe) -> Path:
    """artifacts/quantized/<model>-<recipe>-<short hash of the calibration and the recipe>."""
    key = json_sha256({"calibration": artifact.manifest_sha256, "recipe": recipe.source})[:8]
    return ARTIFACTS_DIR / "quantized" / f"{artifact.manifest['model']['name']}-{recipe.name}-{key}"


def split_samples(artifact: CalibrationArtifact, recipe: Recipe, settings: QuantizeSettings) -> tuple[list[int], list[int], SampleSelection]:
    """Selected calibration sample indices, minus `holdout` evenly spaced ones kept for evaluation."""
    base = recipe.calibration
    fields = ("limit", "every", "timestep_min", "timestep_max", "uniform_steps", "max_per_step")
    selection = SampleSelection(**{
        name: getattr(settings, name) if getattr(settings, name) is not None else getattr(base, name) for name in fields
    })
    chosen = selection.apply(artifact.records)
    holdout = settings.holdout if settings.holdout is not None else base.holdout
    if settings.holdout is None and "holdout" not in (recipe.source.get("calibration") or {}):
        holdout = adaptive_holdout(len(chosen), base.holdout)
    if len(chosen) <= holdout:
        raise ConfigError(
            f"{len(chosen)} calibration samples selected, but {holdout} are held out for evaluation",
            "calibrate more prompts or steps, widen the selection, or lower --holdout",
        )
    picks = {chosen[min(len(chosen) - 1, int((i + 0.5) * len(chosen) / holdout))] for i in range(holdout)}
    holdout_ids = sorted(picks)
    return [i for i in chosen if i not in picks], holdout_ids, selection


def adaptive_holdout(selected: int, default: int) -> int:
    """The held-out count when neither --holdout nor the recipe sets one: the default (4) while the
    selection has more samples than that (so every run that worked before holds out the same
    samples), else half the selection, at least 1: `default if selected > default else
    max(1, selected // 2)`. One selected sample is still refused (nothing left to calibrate on)."""
    return default if selected > default else max(1, selected // 2)


def _samples(artifact: CalibrationArtifact, indices: list[int], settings: QuantizeSettings) -> Iterable[dict[str, Any]]:
    return calibration_loader(CalibrationDataset(artifact, indices=indices), settings.device, settings.num_workers)


def _layer_entry(plan: LayerPlan, layer: QuantizedLayer, facts: dict[str, Any], quality: dict[str, Any], dtype: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": plan.name,
        "type": plan.layer_type,
        "shape": list(layer.weight_shape),
        "dtype": dtype,
        "weight": plan.spec.weight.to_dict(),
        "weight_format": plan.spec.weight.dtype,
        "granularity": plan.spec.weight.granularity,
        "observer": plan.spec.weight.observer,
        "tensors": {suffix: f"{plan.name}.{suffix}" for suffix in layer.stored_names},
        "input": plan.spec.input.to_dict() if plan.spec.input else None,
        "input_params": {name: getattr(layer, name).tolist() for name in layer.input_param_names},
        "input_tensors": {name: f"{plan.name}.{name}" for name in layer.input_param_names},
        "bias": f"{plan.name}.bias" if layer.bias is not None else None,
        "svd": None,
        "quality": quality,
        **{key: value for key, value in facts.items() if not key.startswith("svd_")},
    }
    if layer.has_lowrank:
        entry["svd"] = {
            "rank": facts["svd_rank"], "alpha": facts["svd_alpha"], "method": facts["svd_method"],
            "tensors": {name: f"{plan.name}.{name}" for name in ("smooth_factor", "lora_down", "lora_up")},
            "smoothing": "x is divided by smooth_factor; the residual and lora are in the smoothed space",
        }
    if plan.layer_type == "Conv2d":
        entry["conv"] = layer.conv
    return entry
