"""`diffquant quantize`: stage two from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from diffquant.cli.params import ARTIFACT_PATH, LOCAL_DIR
from diffquant.cli.summary import human_bytes, print_table
from diffquant.errors import ConfigError
from diffquant.paths import newest_calibration
from diffquant.stages.quantize import DEFAULT_LAYER_ROWS, DEFAULT_MAX_BLOCK_SHARE, QuantizeSettings, quantize


@click.command("quantize")
@click.option("--calib", type=ARTIFACT_PATH, default=None, help="Calibration artifact directory or fsspec URL (from `diffquant calibrate`).")
@click.option("--model", default=None, help="Instead of --calib: use the newest complete artifact of this model under artifacts/calib/.")
@click.option("--recipe", required=True, help="Recipe name (see configs/quant) or path to a recipe YAML.")
@click.option("--out", type=LOCAL_DIR, default=None, help="Output directory [default: artifacts/quantized/<model>-<recipe>-<short hash>].")
@click.option("--device", default="auto", help="Device to quantize on: auto (cuda if available), cpu, cuda, ...")
@click.option("--limit", type=int, default=None, help="Use at most this many calibration samples.")
@click.option("--every", type=int, default=None, help="Use every k-th calibration sample.")
@click.option("--timestep-min", type=float, default=None, help="Only samples with timestep >= this.")
@click.option("--timestep-max", type=float, default=None, help="Only samples with timestep <= this.")
@click.option("--uniform-steps", type=int, default=None, help="Only N denoising steps, evenly spaced over the trajectory.")
@click.option("--max-per-step", type=int, default=None, help="At most N samples per denoising step.")
@click.option("--holdout", type=int, default=None, help="Samples held out for the quality report; 0 turns the report off [default: the recipe's, 4].")
@click.option("--num-workers", type=int, default=0, help="DataLoader worker processes reading the shards.")
@click.option("--layer-rows", type=int, default=DEFAULT_LAYER_ROWS,
              help="Rows (tokens, or pixels of a centred window) of each layer's input per held-out sample for the per-layer figures; 0: every row.")
@click.option("--device-map", default=None, help="Place the submodule with accelerate (auto, balanced, ...) for models larger than one device.")
@click.option("--max-memory", default=None, metavar="DEV=SIZE,...", help="With --device-map: memory per device, e.g. 0=20GiB,cpu=64GiB.")
@click.option("--offload-folder", default=None, help="With --device-map: where weights that fit nowhere are offloaded.")
@click.option("--blockwise", is_flag=True, help="Keep the weights in CPU memory and move one block at a time to --device (instead of --device-map).")
@click.option("--max-block-share", type=float, default=None,
              help=f"With --blockwise: a block holding more of the weights than this is split into its children [default: {DEFAULT_MAX_BLOCK_SHARE}].")
@click.option("--overwrite", is_flag=True, help="Replace a checkpoint already in --out.")
@click.option("--no-stats-cache", is_flag=True, help="Recompute the activation statistics instead of reading or writing the cache beside the artifact.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the calibration shards before use.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def quantize_command(calib: Path | str | None, model: str | None, recipe: str, out: Path | None, device: str, limit: int | None, every: int | None,
                     timestep_min: float | None, timestep_max: float | None, uniform_steps: int | None,
                     max_per_step: int | None, device_map: str | None, max_memory: str | None, offload_folder: str | None, blockwise: bool, max_block_share: float | None,
                     holdout: int | None, num_workers: int, layer_rows: int,
                     overwrite: bool, no_stats_cache: bool, no_verify: bool, as_json: bool) -> None:
    """Quantize the calibrated submodule with a recipe and write a checkpoint plus scale manifest.

    \b
    Example:
      diffquant quantize --calib artifacts/calib/check --recipe int8_w8a8 --out artifacts/quantized/check-w8a8
      diffquant quantize --model sdxl --recipe int8_w8a8     # newest sdxl artifact, default --out
      diffquant quantize --calib artifacts/calib/sd3 --recipe svdquant_w4a4 --out artifacts/quantized/sd3-w4a4 --device cuda
    """
    if (calib is None) == (model is None):
        raise ConfigError("pass exactly one of --calib DIR and --model NAME", "e.g. --calib artifacts/calib/check, or --model tiny-sdxl")
    picked = calib is None
    calib = calib or newest_calibration(model)
    settings = QuantizeSettings(
        calib=calib, recipe=recipe, out=out, device=device, overwrite=overwrite, limit=limit, every=every,
        timestep_min=timestep_min, timestep_max=timestep_max, uniform_steps=uniform_steps,
        max_per_step=max_per_step, holdout=holdout, device_map=device_map, max_memory=parse_max_memory(max_memory),
        offload_folder=offload_folder, blockwise=blockwise, max_block_share=max_block_share, num_workers=num_workers,
        use_stats_cache=not no_stats_cache, layer_rows=layer_rows or None, verify=not no_verify,
    )
    result = quantize(settings, show_progress=not as_json)
    summary = checkpoint_summary(result.manifest, result.out)
    rule = result.manifest["calibration"].get("holdout_rule")
    if rule:
        click.echo(f"holdout: {summary['holdout_samples']} samples ({rule})", err=True)
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
        return
    print_layer_report(result.manifest)
    click.echo("")
    print_table(["field", "value"], [[key, _fmt(value)] for key, value in summary.items()])
    newest = f" (the newest complete artifact of {model}; choose one with --calib DIR)" if picked else ""
    click.echo(f"checkpoint: {result.out}  from calibration artifact {calib}{newest}")


def parse_max_memory(text: str | None) -> dict[str, str] | None:
    """`0=20GiB,cpu=64GiB` -> {"0": "20GiB", "cpu": "64GiB"} (accelerate's max_memory)."""
    if not text:
        return None
    pairs = [item.partition("=") for item in text.split(",")]
    if any(not sep or not key.strip() or not value.strip() for key, sep, value in pairs):
        raise ConfigError(f"--max-memory {text!r} is not DEVICE=SIZE,...", "write e.g. --max-memory 0=20GiB,cpu=64GiB")
    return {key.strip(): value.strip() for key, _, value in pairs}


def checkpoint_summary(manifest: dict[str, Any], out: Path) -> dict[str, Any]:
    quality, sizes, placement = manifest["quality"], manifest["sizes"], manifest.get("placement", {})
    summary = {
        "checkpoint": str(out),
        "model": manifest["model"]["name"],
        "recipe": manifest["quantization_config"]["recipe"],
        "quantized_layers": len(manifest["layers"]),
        "skipped_layers": len(manifest["skipped"]),
        "calibration_samples": manifest["calibration"]["num_calibration_samples"],
        "holdout_samples": quality["holdout_samples"],
        # The report off (--holdout 0) has no figures, which is not the same as +inf dB (null).
        **({"quality_report": "off"} if quality.get("report") == "off" else
           {key: quality[key] for key in ("output_sqnr_db", "median_layer_output_sqnr_db", "worst_layer_output_sqnr_db")}),
        "checkpoint_bytes": sizes["checkpoint_bytes"],
        "fp16_bytes": sizes["fp16_bytes"],
        "ratio_vs_fp16": sizes["ratio_vs_fp16"],
        "quantized_weights_ratio_vs_fp16": sizes["quantized_weights_ratio_vs_fp16"],
        "quantize_seconds": manifest["timing"]["quantize_seconds"],
        **{f"{phase}_seconds": seconds for phase, seconds in manifest["timing"].get("phases_seconds", {}).items()},
        "placement": placement.get("mode", "whole"),
    }
    if "peak_resident_bytes" in placement:
        summary["peak_device_weight_bytes"] = placement["peak_resident_bytes"]
        summary["model_weight_bytes"] = placement["total_bytes"]
    return summary


def print_layer_report(manifest: dict[str, Any]) -> None:
    """Per-layer table: format, weight SQNR, output SQNR on held-out samples."""
    rows = []
    for layer in manifest["layers"]:
        q = layer["quality"]
        act = layer["input"]["dtype"] if layer["input"] else "-"
        figures = [_db(q["weight_sqnr_db"]), _db(q["output_sqnr_db"])] if q else ["-", "-"]  # empty: the report was off
        rows.append([layer["name"], layer["type"], layer["weight_format"], act, *figures])
    print_table(["layer", "type", "weight", "input", "weight SQNR dB", "output SQNR dB"], rows)
    if manifest["skipped"]:
        click.echo(f"\n{len(manifest['skipped'])} layers left unquantized: " + "; ".join(f"{s['name']} ({s['reason']})" for s in manifest["skipped"][:8])
                   + (" ..." if len(manifest["skipped"]) > 8 else ""))


def _db(value: float | None) -> str:
    return "inf" if value is None else f"{value:.2f}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if value is None:
        return "inf"
    if isinstance(value, int) and value > 10_000:
        return f"{value} ({human_bytes(value)})"
    return str(value)
