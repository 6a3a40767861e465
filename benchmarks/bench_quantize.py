"""Stage two: DataLoader read throughput from shards against RAM, and quantize time and size per recipe.

1. Read throughput: the same samples through `calibration_loader(CalibrationDataset(artifact))`
   (num_workers 0 and 2) and from a list already in RAM (plain iteration, and the same DataLoader
   over the list), each consumer summing every tensor so memory-mapped bytes are really read;
   page cache warm, interleaved rounds, medians. Two artifacts: a real tiny-sdxl calibration
   (small samples: per-sample costs) and synthetic samples of the real SDXL 1024 px shapes
   (bandwidth).
2. `quantize()` wall time per recipe in configs/quant on tiny-sdxl with the statistics cache off,
   output SQNR on the held-out samples, and the checkpoint size against fp16.

Run: `python benchmarks/bench_quantize.py [--quick]`; prints one markdown section.
"""

from __future__ import annotations

import gc
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from harness import (
    SDXL_1024,
    command_line,
    filesystem_of,
    last_level_cache,
    fmt,
    markdown_table,
    median,
    nbytes,
    parse_args,
    progress,
    synthetic_samples,
    threads_note,
    touch,
    write_synthetic_artifact,
)

from diffquant.artifacts.calibration_reader import CalibrationArtifact, CalibrationDataset, calibration_loader
from diffquant.models.submodule import load_submodule
from diffquant.recipes import available_recipes, load_recipe
from diffquant.stages.calibrate import CalibrationSettings, calibrate
from diffquant.models.presets import preset_of_artifact
from diffquant.stages.quantize import QuantizeSettings, quantize

SCRIPT = "bench_quantize.py"
MODEL = "tiny-sdxl"
SIZE = {"height": 128, "width": 128}
READ_TARGET = 0.8
INT8_TARGET = "<= ~0.55 (issue 3)"
FOUR_BIT_TARGET = "<= ~0.30 before the low-rank branch (issue 4)"


@dataclass(frozen=True)
class Plan:
    calib_prompts: int
    calib_steps: int
    synthetic_prompts: int
    synthetic_steps: int
    read_rounds: int
    min_timing: float


FULL = Plan(16, 10, 4, 20, 5, 0.3)
QUICK = Plan(4, 5, 1, 10, 2, 0.05)


def main() -> None:
    args = parse_args(__doc__)
    plan = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="diffquant-bench-") as tmp:
        work = Path(tmp)
        progress(f"{SCRIPT}: calibrating {MODEL} at 128 px, {plan.calib_prompts} prompts x {plan.calib_steps} steps")
        calib = work / "calib"
        calibrate(CalibrationSettings(model=MODEL, out=calib, num_prompts=plan.calib_prompts, steps=plan.calib_steps,
                                      device="cpu", pipeline_kwargs=SIZE), show_progress=False)
        progress(f"{SCRIPT}: writing synthetic SDXL 1024 px samples, {plan.synthetic_prompts} prompts x {plan.synthetic_steps} steps")
        synthetic = work / "synthetic"
        write_synthetic_artifact(synthetic, SDXL_1024, synthetic_samples(SDXL_1024, plan.synthetic_prompts, plan.synthetic_steps), 256.0)
        gc.collect()
        reads = [
            (f"{MODEL} 128 px, {plan.calib_prompts} prompts x {plan.calib_steps} steps", read_throughput(calib, plan.read_rounds, plan.min_timing)),
            (f"synthetic {SDXL_1024.name}, {plan.synthetic_prompts} prompts x {plan.synthetic_steps} steps", read_throughput(synthetic, plan.read_rounds, plan.min_timing)),
        ]
        recipes = quantize_recipes(calib, work / "quantized")
        print(render(plan, args.quick, reads, recipes, filesystem_of(work)))


# 1. Read throughput ----------------------------------------------------------------------------


