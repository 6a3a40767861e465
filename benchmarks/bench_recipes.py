"""Every recipe on every tiny family: checkpoint size against fp16, output SQNR, quantize time;
and SVDQuant's randomized SVD against the full SVD.

Each family gets one small calibration (a few prompts x 3 steps, 64 px); every recipe in
configs/quant quantizes it with the statistics cache off, so each run pays its own statistics
pass. SVDQuant w4a4 then runs on tiny-sdxl and tiny-flux as shipped (`svd: lowrank`) and as a
copy of the recipe with `svd: full`, alternating; and `low_rank_split` alone is timed at the real
models' layer shapes, where the difference shows.

Run: `python benchmarks/bench_recipes.py [--quick]`; prints one markdown section.
"""

from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from harness import command_line, fmt, markdown_table, median, parse_args, progress, threads_note

from diffquant.paths import CONFIG_DIR
from diffquant.quant.algorithms.svdquant import low_rank_split
from diffquant.recipes import available_recipes
from diffquant.stages.calibrate import CalibrationSettings, calibrate
from diffquant.stages.quantize import QuantizeSettings, quantize

SCRIPT = "bench_recipes.py"
FAMILIES = ("sdxl", "sd15", "sd21", "sd3", "flux", "pixart")
SVD_FAMILIES = ("sdxl", "flux")
SVD_RECIPE = "svdquant_w4a4"
STEPS = 3
SVD_RANK = 32
QUICK_RECIPES = ("int8_w8a8", "int8_weight_only", "nvfp4", "svdquant_w4a4")


@dataclass(frozen=True)
class Plan:
    prompts: int
    recipes: tuple[str, ...]
    svd_repeats: int
    svd_shapes: tuple[tuple[int, int], ...]


FULL = Plan(4, tuple(available_recipes()), 3, ((640, 640), (1280, 1280), (1280, 5120)))
QUICK = Plan(2, QUICK_RECIPES, 1, ((640, 640),))


def main() -> None:
    args = parse_args(__doc__)
    plan = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="diffquant-bench-") as tmp:
        work = Path(tmp)
        calibs = {family: _calibrate(family, plan, work) for family in FAMILIES}
        progress(f"{SCRIPT}: quantize warm-up (first-call costs stay out of the first recipe's time)")
        _quantize(calibs[FAMILIES[0]], "int8_weight_only", work / "warm-up")
        matrix = {(family, recipe): _quantize(calibs[family], recipe, work / family / recipe)
                  for family in FAMILIES for recipe in _announce(plan.recipes, family)}
        svd = svd_comparison(plan, calibs, work)
        split = svd_split_timing(plan)
        print(render(plan, args.quick, calibs, matrix, svd, split))


def _announce(recipes: tuple[str, ...], family: str) -> tuple[str, ...]:
    progress(f"{SCRIPT}: quantize tiny-{family} with {len(recipes)} recipes")
    return recipes


def _calibrate(family: str, plan: Plan, work: Path) -> Path:
    progress(f"{SCRIPT}: calibrating tiny-{family}, {plan.prompts} prompts x {STEPS} steps")
    out = work / "calib" / family
    calibrate(CalibrationSettings(model=f"tiny-{family}", out=out, num_prompts=plan.prompts, steps=STEPS, device="cpu"), show_progress=False)
    return out


