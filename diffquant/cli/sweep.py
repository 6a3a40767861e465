"""`diffquant sweep`: quantize and evaluate many recipes from one calibration artifact."""

from __future__ import annotations

import json
from pathlib import Path

import click

from diffquant.cli.eval import parse_seeds
from diffquant.cli.params import ARTIFACT_PATH, LOCAL_DIR
from diffquant.cli.summary import print_table
from diffquant.errors import ConfigError
from diffquant.paths import newest_calibration
from diffquant.stages.evaluate import DEFAULT_EVAL_PROMPTS, EvalPrompts
from diffquant.stages.sweep import SweepSettings, leaderboard_cells, sweep


@click.command("sweep")
@click.option("--calib", type=ARTIFACT_PATH, default=None, help="Calibration artifact directory or fsspec URL (from `diffquant calibrate`).")
@click.option("--model", default=None, help="Instead of --calib: use the newest complete artifact of this model under artifacts/calib/.")
@click.option("--recipes", default="all", help="Comma-separated recipe names or recipe files; `all` is every recipe in configs/quant.")
@click.option("--out", type=LOCAL_DIR, default=None, help="Output directory [default: artifacts/sweeps/<model>-<short hash>].")
@click.option("--device", default="auto", help="Device to quantize and generate on: auto (cuda if available), cpu, cuda, ...")
@click.option("--prompts", "prompt_source", default="builtin", help="Evaluation prompts: 'builtin', a text file (one per line), or a COCO captions .tsv.")
@click.option("--eval-prompts", type=int, default=DEFAULT_EVAL_PROMPTS, help="How many evaluation prompts (the first N of --prompts).")
@click.option("--seeds", default="0,1", help="Comma-separated seeds; every prompt is generated with every seed.")
@click.option("--steps", type=int, default=None, help="Denoising steps of the evaluation images [default: the preset's].")
@click.option("--no-images", is_flag=True, help="Skip image generation (no PSNR/SSIM, no grid.png): held-out SQNR figures only.")
@click.option("--no-stats-cache", is_flag=True, help="Recompute the activation statistics for every recipe instead of caching them.")
@click.option("--overwrite", is_flag=True, help="Re-quantize recipes whose checkpoint is already in --out (default: reuse a matching one).")
@click.option("--json", "as_json", is_flag=True, help="Print the leaderboard and settings as JSON.")
def sweep_command(calib: Path | str | None, model: str | None, recipes: str, out: Path | None, device: str, prompt_source: str, eval_prompts: int,
                  seeds: str, steps: int | None, no_images: bool, no_stats_cache: bool, overwrite: bool, as_json: bool) -> None:
    """Quantize every recipe from one calibration artifact, evaluate each against the unquantized
    model, and write leaderboard.{md,csv,json}, grid.png and layers.png.

    \b
    Example:
      diffquant sweep --calib artifacts/calib/check --recipes all --out artifacts/sweeps/check
      diffquant sweep --model tiny-sdxl --recipes int8_w8a8,fp8,w4a4 --eval-prompts 2 --seeds 0
      make sweep MODEL=tiny-sdxl RECIPES=int8_w8a8,fp8 ARGS="--no-images"

    A failing recipe is listed in the leaderboard with its error; the sweep goes on.
    """
    if (calib is None) == (model is None):
        raise ConfigError("pass exactly one of --calib DIR and --model NAME", "e.g. --calib artifacts/calib/check, or --model tiny-sdxl")
    calib = calib or newest_calibration(model)
    settings = SweepSettings(
        calib=calib, recipes=tuple(recipes.split(",")), out=out, device=device,
        prompts=EvalPrompts.build(prompt_source, eval_prompts, parse_seeds(seeds), steps),
        images=not no_images, overwrite=overwrite, use_stats_cache=not no_stats_cache,
    )
    result = sweep(settings, show_progress=not as_json)
    if as_json:
        rows = [{k: v for k, v in row.items() if k not in ("images", "layers", "image_figures")} for row in result.rows]
        click.echo(json.dumps({"out": str(result.out), "settings": result.settings, "rows": rows}, sort_keys=True))
        return
    headers, cells = leaderboard_cells(result.rows)
    click.echo("")
    print_table(headers, cells)
    for row in result.rows:
        if row["status"] == "failed":
            click.echo(f"failed: {row['recipe']}: {row['error']} (traceback in {result.out / 'errors' / (row['recipe'] + '.txt')})")
    click.echo("")
    used = result.settings
    defaults = [
        ["calibration", used["calib"]],
        ["model / target", f"{used['model']} / {used['target']}"],
        ["recipes", ", ".join(used["recipes"])],
        ["device", used["device"]],
        ["held-out samples", ", ".join(map(str, used["holdout_samples"])) or "-"],
        ["stats cache", "on" if used["stats_cache"] else "off"],
    ]
    if used["eval"]:
        ev = used["eval"]
        defaults += [["eval prompts", f"{len(ev['prompts'])} from {ev['source']}"], ["seeds", ",".join(map(str, ev["seeds"]))],
                     ["steps", ev["steps"]], ["pipeline kwargs", json.dumps(ev["pipeline_kwargs"], sort_keys=True)]]
    else:
        defaults.append(["images", "off (--no-images)"])
    print_table(["setting", "value"], defaults)
    written = [name for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.json", "grid.png", "layers.png") if (result.out / name).is_file()]
    click.echo(f"\nwrote {result.out}: {', '.join(written)}")
    click.echo(f"repeat with: {used['command']}")