class ListDataset(torch.utils.data.Dataset):
    """Samples already in RAM, for the DataLoader baseline."""

    def __init__(self, samples: list[dict[str, Any]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.samples[index]


def read_throughput(path: Path, rounds: int, min_timing: float) -> dict[str, Any]:
    """Seconds per round for each way of reading every sample of the artifact at `path`."""
    artifact = CalibrationArtifact(path)
    dataset = CalibrationDataset(artifact)
    in_ram = [_clone(artifact.sample(i)) for i in dataset.indices]
    sample_bytes = sum(nbytes(sample) for sample in in_ram)

    def consume(samples: Iterable[dict[str, Any]]) -> None:
        for sample in samples:
            touch(sample)

    modes: dict[str, Callable[[], None]] = {
        "RAM, list iteration": lambda: consume(in_ram),
        "RAM, DataLoader over the list": lambda: consume(calibration_loader(ListDataset(in_ram), "cpu", num_workers=0)),
        "shards, calibration_loader, num_workers=0": lambda: consume(calibration_loader(CalibrationDataset(artifact), "cpu", num_workers=0)),
        # What quantize pays by default: the artifact opened with every shard's sha256 checked, then read.
        "shards, sha256-verified open + calibration_loader, num_workers=0":
            lambda: consume(calibration_loader(CalibrationDataset(CalibrationArtifact(path, verify=True)), "cpu", num_workers=0)),
        "shards, calibration_loader, num_workers=2": lambda: consume(calibration_loader(CalibrationDataset(artifact), "cpu", num_workers=2)),
    }
    progress(f"{SCRIPT}: read throughput of {path.name}, warm-up (page cache)")
    passes = {}
    for name, mode in modes.items():
        mode()
        start = time.perf_counter()
        mode()
        # Short passes are repeated so that one timing spans at least MIN_TIMING seconds.
        passes[name] = max(1, math.ceil(min_timing / max(time.perf_counter() - start, 1e-6)))
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    names = list(modes)
    for round_index in range(rounds):
        progress(f"{SCRIPT}: read throughput of {path.name}, round {round_index + 1}/{rounds}")
        for name in names[round_index % len(names):] + names[: round_index % len(names)]:
            start = time.perf_counter()
            for _ in range(passes[name]):
                modes[name]()
            seconds[name].append((time.perf_counter() - start) / passes[name])
    return {
        "passes": passes,
        "samples": len(in_ram),
        "sample_mb": sample_bytes / 2**20,
        "stored_mb": artifact.manifest["stored_bytes"] / 2**20,
        "shards": len(artifact.manifest["shards"]),
        "seconds": seconds,
    }


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {key: _clone(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(item) for item in value)
    return value


# 2. Quantize per recipe ------------------------------------------------------------------------


def quantize_recipes(calib: Path, work: Path) -> dict[str, Any]:
    artifact = CalibrationArtifact(calib)
    preset = preset_of_artifact(artifact.manifest["model"])
    parameters = sum(p.numel() for p in load_submodule(preset, device="cpu").parameters())
    rows = []
    recipes = available_recipes()
    progress(f"{SCRIPT}: quantize warm-up (first-call costs stay out of the first recipe's time)")
    quantize(QuantizeSettings(calib=calib, recipe="int8_weight_only", out=work / "warm-up", device="cpu", use_stats_cache=False), show_progress=False)
    for index, recipe in enumerate(recipes):
        progress(f"{SCRIPT}: quantize {recipe} ({index + 1}/{len(recipes)})")
        start = time.perf_counter()
        result = quantize(QuantizeSettings(calib=calib, recipe=recipe, out=work / recipe, device="cpu", use_stats_cache=False), show_progress=False)
        seconds = time.perf_counter() - start
        rows.append({"recipe": recipe, "seconds": seconds, "manifest": result.manifest, "weights": load_recipe(recipe).global_spec.weight.dtype})
        del result
        gc.collect()
    return {"parameters": parameters, "samples": len(artifact), "rows": rows}


# Output ----------------------------------------------------------------------------------------


def render(plan: Plan, quick: bool, reads: list[tuple[str, dict[str, Any]]], recipes: dict[str, Any], filesystem: str) -> str:
    out = ["## Stage two: quantization", ""]
    out += [command_line(SCRIPT, quick), "", threads_note() + f"; artifacts in a temporary directory on {filesystem}.", ""]
    out += _render_reads(plan, reads)
    out += _render_recipes(recipes)
    return "\n".join(out).rstrip() + "\n"


def _render_reads(plan: Plan, reads: list[tuple[str, dict[str, Any]]]) -> list[str]:
    out = [
        f"### DataLoader read throughput ({plan.read_rounds} interleaved rounds after a warm-up round, medians)",
        "",
        "Every mode yields the same samples, and the consumer sums every tensor of each sample (so memory-mapped bytes are "
        "really read, in both cases). 'RAM, list iteration' iterates a list of the same samples already materialised "
        "(cloned tensors); the DataLoader over that list isolates the DataLoader's own cost. The shard modes are what "
        "`quantize()` runs: `calibration_loader(CalibrationDataset(artifact), \"cpu\", num_workers)`, page cache warm; "
        "with num_workers=2 the worker start-up is inside the timing, as in every `quantize()` pass. MB counts the bytes of "
        "every tensor of every sample delivered (shared text embeddings once per sample). "
        f"Last-level cache: {last_level_cache()}; a pass that fits in it is read from cache, not from memory.",
        "",
    ]
    for title, result in reads:
        seconds = result["seconds"]
        ram = seconds["RAM, list iteration"]
        rows = []
        for name, values in seconds.items():
            ratios = [base / value for base, value in zip(ram, values)]
            target = f">= {READ_TARGET}" if name.startswith("shards") else ""
            rows.append([name, fmt(median(values) * 1000, 1), fmt(median(values) / result["samples"] * 1e6, 1), fmt(result["samples"] / median(values), 0),
                         fmt(result["sample_mb"] / median(values), 0), fmt(median(ratios), 3), target])
        out += [
            f"{title}: {result['samples']} samples, {fmt(result['sample_mb'], 1)} MB delivered per pass, "
            f"{fmt(result['stored_mb'], 1)} MB in {result['shards']} shard(s); passes per timing: "
            + ", ".join(f"{passes}" for passes in result["passes"].values()) + " (in the table's order).",
            "",
            markdown_table(["mode", "ms per pass", "µs per sample", "samples/s", "MB/s", "throughput / RAM list (median of rounds)", "target"], rows),
            "",
        ]
    return out


def _render_recipes(recipes: dict[str, Any]) -> list[str]:
    fp16_bytes = 2 * recipes["parameters"]
    rows = []
    for row in recipes["rows"]:
        manifest = row["manifest"]
        sizes = manifest["sizes"]
        quality = manifest["quality"]
        weights_ratio = sizes.get("quantized_weights_ratio_vs_fp16")
        target = INT8_TARGET if row["weights"] in ("int8", "fp8_e4m3") else FOUR_BIT_TARGET if row["weights"] in ("int4", "mxfp4", "nvfp4") else ""
        rows.append([
            row["recipe"], fmt(row["seconds"], 2), fmt(manifest.get("timing", {}).get("quantize_seconds"), 2),
            fmt(quality["output_sqnr_db"], 1), fmt(quality.get("median_layer_output_sqnr_db"), 1),
            fmt(sizes.get("ratio_vs_fp16"), 3), fmt(sizes["checkpoint_bytes"] / fp16_bytes, 3), fmt(weights_ratio, 3), target,
        ])
    return [
        f"### quantize() per recipe ({MODEL}, the 128 px artifact above: {recipes['samples']} samples, statistics cache off)",
        "",
        "Wall time of `quantize()` after one warm-up run (submodule load, statistics pass over the calibration samples, per-layer quantization, "
        "held-out evaluation, checkpoint write); 'manifest s' is the `timing.quantize_seconds` it records. SQNR is on the "
        "held-out samples. Size ratios: the manifest's `ratio_vs_fp16` (checkpoint file / fp16 bytes of the target's "
        f"parameters), the same recomputed here as checkpoint bytes / (2 bytes x {recipes['parameters']:,} parameters of a "
        "freshly loaded target), and the manifest's quantized-weights ratio (codes and scales of the quantized layers only). "
        "The tiny model keeps its unquantized layers in float32 and they are a large share of it, so the whole-checkpoint "
        "ratio sits well above what the real models reach; the quantized-weights ratio is the one the targets speak of.",
        "",
        markdown_table(["recipe", "seconds", "manifest s", "output SQNR dB", "median layer SQNR dB", "checkpoint / fp16 (manifest)",
                        "checkpoint / (2 B x params)", "quantized weights / fp16", "target"], rows),
        "",
    ]


if __name__ == "__main__":
    main()
