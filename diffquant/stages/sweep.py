"""Sweep: quantize many recipes from one calibration artifact, evaluate each, and rank them.

Every recipe is quantized from the same artifact into `<out>/checkpoints/<recipe>/`; the
activation-statistics cache beside the artifact makes every recipe after the first that needs a
statistic skip the calibration pass. Each checkpoint is then reloaded from disk and evaluated by
`stages.evaluate` (held-out submodule and per-layer SQNR, image PSNR/SSIM against the unquantized
pipeline, which is loaded once; its reference images are generated once). A recipe that fails is
recorded with its error and the sweep goes on. Outputs, each written atomically:

    <out>/
      leaderboard.md / .csv / .json   one row per recipe, best output SQNR first, failures last
      grid.png                        unquantized reference row first, then one row per recipe
      layers.png                      per-layer output SQNR of every recipe, layers in model order
      checkpoints/<recipe>/           model.safetensors + quant_manifest.json (as `diffquant quantize`)
      images/<recipe>/<k>-seed<s>.png every generated image (k: prompt index; images/_reference/: unquantized)
      errors/<recipe>.txt             the traceback of a failed recipe

A checkpoint already in `checkpoints/<recipe>/` from the same recipe and artifact is reused
(status `reused`), so re-running an interrupted sweep resumes it; `overwrite` re-quantizes.

Each row says whether its recipe needs calibration (`calibration`: `needed` where a layer has a
static input scale or an SVDQuant smoothing factor, both taken from calibration activations;
`free` otherwise: weight-only and dynamic-input recipes, and SVDQuant with identity smoothing,
compute the same checkpoint from any artifact). The shipped calibration-free baselines
(`w4a16_rtn`, `fp8_dynamic`, `nvfp4`, `w4a16`, `w4a4`, `svdquant_w4a4_nosmooth`, ...) are in
`all`, so every sweep shows the bar a calibrated recipe must clear.

Example:
    >>> from diffquant.recipes import load_recipe
    >>> [calibration_need(load_recipe(name)) for name in ("fp8", "fp8_dynamic", "w4a16_rtn", "svdquant_w4a4", "svdquant_w4a4_nosmooth")]
    ['needed', 'free', 'free', 'needed', 'free']
"""

from __future__ import annotations

import csv
import io
import math
import re
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from PIL import Image
from tqdm.auto import tqdm

from diffquant import paths
from diffquant.artifacts.atomic import write_bytes_atomic, write_json_atomic
from diffquant.artifacts.calibration_format import json_sha256
from diffquant.artifacts.calibration_reader import CalibrationArtifact
from diffquant.artifacts.checkpoint import MANIFEST_NAME, read_checkpoint_manifest
from diffquant.errors import ConfigError, DiffquantError
from diffquant.eval.plots import image_grid, layer_sqnr_plot
from diffquant.quant.recipe import Recipe
from diffquant.quant.spec import merge_layer_spec
from diffquant.recipes import available_recipes, load_recipe
from diffquant.stages.evaluate import RECORD_COLUMNS, CheckpointEvaluator, EvalPrompts, evaluation_preset
from diffquant.stages.generate import save_image_atomic
from diffquant.stages.quantize import QuantizeSettings, quantize

ALL_RECIPES = "all"
REFERENCE_ROW = "_reference"  # a directory name no recipe can take (see resolve_recipes)
LEADERBOARD_COLUMNS = ("recipe", "status", "calibration", *RECORD_COLUMNS[1:], "error", "checkpoint")
_MD_COLUMNS = (
    ("recipe", "recipe"), ("calibration", "calibration"), ("weight", "weight_format"), ("activation", "activation_format"), ("bytes", "checkpoint_bytes"),
    ("vs fp16", "ratio_vs_fp16"), ("weights vs fp16", "quantized_weights_ratio_vs_fp16"), ("output SQNR dB", "output_sqnr_db"), ("median layer dB", "median_layer_output_sqnr_db"),
    ("worst layer dB", "worst_layer_output_sqnr_db"), ("PSNR dB", "psnr_db"), ("SSIM", "ssim"), ("quantize s", "quantize_seconds"),
    ("status", "status"),
)
_FAILED_TILE = "#bbbbbb"
# Keys whose None means +inf dB (exact match / identical images), as in the checkpoint manifest.
_INF_WHEN_NONE = ("output_sqnr_db", "median_layer_output_sqnr_db", "worst_layer_output_sqnr_db", "psnr_db")


@dataclass(frozen=True)
class SweepSettings:
    """Inputs of one sweep. `recipes` holds names, recipe file paths, or `all` (every shipped recipe)."""

    calib: Path | str
    recipes: tuple[str, ...] = (ALL_RECIPES,)
    out: Path | None = None
    device: str = "auto"
    prompts: EvalPrompts = field(default_factory=EvalPrompts.build)
    images: bool = True
    overwrite: bool = False
    use_stats_cache: bool = True


