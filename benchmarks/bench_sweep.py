"""Benchmark: one calibration + a sweep of K recipes against K separate calibrate-then-quantize runs,
and one quantize() call with a warm activation-statistics cache against a cold one.

Prints one markdown section (`## Sweep and statistics cache`) on stdout with the measured ratios
next to their targets, progress on stderr; never asserts a timing. Run from the repository root:

    .venv/bin/python benchmarks/bench_sweep.py            # 16 prompts x 10 steps at 128 px
    .venv/bin/python benchmarks/bench_sweep.py --quick    # 4 prompts x 3 steps at 64 px, a smoke run

What each side includes:
* sweep side: `calibrate` (pipeline load + capture) once, then `sweep(..., images=False)`: for each
  recipe `quantize` (submodule load, statistics from the cache after the first recipe, layer
  quantization, its own held-out quality report, checkpoint write) plus the sweep's evaluation of
  the stored checkpoint (reload, held-out submodule and per-layer SQNR), and the leaderboard and
  layers.png. No image generation (`--no-images`).
* separate side: for each recipe, `calibrate` into a fresh directory (so the statistics cache is
  cold), then `quantize`. No reload-and-evaluate step: the separate side does less evaluation work
  than the sweep, so the ratio is, if anything, pessimistic for the sweep.
* cache figure: the `quantize()` call alone, on one artifact: the first recipe (cold cache: one
  statistics pass over the calibration samples) against the second (warm: statistics read back).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL = "tiny-sdxl"
RECIPES = ("int8_w8a8", "int8_w8a8_percentile", "int8_w8a8_mse", "fp8")
SWEEP_TARGET = 0.4
WARM_TARGET = 0.2
FULL = {"num_prompts": 16, "steps": 10, "size": 128}
QUICK = {"num_prompts": 4, "steps": 3, "size": 64}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 prompts x 3 steps at 64 px: checks the script, not the ratios")
    parser.add_argument("--device", default="cpu", help="device for calibration and quantization (default cpu)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from diffquant.stages.calibrate import CalibrationSettings, calibrate
    from diffquant.stages.quantize import QuantizeSettings, quantize
    from diffquant.stages.sweep import SweepSettings, sweep

    config = QUICK if args.quick else FULL
    size = config["size"]

    def calibrate_into(out: Path, num_prompts: int = config["num_prompts"], steps: int = config["steps"]) -> Path:
        calibrate(CalibrationSettings(model=MODEL, out=out, num_prompts=num_prompts, steps=steps, device=args.device,
                                      pipeline_kwargs={"height": size, "width": size}), show_progress=False)
        return out

    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        root = Path(tmp)
        # Imports, the tiny pipeline build and first-call costs land in this untimed run.
        warm = calibrate_into(root / "warmup", num_prompts=2, steps=3)
        quantize(QuantizeSettings(calib=warm, recipe=RECIPES[0], out=root / "warmup-q", device=args.device, holdout=1), show_progress=False)

        progress("sweep side: one calibration, then the sweep")
        started, cpu_started = time.perf_counter(), time.process_time()
        calib = calibrate_into(root / "sweep-calib")
        calibration_seconds = time.perf_counter() - started
        num_samples = json.loads((calib / "manifest.json").read_text())["num_samples"]
        result = sweep(SweepSettings(calib=calib, recipes=RECIPES, out=root / "sweep", device=args.device, images=False), show_progress=False)
        sweep_side, sweep_cpu = time.perf_counter() - started, time.process_time() - cpu_started
        per_recipe = ", ".join(f"{row['recipe']} {row['quantize_seconds']:.2f} + {row['sweep_seconds'] - row['quantize_seconds']:.2f}"
                               for row in result.rows if row["status"] != "failed")
        failed = [row["recipe"] for row in result.rows if row["status"] == "failed"]

        separate_side = separate_cpu = 0.0
        cold = warm_seconds = None
        reports = {}
        for k, recipe in enumerate(RECIPES):
            progress(f"separate run {k + 1}/{len(RECIPES)}: calibrate + quantize {recipe}")
            started, cpu_started = time.perf_counter(), time.process_time()
            own = calibrate_into(root / f"separate-{k}")
            q_started = time.perf_counter()
            manifest = quantize(QuantizeSettings(calib=own, recipe=recipe, out=root / f"separate-{k}-q", device=args.device),
                                show_progress=False).manifest
            done = time.perf_counter()
            separate_side += done - started
            separate_cpu += time.process_time() - cpu_started
            if k == 0:
                cold, reports["cold"] = done - q_started, manifest["stats_cache"]
        # The second recipe on the first separate artifact, whose cache the first recipe filled.
        started = time.perf_counter()
        manifest = quantize(QuantizeSettings(calib=root / "separate-0", recipe=RECIPES[1], out=root / "warm-q", device=args.device),
                            show_progress=False).manifest
        warm_seconds, reports["warm"] = time.perf_counter() - started, manifest["stats_cache"]

    command = " ".join([".venv/bin/python", "benchmarks/bench_sweep.py", *(["--quick"] if args.quick else []),
                        *([f"--device {shlex.quote(args.device)}"] if args.device != "cpu" else [])])
    sweep_ratio = sweep_side / separate_side
    sweep_cpu_ratio = sweep_cpu / separate_cpu
    warm_ratio = warm_seconds / cold
    lines = [
        "## Sweep and statistics cache",
        "",
        f"`{command}` — {MODEL}, {config['num_prompts']} prompts x {config['steps']} steps at {size}x{size} px per calibration, "
        f"{num_samples} samples, K = {len(RECIPES)} recipes ({', '.join(RECIPES)}), device {args.device}, torch {torch.__version__}, 1 thread, "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}."
        + (" **Quick run: calibration does not dominate at this size; the ratios are not meaningful.**" if args.quick else ""),
        "",
        "| measurement | wall s | CPU s | ratio (wall) | ratio (CPU) | target |",
        "|---|---:|---:|---:|---:|---:|",
        f"| one calibration + sweep of K recipes, no images (calibration alone: {calibration_seconds:.2f} s wall) "
        f"| {sweep_side:.2f} | {sweep_cpu:.2f} | | | |",
        f"| K separate runs, each calibrate (fresh directory, cold cache) + quantize | {separate_side:.2f} | {separate_cpu:.2f} | | | |",
        f"| **sweep / separate** | | | **{sweep_ratio:.3f}** | **{sweep_cpu_ratio:.3f}** | <= {SWEEP_TARGET} |",
        f"| quantize() of {RECIPES[0]}, cold cache (computed: {', '.join(reports['cold']['computed']) or 'nothing'}) | {cold:.3f} | | | | |",
        f"| quantize() of {RECIPES[1]}, warm cache (hits: {', '.join(reports['warm']['hits']) or 'none'}; "
        f"computed: {', '.join(reports['warm']['computed']) or 'nothing'}) | {warm_seconds:.3f} | | | | |",
        f"| **warm / cold** | | | **{warm_ratio:.3f}** | | <= {WARM_TARGET} |",
        "",
        f"Sweep, per recipe (quantize s + reload-and-evaluate s, wall): {per_recipe}.",
        "",
        "Sweep side: calibrate once, then per recipe quantize (statistics from the cache after the first) and the sweep's "
        "reload-and-evaluate of the stored checkpoint (held-out submodule and per-layer SQNR), plus leaderboard and layers.png; "
        "no image generation. Separate side: per recipe, calibrate into a fresh directory and quantize, without the sweep's "
        "extra evaluation. Warm/cold: the quantize() call alone, same artifact, first recipe then second. CPU s is "
        "process time (one thread): less disturbed than wall time by other load on a shared machine.",
    ]
    if failed:
        lines += ["", f"**Recipes that failed in the sweep: {', '.join(failed)}** (their time is still counted)."]
    print("\n".join(lines))
    sys.stdout.flush()


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
