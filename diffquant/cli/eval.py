"""`diffquant eval`: the figures of one quantized checkpoint, as `diffquant sweep` computes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from diffquant.artifacts.checkpoint import read_checkpoint_manifest
from diffquant.cli.params import ARTIFACT_PATH
from diffquant.cli.summary import print_table
from diffquant.errors import ConfigError
from diffquant.paths import resolve_device
from diffquant.stages.evaluate import DEFAULT_EVAL_PROMPTS, CheckpointEvaluator, EvalPrompts, evaluation_preset, open_calibration


@click.command("eval")
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True, help="Quantized checkpoint directory (from `diffquant quantize` or a sweep).")
@click.option("--calib", type=ARTIFACT_PATH, default=None, help="Calibration artifact [default: the one the checkpoint manifest names].")
@click.option("--prompts", "prompt_source", default="builtin", help="Evaluation prompts: 'builtin', a text file (one per line), or a COCO captions .tsv.")
@click.option("--num-prompts", type=int, default=DEFAULT_EVAL_PROMPTS, help="How many evaluation prompts (the first N of --prompts).")
@click.option("--seeds", default="0,1", help="Comma-separated seeds; every prompt is generated with every seed.")
@click.option("--steps", type=int, default=None, help="Denoising steps of the evaluation images [default: the preset's].")
@click.option("--device", default="auto", help="Device to evaluate on: auto (cuda if available), cpu, cuda, ...")
@click.option("--no-images", is_flag=True, help="Skip image generation: held-out SQNR figures only.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON (per-layer and per-image figures included).")
def eval_command(checkpoint: Path, calib: Path | str | None, prompt_source: str, num_prompts: int, seeds: str, steps: int | None, device: str,
                 no_images: bool, as_json: bool) -> None:
    """Evaluate one checkpoint against the unquantized model: submodule and per-layer output SQNR
    on the held-out samples of its calibration artifact, image PSNR and SSIM on fixed prompts and seeds.

    \b
    Example:
      diffquant eval --checkpoint artifacts/quantized/check-w8a8
      diffquant eval --checkpoint artifacts/sweeps/tiny-sdxl-1a2b3c4d/checkpoints/fp8 --num-prompts 1 --seeds 0 --json

    Figures are recomputed from the stored checkpoint; with the same prompts, seeds and steps they
    equal the sweep's. Without its calibration artifact, only the image figures are computed.
    """
    manifest = read_checkpoint_manifest(checkpoint)
    recorded = manifest.calibration
    artifact, why = open_calibration(calib or recorded.get("path"), recorded.get("manifest_sha256"))
    if artifact is None:
        if no_images:
            raise ConfigError(f"nothing to evaluate: {why}", "pass --calib with the checkpoint's calibration artifact, or drop --no-images")
        click.echo(f"{why}: computing image metrics only (pass --calib DIR if the artifact moved)", err=True)
    preset = evaluation_preset(manifest.model, artifact)
    device = resolve_device(device)
    prompts = None if no_images else EvalPrompts.build(prompt_source, num_prompts, parse_seeds(seeds), steps)
    record = CheckpointEvaluator(preset, device, prompts, show_progress=not as_json).evaluate(checkpoint, artifact, why)
    record.pop("images", None)
    record["eval"] = prompts.describe(preset) if prompts else None
    record["device"] = device
    if as_json:
        click.echo(json.dumps(record, sort_keys=True))
        return
    print_layers(record)
    print_table(["figure", "value"], [[key, _fmt(key, record.get(key), record)] for key in SUMMARY_KEYS])
    click.echo(f"\nheld-out figures: {_holdout_line(record['holdout'])}")
    if prompts:
        ev = record["eval"]
        click.echo(f"images: {len(ev['prompts'])} prompts from {ev['source']} x seeds {','.join(map(str, ev['seeds']))}, "
                   f"{ev['steps']} steps, pipeline kwargs {json.dumps(ev['pipeline_kwargs'], sort_keys=True)}, device {device}")


SUMMARY_KEYS = ("checkpoint", "recipe", "weight_format", "activation_format", "checkpoint_bytes", "ratio_vs_fp16", "output_sqnr_db",
                "median_layer_output_sqnr_db", "worst_layer_output_sqnr_db", "holdout_samples", "psnr_db", "ssim", "quantize_seconds")


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0,1' -> (0, 1); refuses anything but non-negative integers."""
    try:
        seeds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"--seeds {text!r} is not a comma-separated list of integers", "write e.g. --seeds 0,1") from None
    if not seeds or min(seeds) < 0:
        raise ConfigError(f"--seeds {text!r} holds no seed or a negative one", "write e.g. --seeds 0,1")
    return seeds


def print_layers(record: dict[str, Any]) -> None:
    if not record.get("layers"):
        return
    rows = [[e["name"], _db(e["weight_sqnr_db"]), _db(e["output_sqnr_db"])] for e in record["layers"]]
    print_table(["layer", "weight SQNR dB", "output SQNR dB"], rows)
    click.echo("")


def _holdout_line(holdout: dict[str, Any]) -> str:
    if holdout["status"] == "evaluated":
        return f"{holdout['samples']} samples of {holdout['artifact']}"
    return f"skipped ({holdout['reason']})"


def _fmt(key: str, value: Any, record: dict[str, Any]) -> str:
    if value is None:  # +inf dB where the figure was computed (exact match), else not computed
        computed = record["holdout"]["status"] == "evaluated" if "sqnr" in key else record.get("ssim") is not None
        return "inf" if computed and key.endswith("_db") else "-"
    if isinstance(value, float):
        return f"{value:.4f}" if key in ("ratio_vs_fp16", "ssim") else f"{value:.2f}"
    return str(value)


def _db(value: float | None) -> str:
    return "inf" if value is None else f"{value:.2f}"