@dataclass(frozen=True)
class SweepResult:
    out: Path
    rows: list[dict[str, Any]]  # leaderboard order
    settings: dict[str, Any]  # every value used, defaults included


def sweep(settings: SweepSettings, show_progress: bool = True) -> SweepResult:
    """Run a sweep as described in the module docstring."""
    artifact = CalibrationArtifact(settings.calib)
    preset = evaluation_preset(artifact.manifest["model"], artifact)
    device = paths.resolve_device(settings.device)
    recipes = resolve_recipes(settings.recipes)
    out = settings.out or default_sweep_dir(artifact, recipes)
    settings = replace(settings, out=out, device=device)
    out.mkdir(parents=True, exist_ok=True)
    evaluator = CheckpointEvaluator(preset, device, settings.prompts if settings.images else None, show_progress)
    if settings.images:  # generated once, before any recipe, so a pipeline problem fails early
        for i, image in enumerate(evaluator.reference_images):
            save_image_atomic(image, out / "images" / REFERENCE_ROW / _image_name(settings.prompts, i))

    rows: list[dict[str, Any]] = []
    bar = tqdm(recipes, desc="sweep", unit="recipe", disable=not show_progress)
    for name, source in bar:
        bar.set_postfix(recipe=name)
        rows.append(_run_recipe(name, source, artifact, evaluator, settings, show_progress))
        row = rows[-1]
        if show_progress:
            figure = "failed: " + row["error"] if row["status"] == "failed" else f"output SQNR {_fmt(row['output_sqnr_db'])} dB"
            tqdm.write(f"{name}: {figure}")
    rows = rank(rows)
    used = _settings_used(settings, preset, [name for name, _ in recipes], rows)
    write_leaderboard(out, rows, used)
    if settings.images:
        write_grid(out / "grid.png", evaluator.reference_images, rows, settings.prompts)
    write_layers_plot(out / "layers.png", rows, evaluator, f"{preset.name} {preset.target}: per-layer output SQNR, held-out samples")
    return SweepResult(out, rows, used)


def resolve_recipes(requested: Sequence[str]) -> list[tuple[str, str]]:
    """(name, name or path) per recipe; `all` expands to every shipped recipe. A name that is
    neither a recipe file nor a shipped recipe is refused before anything runs."""
    shipped = available_recipes()
    resolved: list[tuple[str, str]] = []
    for item in (r.strip() for r in requested):
        if not item:
            continue
        if item == ALL_RECIPES:
            resolved.extend((name, name) for name in shipped)
        elif Path(item).is_file():
            resolved.append((_recipe_file_name(Path(item)), item))
        elif item in shipped:
            resolved.append((item, item))
        else:
            raise ConfigError(f"unknown recipe {item!r}", f"use `all`, a recipe file, or names from {', '.join(shipped)}")
    if not resolved:
        raise ConfigError("no recipes given", "pass --recipes all, or e.g. --recipes int8_w8a8,fp8")
    names = [name for name, _ in resolved]
    unsafe = [n for n in names if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", n)]
    if unsafe:
        raise ConfigError(f"recipe name(s) {', '.join(map(repr, unsafe))} cannot name a directory",
                          "use letters, digits and _.+- in a recipe's name:, starting with a letter or digit")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"recipe(s) {', '.join(duplicates)} given twice", "list each recipe once (`all` already holds every shipped one)")
    return resolved


def default_sweep_dir(artifact: CalibrationArtifact, recipes: Sequence[tuple[str, str]]) -> Path:
    """artifacts/sweeps/<model>-<short hash of the calibration and the recipe names>."""
    key = json_sha256({"calibration": artifact.manifest_sha256, "recipes": [name for name, _ in recipes]})[:8]
    return paths.ARTIFACTS_DIR / "sweeps" / f"{artifact.manifest['model']['name']}-{key}"


def calibration_need(recipe: Recipe) -> str:
    """`needed` if any spec of the recipe (global, layer-type or name override) has a static input
    scale, or the recipe smooths with SVDQuant; else `free` (see the module docstring)."""
    if recipe.svdquant is not None and recipe.svdquant.smoothing == "activation":
        return "needed"
    specs = [recipe.global_spec]
    specs += [merge_layer_spec(recipe.global_spec, override, f"recipe {recipe.name}")
              for override in (*recipe.layer_types.values(), *recipe.names.values())]
    return "needed" if any(spec.input is not None and not spec.input.dynamic for spec in specs) else "free"


