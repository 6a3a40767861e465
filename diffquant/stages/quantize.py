"""Stage two: quantize the target submodule from a calibration artifact, without the pipeline.

The wiring, in order: choose the samples (`artifacts.sample_split`: calibration samples for the
observers, a few held out for the quality report); load the submodule where its placement puts it
(`models.placement`: whole, accelerate's device map, or block by block) and check it against the
artifact (class, config hash, weights); plan the layers the recipe quantizes (`quant.quantizer`);
gather the activation statistics (cached or one pass: `stages.statistics`); capture each layer's
held-out inputs in one reference pass (`eval.measure`); quantize in place, layer by layer
(`models.in_place`); measure the submodule's output; and write `model.safetensors` plus
`quant_manifest.json` (`artifacts.checkpoint`, one `CheckpointManifest`), which loads back for
generation with no calibration data. `--holdout 0` turns the quality report off: no sample is held
out and no reference pass runs, so a weight-only recipe runs no forward pass at all.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from diffquant import __version__
from diffquant.artifacts.calibration_reader import CalibrationArtifact, CalibrationDataset, calibration_loader
from diffquant.artifacts.checkpoint import default_checkpoint_dir, prepare_checkpoint_dir, write_checkpoint
from diffquant.artifacts.checkpoint_records import NIBBLE_ORDER, SCALE_CONVENTIONS, CheckpointManifest, SkippedLayer
from diffquant.artifacts.locking import OutputLock
from diffquant.artifacts.replace import refuse_nested
from diffquant.artifacts.sample_split import SELECTION_FIELDS, SampleSplit, choose_samples
from diffquant.errors import ConfigError
from diffquant.eval.measure import DEFAULT_LAYER_ROWS, capture_layer_inputs, compare_layer, measure_output, median_and_worst
from diffquant.eval.timing import PhaseTimer
from diffquant.models.in_place import quantize_in_place
from diffquant.models.live import check_calibrated_state
from diffquant.models.placement import DEFAULT_MAX_BLOCK_SHARE, Placement, placement_for
from diffquant.models.presets import preset_of_artifact
from diffquant.paths import ARTIFACTS_DIR, resolve_device
from diffquant.quant.quantizer import plan_layers, stat_requests
from diffquant.quant.recipe import Recipe
from diffquant.recipes import load_recipe
from diffquant.stages.statistics import gather_stats

__all__ = ["DEFAULT_LAYER_ROWS", "DEFAULT_MAX_BLOCK_SHARE", "QuantizeResult", "QuantizeSettings", "quantize", "quantize_module"]


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
    holdout: int | None = None  # 0: no sample held out, no quality report
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
        if self.holdout is not None and self.holdout < 0:
            raise ConfigError(f"--holdout {self.holdout} is not allowed", "hold out at least 1 sample for the quality report, or 0 to turn it off")
        if self.num_workers < 0:
            raise ConfigError(f"--num-workers {self.num_workers} is negative", "pass 0 (read in the main process) or more")

    def placement(self) -> Placement:
        return placement_for(self.device, blockwise=self.blockwise, max_block_share=self.max_block_share, device_map=self.device_map,
                             max_memory=self.max_memory, offload_folder=self.offload_folder)


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
    model_info = artifact.manifest["model"]
    out = settings.out or default_checkpoint_dir(ARTIFACTS_DIR, model_info["name"], recipe.name, artifact.manifest_sha256, recipe.source)
    refuse_nested(out, artifact.location, "calibration artifact", "--out")
    settings = replace(settings, out=out, device=resolve_device(settings.device))
    _split(artifact, recipe, settings)  # a selection too small fails before the model loads
    placement = settings.placement()
    model = placement.load(preset_of_artifact(model_info))
    return quantize_module(model, artifact, recipe, settings, show_progress, started, placement)


def quantize_module(model: torch.nn.Module, artifact: CalibrationArtifact, recipe: Recipe, settings: QuantizeSettings,
                    show_progress: bool = True, started: float | None = None, placement: Placement | None = None) -> QuantizeResult:
    """Quantize `model`, already loaded (by `quantize`, or the caller's own: `diffquant.quantize`),
    in place from `artifact` with `recipe`; with `settings.out` None nothing is written and the
    result's manifest lists no files. `settings.device` must be resolved (not `auto`). The output's
    writer lock is held from the check of `out` to the checkpoint's publication."""
    started = time.perf_counter() if started is None else started
    with OutputLock(settings.out) if settings.out is not None else contextlib.nullcontext():
        return _quantize_module(model, artifact, recipe, settings, show_progress, started, placement or settings.placement())


def _quantize_module(model: torch.nn.Module, artifact: CalibrationArtifact, recipe: Recipe, settings: QuantizeSettings,
                     show_progress: bool, started: float, placement: Placement) -> QuantizeResult:
    split = _split(artifact, recipe, settings)
    preset = preset_of_artifact(artifact.manifest["model"])
    artifact.check_model(model)
    check_calibrated_state(model, artifact.manifest["model"], str(artifact.path))
    plans, skipped = plan_layers(model, recipe, preset.quant_exclude, preset.svd_exclude)
    if not plans:
        raise ConfigError(f"recipe {recipe.name} matches no Linear or Conv2d layer of {preset.target}", "loosen the exclude patterns")
    if settings.out is not None:
        prepare_checkpoint_dir(settings.out, settings.overwrite)
    if settings.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(settings.device)
    phases, report = PhaseTimer(load=time.perf_counter() - started), bool(split.holdout)

    def samples(indices: Sequence[int]) -> Iterable[dict[str, Any]]:
        return _samples(artifact, list(indices), settings)

    with placement.placed(model):
        with phases("statistics"):
            stats, cache_report = gather_stats(model, artifact, split.calibration, stat_requests(model, plans, recipe), samples,
                                               settings.device, settings.use_stats_cache, show_progress)
        with phases("quality_report"):
            layer_inputs, fp_outputs = (capture_layer_inputs(model, [plan.name for plan in plans], samples(split.holdout), settings.layer_rows,
                                                             show_progress) if report else ({}, []))

        def measure(name: str, original: torch.nn.Module, layer: Any) -> dict[str, Any]:
            with phases.pause("weights"), phases("quality_report"):
                return compare_layer(original, layer, layer_inputs.pop(name)) if report else {}

        fp16_bytes = sum(p.numel() * 2 for p in model.parameters())
        with layer_inputs if report else contextlib.nullcontext(), phases("weights"):
            records, sizes = quantize_in_place(model, plans, stats, recipe.svdquant, placement, measure, show_progress)
        with phases("quality_report"):
            output_sqnr = measure_output(model, fp_outputs, samples(split.holdout)) if report else None
    del fp_outputs

    median_layer, worst_layer = median_and_worst([record.quality.get("output_sqnr_db") for record in records])
    artifact.check_unchanged()
    quality = ({"output_sqnr_db": output_sqnr, "median_layer_output_sqnr_db": median_layer, "worst_layer_output_sqnr_db": worst_layer,
                "holdout_samples": len(split.holdout)} if report else {"report": "off", "holdout_samples": 0})
    manifest = CheckpointManifest(
        diffquant_version=__version__,
        quantization_config={"recipe": recipe.name, "global": recipe.global_spec.to_dict(),
                             "svdquant": None if recipe.svdquant is None else {**vars(recipe.svdquant)},
                             "packing": NIBBLE_ORDER, "scale_conventions": dict(SCALE_CONVENTIONS)},
        recipe=recipe.source, model=dict(artifact.manifest["model"]),
        calibration={
            "path": str(artifact.path.resolve()) if isinstance(artifact.path, Path) else artifact.path,
            "manifest_sha256": artifact.manifest_sha256,
            "settings_sha256": artifact.manifest["settings_sha256"],
            "selection": split.selection.describe(),
            "num_calibration_samples": len(split.calibration),
            "holdout_sample_ids": [artifact.records[i].id for i in split.holdout],
            **({"holdout_rule": split.holdout_rule} if split.holdout_rule else {}),
        },
        layers=tuple(records), skipped=tuple(SkippedLayer(s.name, s.reason) for s in skipped), quality=quality,
        sizes={"fp16_bytes": fp16_bytes, **sizes}, stats_cache=cache_report, placement=placement.report(),
        # The checkpoint writer adds the write phase (weights written, synced and hashed) to the phases.
        timing={"quantize_seconds": round(time.perf_counter() - started, 3), "phases_seconds": phases.rounded()},
    )
    if settings.out is not None:
        manifest = write_checkpoint(settings.out, placement.state_dict(model), manifest)
    return QuantizeResult(settings.out, manifest.to_json(), model)


def _split(artifact: CalibrationArtifact, recipe: Recipe, settings: QuantizeSettings) -> SampleSplit:
    overrides = {name: getattr(settings, name) for name in (*SELECTION_FIELDS, "holdout")}
    return choose_samples(artifact.records, overrides, recipe.calibration, "holdout" in (recipe.source.get("calibration") or {}))


def _samples(artifact: CalibrationArtifact, indices: list[int], settings: QuantizeSettings) -> Iterable[dict[str, Any]]:
    return calibration_loader(CalibrationDataset(artifact, indices=indices), settings.device, settings.num_workers)