def _quantize(calib: Path, recipe: str, out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    result = quantize(QuantizeSettings(calib=calib, recipe=recipe, out=out, device="cpu", use_stats_cache=False), show_progress=False)
    seconds = time.perf_counter() - start
    manifest = result.manifest
    del result
    gc.collect()
    return {
        "seconds": seconds,
        "output_sqnr_db": manifest["quality"]["output_sqnr_db"],
        "median_layer_sqnr_db": manifest["quality"].get("median_layer_output_sqnr_db"),
        "ratio": manifest["sizes"].get("ratio_vs_fp16"),
        "weights_ratio": manifest["sizes"].get("quantized_weights_ratio_vs_fp16"),
        "layers": len(manifest["layers"]),
        "holdout": manifest["quality"]["holdout_samples"],
        "calibration_samples": manifest["calibration"]["num_calibration_samples"],
    }


# SVD: randomized against full --------------------------------------------------------------------


def svd_comparison(plan: Plan, calibs: dict[str, Path], work: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{family: {"lowrank": [runs], "full": [runs]}}, the two alternating."""
    source = yaml.safe_load((CONFIG_DIR / "quant" / f"{SVD_RECIPE}.yaml").read_text())
    for algorithm in source["algorithms"]:
        if algorithm["name"] == "svdquant":
            algorithm["svd"] = "full"
    source["name"] = f"{SVD_RECIPE}_full_svd"
    source["description"] = f"{source.get('description', '')} (benchmark copy: svd: full)"
    full_recipe = work / f"{source['name']}.yaml"
    full_recipe.write_text(yaml.safe_dump(source, sort_keys=False))
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for family in SVD_FAMILIES:
        runs: dict[str, list[dict[str, Any]]] = {"lowrank": [], "full": []}
        for repeat in range(plan.svd_repeats):
            progress(f"{SCRIPT}: SVD lowrank vs full on tiny-{family}, round {repeat + 1}/{plan.svd_repeats}")
            order = (("lowrank", SVD_RECIPE), ("full", str(full_recipe)))
            for method, recipe in order if repeat % 2 == 0 else order[::-1]:
                runs[method].append(_quantize(calibs[family], recipe, work / "svd" / family / f"{method}-{repeat}"))
        results[family] = runs
    return results


def svd_split_timing(plan: Plan) -> list[dict[str, Any]]:
    """`low_rank_split` alone at real layer shapes: seconds, and the residual energy left by each.

    The weight is Gaussian noise plus a rank-8 part with 3x its Frobenius norm (a few dominant
    directions over a flat bulk), smoothing factors of one; both methods keep rank SVD_RANK.
    """
    results = []
    generator = torch.Generator().manual_seed(0)
    for out_features, in_features in plan.svd_shapes:
        progress(f"{SCRIPT}: low_rank_split at {out_features}x{in_features}")
        noise = torch.randn(out_features, in_features, generator=generator)
        spike = torch.randn(out_features, 8, generator=generator) @ torch.randn(8, in_features, generator=generator)
        weight = noise + 3.0 * spike * (noise.norm() / spike.norm())
        smooth = torch.ones(in_features)
        row = {"shape": (out_features, in_features)}
        for method in ("lowrank", "full"):
            start = time.perf_counter()
            split = low_rank_split(weight, smooth, SVD_RANK, method)
            row[f"{method}_seconds"] = time.perf_counter() - start
            row[f"{method}_residual"] = float(split.residual.pow(2).sum() / weight.pow(2).sum())
        results.append(row)
    return results


# Output ----------------------------------------------------------------------------------------


def render(plan: Plan, quick: bool, calibs: dict[str, Path], matrix: dict[tuple[str, str], dict[str, Any]],
           svd: dict[str, dict[str, list[dict[str, Any]]]], split: list[dict[str, Any]]) -> str:
    first = next(iter(matrix.values()))
    out = [
        "## Recipes on every tiny family",
        "",
        command_line(SCRIPT, quick),
        "",
        threads_note() + ".",
        "",
        f"Each family: one calibration of {plan.prompts} prompts x {STEPS} steps at the preset's 64 px "
        f"({first['calibration_samples']} calibration samples + {first['holdout']} held out for the quality figures, same split "
        "for every recipe); `quantize()` with the statistics cache off, after one warm-up run. Random-weight tiny models: "
        "SQNR compares recipes on the same model, not the real models' quality.",
        "",
    ]
    columns = [f"tiny-{family}" for family in FAMILIES]

    def table(title: str, key: str, digits: int, note: str = "") -> list[str]:
        rows = [[recipe] + [fmt(matrix[(family, recipe)][key], digits) for family in FAMILIES] for recipe in plan.recipes]
        return [f"### {title}", "", *( [note, ""] if note else []), markdown_table(["recipe"] + columns, rows), ""]

    out += table("Checkpoint size / fp16 size of the target (whole `model.safetensors`)", "ratio", 3,
                 "Targets: INT8 <= ~0.55 (issue 3), 4-bit <= ~0.30 before the low-rank branch (issue 4), for the real models. "
                 "The tiny targets keep excluded layers, norms and biases in their own dtype (float32 for sdxl, sd15, sd21, "
                 "pixart), a large share of a tiny model, so whole-checkpoint ratios sit above the targets; the next table "
                 "isolates the quantized weights. SVDQuant's 16-bit rank-32 branch is about as large as the weight itself on "
                 "layers a few dozen to a few hundred wide, hence its ratios here.")
    if all(result["weights_ratio"] is not None for result in matrix.values()):
        out += table("Quantized weights (codes + scales) / the same weights in fp16", "weights_ratio", 3)
    out += table("Output SQNR on the held-out samples (dB)", "output_sqnr_db", 1)
    out += table("quantize() wall time (s)", "seconds", 2)
    out += _render_svd(plan, svd, split)
    return "\n".join(out).rstrip() + "\n"


def _render_svd(plan: Plan, svd: dict[str, dict[str, list[dict[str, Any]]]], split: list[dict[str, Any]]) -> list[str]:
    rows = []
    for family, runs in svd.items():
        low, full = runs["lowrank"], runs["full"]
        low_s, full_s = median([r["seconds"] for r in low]), median([r["seconds"] for r in full])
        rows.append([f"tiny-{family}", fmt(low_s, 2), fmt(full_s, 2), fmt(full_s / low_s, 2),
                     fmt(low[0]["output_sqnr_db"], 2), fmt(full[0]["output_sqnr_db"], 2),
                     fmt(low[0]["median_layer_sqnr_db"], 2), fmt(full[0]["median_layer_sqnr_db"], 2)])
    split_rows = [[f"{r['shape'][0]}x{r['shape'][1]}", fmt(r["lowrank_seconds"] * 1000, 1), fmt(r["full_seconds"] * 1000, 1),
                   fmt(r["full_seconds"] / r["lowrank_seconds"], 1), fmt(r["lowrank_residual"], 4), fmt(r["full_residual"], 4)] for r in split]
    return [
        f"### SVDQuant: randomized (`svd: lowrank`) against full SVD ({SVD_RECIPE}, rank {SVD_RANK})",
        "",
        f"Whole `quantize()` runs, {plan.svd_repeats} of each method alternating, median seconds; the SVD is a small part of a "
        "tiny model's quantize time, whose layers are at most a few hundred wide.",
        "",
        markdown_table(["model", "lowrank s", "full s", "full / lowrank time", "lowrank output SQNR dB", "full output SQNR dB",
                        "lowrank median layer SQNR dB", "full median layer SQNR dB"], rows),
        "",
        "`low_rank_split` alone at real layer shapes (SDXL attention 640 and 1280 wide, SDXL feed-forward 1280x5120), on a "
        "Gaussian weight plus a rank-8 part of 3x its norm; residual = |W - L_up L_down|^2 / |W|^2 (full SVD is the optimum).",
        "",
        markdown_table(["weight shape", "lowrank ms", "full ms", "full / lowrank time", "lowrank residual", "full residual"], split_rows),
        "",
    ]


if __name__ == "__main__":
    main()