def rank(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best submodule output SQNR first (None, an exact match, counts as +inf); failures last."""
    def key(row: dict[str, Any]) -> tuple[bool, float]:
        sqnr = row["output_sqnr_db"]
        return row["status"] == "failed", -(math.inf if sqnr is None else sqnr)
    return sorted(rows, key=key)


def write_leaderboard(out: Path, rows: list[dict[str, Any]], used: dict[str, Any]) -> None:
    """leaderboard.json (settings, rows with per-layer and per-image figures), .csv and .md."""
    serialisable = [{k: v for k, v in row.items() if k != "images"} for row in rows]
    write_json_atomic(out / "leaderboard.json", {"settings": used, "columns": list(LEADERBOARD_COLUMNS), "rows": serialisable})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(LEADERBOARD_COLUMNS)
    for row in rows:
        writer.writerow([_csv_cell(row, c) for c in LEADERBOARD_COLUMNS])
    write_bytes_atomic(out / "leaderboard.csv", buffer.getvalue().encode())
    write_bytes_atomic(out / "leaderboard.md", leaderboard_markdown(rows, used).encode())


def leaderboard_markdown(rows: list[dict[str, Any]], used: dict[str, Any]) -> str:
    lines = [
        f"# Sweep leaderboard: {used['model']} ({used['target']})",
        "",
        f"Calibration artifact `{used['calib']}`. SQNR in dB on {_held_out(used)} held-out calibration samples (inf: exact match);",
        f"PSNR (dB) and SSIM of {_images(used)} against the unquantized pipeline's. Sizes: whole checkpoint,",
        "and quantized weights alone, against the same tensors in fp16.",
        "",
        "| " + " | ".join(title for title, _ in _MD_COLUMNS) + " |",
        "|" + "|".join("---" if key in ("recipe", "calibration", "weight_format", "activation_format", "status") else "---:" for _, key in _MD_COLUMNS) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(row, key) for _, key in _MD_COLUMNS) + " |")
    failed = [row for row in rows if row["status"] == "failed"]
    if failed:
        lines += ["", "## Failed recipes", ""]
        lines += [f"- `{row['recipe']}`: {row['error'].replace('|', '/')}" for row in failed]
    lines += ["", "Repeat with:", "", "```", used["command"], "```", ""]
    return "\n".join(lines)


def leaderboard_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(headers, text cells) of the leaderboard as leaderboard.md shows it, for a terminal table."""
    return [title for title, _ in _MD_COLUMNS], [[_md_cell(row, key) for _, key in _MD_COLUMNS] for row in rows]


def write_grid(path: Path, reference: list[Image.Image], rows: list[dict[str, Any]], prompts: EvalPrompts) -> None:
    """One row per recipe in leaderboard order under the reference row; a failed recipe gets grey tiles."""
    blank = Image.new("RGB", reference[0].size, _FAILED_TILE)
    grid_rows = [("unquantized (reference)", reference)]
    for row in rows:
        images = row.get("images") or [blank] * len(reference)
        label = row["recipe"] + (" (failed)" if row["status"] == "failed" else f": PSNR {_fmt(row['psnr_db'])} dB")
        grid_rows.append((label, images))
    image_grid(grid_rows, prompts.labels(), path)


def write_layers_plot(path: Path, rows: list[dict[str, Any]], evaluator: CheckpointEvaluator, title: str) -> None:
    """Per-layer output SQNR per recipe (None: exact, drawn as +inf; a layer a recipe skipped: absent)."""
    evaluated = [row for row in rows if row.get("layers")]
    if not evaluated:
        return
    names = {entry["name"] for row in evaluated for entry in row["layers"]}
    order = [name for name, _ in evaluator.fp_module.named_modules() if name in names]
    series = {}
    for row in evaluated:
        by_name = {entry["name"]: entry["output_sqnr_db"] for entry in row["layers"]}
        series[row["recipe"]] = [math.nan if n not in by_name else math.inf if by_name[n] is None else by_name[n] for n in order]
    layer_sqnr_plot(series, order, path, title)


def _run_recipe(name: str, source: str, artifact: CalibrationArtifact, evaluator: CheckpointEvaluator, settings: SweepSettings,
                show_progress: bool) -> dict[str, Any]:
    """Quantize (or reuse) and evaluate one recipe; any failure becomes a `failed` row."""
    checkpoint = settings.out / "checkpoints" / name
    started = time.perf_counter()
    try:
        reused = not settings.overwrite and _matching_checkpoint(checkpoint, source, artifact)
        stats_cache = None
        if not reused:
            result = quantize(
                QuantizeSettings(calib=settings.calib, recipe=source, out=checkpoint, device=settings.device,
                                 overwrite=settings.overwrite, use_stats_cache=settings.use_stats_cache),
                show_progress=show_progress,
            )
            stats_cache = result.manifest["stats_cache"]
            del result
        record = evaluator.evaluate(checkpoint, artifact)
        for i, image in enumerate(record.get("images", [])):
            save_image_atomic(image, settings.out / "images" / name / _image_name(settings.prompts, i))
        return {**record, "status": "reused" if reused else "ok", "calibration": calibration_need(load_recipe(source)),
                "error": None, "stats_cache": stats_cache,
                "sweep_seconds": round(time.perf_counter() - started, 3)}
    except Exception as exc:  # noqa: BLE001 - one recipe's failure is a leaderboard row; the sweep goes on
        error = _one_line(exc)
        if checkpoint.is_dir() and not any(checkpoint.iterdir()):
            checkpoint.rmdir()
        errors = settings.out / "errors"
        errors.mkdir(exist_ok=True)
        write_bytes_atomic(errors / f"{name}.txt", "".join(traceback.format_exception(exc)).encode())
        row: dict[str, Any] = {column: None for column in LEADERBOARD_COLUMNS}
        row.update(recipe=name, status="failed", error=error, checkpoint=str(checkpoint), stats_cache=None,
                   sweep_seconds=round(time.perf_counter() - started, 3))
        return row


def _matching_checkpoint(checkpoint: Path, source: str, artifact: CalibrationArtifact) -> bool:
    """Whether `checkpoint` already holds this recipe quantized from this artifact."""
    if not (checkpoint / MANIFEST_NAME).is_file():
        return False
    try:
        manifest = read_checkpoint_manifest(checkpoint)
    except (DiffquantError, OSError, ValueError, KeyError):
        return False
    return manifest.recipe == load_recipe(source).source and manifest.calibration.get("manifest_sha256") == artifact.manifest_sha256


def _settings_used(settings: SweepSettings, preset: Any, names: list[str], rows: list[dict[str, Any]]) -> dict[str, Any]:
    prompts = settings.prompts
    recipes_arg = ",".join(settings.recipes)
    command = (f"diffquant sweep --calib {settings.calib} --recipes {recipes_arg} --out {settings.out} --device {settings.device}"
               f" --prompts {prompts.source} --eval-prompts {len(prompts.prompts)} --seeds {','.join(map(str, prompts.seeds))}"
               f" --steps {prompts.steps or preset.steps}")
    if not settings.images:
        command += " --no-images"
    if not settings.use_stats_cache:
        command += " --no-stats-cache"
    return {
        "calib": str(settings.calib),
        "model": preset.name,
        "target": preset.target,
        "recipes": names,
        "out": str(settings.out),
        "device": settings.device,
        "images": settings.images,
        "eval": prompts.describe(preset) if settings.images else None,
        "holdout_samples": sorted({row["holdout_samples"] for row in rows if row["holdout_samples"] is not None}),
        "stats_cache": settings.use_stats_cache,
        "overwrite": settings.overwrite,
        "command": command,
    }


def _held_out(used: dict[str, Any]) -> str:
    return "/".join(map(str, used["holdout_samples"])) or "no"


def _images(used: dict[str, Any]) -> str:
    ev = used["eval"]
    if ev is None:
        return "no images (--no-images)"
    return f"{len(ev['prompts'])} prompt(s) x seeds {','.join(map(str, ev['seeds']))} at {ev['steps']} steps"


def _recipe_file_name(path: Path) -> str:
    try:
        return load_recipe(str(path)).name
    except DiffquantError:
        return path.stem  # an invalid file still gets its row, named after the file


def _image_name(prompts: EvalPrompts, index: int) -> str:
    prompt_index, seed_index = divmod(index, len(prompts.seeds))
    return f"{prompt_index}-seed{prompts.seeds[seed_index]}.png"


def _one_line(exc: BaseException) -> str:
    message = exc.message if isinstance(exc, DiffquantError) else str(exc)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _is_exact(row: dict[str, Any], key: str) -> bool:
    """Whether a None figure of `row` means +inf dB (computed, exact) rather than not computed."""
    if row[key] is not None or key not in _INF_WHEN_NONE:
        return False
    return row["ssim"] is not None if key == "psnr_db" else row["holdout_samples"] is not None


def _csv_cell(row: dict[str, Any], key: str) -> str:
    """Floats as repr (they read back bit-exact); None as inf where it means an exact match, else empty."""
    value = row[key]
    if value is None:
        return "inf" if _is_exact(row, key) else ""
    return repr(value) if isinstance(value, float) else str(value)


def _md_cell(row: dict[str, Any], key: str) -> str:
    value = row[key]
    if value is None:
        return "inf" if _is_exact(row, key) else "-"
    if key == "checkpoint_bytes":
        return f"{value:,}"
    if key in ("ratio_vs_fp16", "quantized_weights_ratio_vs_fp16", "ssim"):
        return f"{value:.4f}"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value).replace("|", "/")


def _fmt(value: float | None) -> str:
    return "inf" if value is None else f"{value:.2f}"
