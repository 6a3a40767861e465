"""Stage one: capture overhead, peak memory against prompt count, writer throughput, storage ratio.

1. Capture overhead: `calibrate()` against the plain pipeline on tiny-sdxl at 128 px, same
   prompts, seeds, steps and `output_type="latent"`, one pipeline loaded once for both (load time
   is outside every timing), interleaved rounds, median ratio. A third mode runs the capture hook
   with a sink that drops the samples, to split the overhead into copying and writing.
2. Peak RSS of `calibrate()` at a small and a large prompt count, each in a fresh process, with
   1 MB shards, and of the writer alone on synthetic samples of the real SDXL shapes with 32 MB
   shards: the growth between the two counts against 1.5 x the shard size.
3. Writer throughput on synthetic samples of the real SDXL and Flux shapes at 1024 px, through
   the real CalibrationWriter, with the time of each writer phase.
4. Stored bytes / raw captured bytes at 20 steps: tiny-sdxl and tiny-flux (real pipelines, tiny
   shapes) and the synthetic real-shape samples of 3.

Run: `python benchmarks/bench_calibrate.py [--quick]`; prints one markdown section.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from harness import (
    FLUX_1024,
    SDXL_1024,
    WRITER_PHASES,
    RssPoller,
    command_line,
    filesystem_of,
    feed_writer,
    fmt,
    instrument_writer,
    iter_synthetic_samples,
    markdown_table,
    median,
    parse_args,
    preloaded_pipeline,
    progress,
    reset_rss_peak,
    rss_now_mb,
    rss_peak_mb,
    synthetic_manifest,
    synthetic_samples,
    threads_note,
    write_synthetic_artifact,
)

from diffquant.artifacts.calibration_writer import CalibrationWriter
from diffquant.models.loading import get_target, load_pipeline, seeded_generator
from diffquant.models.presets import resolve_model
from diffquant.prompts import load_prompts
from diffquant.stages.calibrate import CalibrationSettings, calibrate
from diffquant.stages.capture import SubmoduleInputCapture

SCRIPT = "bench_calibrate.py"
MODEL = "tiny-sdxl"
OVERHEAD_SIZE = {"height": 128, "width": 128}
RSS_SHARD_MB = 1.0
RSS_STEPS = 4
RATIO_STEPS = 20


@dataclass(frozen=True)
class Plan:
    overhead_prompts: int
    overhead_steps: int
    overhead_rounds: int
    rss_prompts: tuple[int, int]
    rss_writer_prompts: tuple[int, int]
    rss_writer_shard_mb: float
    rss_repeats: int
    writer_prompts: dict[str, int]
    writer_shard_mb: float
    ratio_prompts: int


FULL = Plan(8, 10, 7, (4, 64), (4, 24), 32.0, 3, {SDXL_1024.name: 6, FLUX_1024.name: 3}, 16.0, 2)
QUICK = Plan(3, 4, 2, (4, 16), (2, 6), 8.0, 1, {SDXL_1024.name: 2, FLUX_1024.name: 1}, 4.0, 1)


def main() -> None:
    args = parse_args(__doc__, extra=_child_arguments)
    if args.rss_child is not None:
        _rss_child(args)
        return
    plan = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="diffquant-bench-") as tmp:
        work = Path(tmp)
        overhead = capture_overhead(plan, work / "overhead")
        rss = peak_rss(plan, work / "rss")
        writer = write_throughput(plan, work / "writer")
        ratios = storage_ratios(plan, work / "ratio")
        print(render(plan, args.quick, overhead, rss, writer, ratios, filesystem_of(work)))


# 1. Capture overhead ---------------------------------------------------------------------------


def capture_overhead(plan: Plan, work: Path) -> dict[str, Any]:
    """Seconds per mode per round, the per-round ratios, and one instrumented run's writer times."""
    preset = resolve_model(MODEL).with_overrides(steps=plan.overhead_steps)
    pipe = load_pipeline(preset, device="cpu")
    target = get_target(pipe, preset)
    kwargs = {**preset.pipeline_kwargs, **OVERHEAD_SIZE}
    prompts = load_prompts(None, plan.overhead_prompts, seed=0).prompts
    seed = 0

    def generate(capture: SubmoduleInputCapture | None) -> None:
        for index, prompt in enumerate(prompts):
            if capture is not None:
                capture.start_prompt(index)
            with torch.no_grad():
                pipe(prompt, num_inference_steps=preset.steps, generator=seeded_generator(seed, index, "cpu"), output_type="latent", **kwargs)

    def plain() -> None:
        generate(None)

    def hook_only() -> None:
        with SubmoduleInputCapture(target, lambda sample: None) as capture:
            generate(capture)

    runs = iter(range(1_000_000))

    def calibrate_run(num_prompts: int = plan.overhead_prompts) -> dict[str, Any]:
        settings = CalibrationSettings(
            model=MODEL, out=work / f"run-{next(runs)}", num_prompts=num_prompts, steps=plan.overhead_steps,
            seed=seed, device="cpu", pipeline_kwargs=OVERHEAD_SIZE,
        )
        with preloaded_pipeline(pipe):
            return calibrate(settings, show_progress=False).manifest

    modes = {"plain pipeline": plain, "capture hook, samples dropped": hook_only, "calibrate()": calibrate_run}
    progress(f"{SCRIPT}: capture overhead, warm-up")
    calibrate_run(1)
    plain()
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    names = list(modes)
    for round_index in range(plan.overhead_rounds):
        progress(f"{SCRIPT}: capture overhead, round {round_index + 1}/{plan.overhead_rounds}")
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        for name in order:
            start = time.perf_counter()
            modes[name]()
            seconds[name].append(time.perf_counter() - start)
    with instrument_writer() as writer_times:
        start = time.perf_counter()
        manifest = calibrate_run()
        instrumented_seconds = time.perf_counter() - start
    return {"seconds": seconds, "writer": writer_times, "manifest": manifest, "instrumented_seconds": instrumented_seconds}


# 2. Peak RSS -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RssSeries:
    label: str
    kind: str  # "pipeline" (calibrate() on MODEL) or "writer" (synthetic SDXL 1024 px samples)
    prompts: tuple[int, int]
    shard_mb: float


def rss_series(plan: Plan) -> list[RssSeries]:
    writer_shard = plan.rss_writer_shard_mb
    return [
        RssSeries(f"{MODEL} `calibrate()`, 64 px, {RSS_STEPS} steps", "pipeline", plan.rss_prompts, RSS_SHARD_MB),
        RssSeries("writer alone, SDXL 1024 px shapes", "writer", plan.rss_writer_prompts, writer_shard),
    ]


def peak_rss(plan: Plan, work: Path) -> list[tuple[RssSeries, list[list[dict[str, Any]]]]]:
    """For each series and prompt count, `plan.rss_repeats` runs, each in a fresh process."""
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for series in rss_series(plan):
        runs = []
        for count in series.prompts:
            repeats = []
            for repeat in range(plan.rss_repeats):
                progress(f"{SCRIPT}: peak RSS, {series.label}, {count} prompts, run {repeat + 1}/{plan.rss_repeats} (fresh process)")
                out = work / f"rss-{len(results)}-{count}-{repeat}.json"
                command = [sys.executable, __file__, "--rss-child", series.kind, "--rss-prompts", str(count),
                           "--rss-shard-mb", str(series.shard_mb), "--rss-out", str(out)]
                subprocess.run(command, check=True)
                repeats.append(json.loads(out.read_text()))
            runs.append(repeats)
        results.append((series, runs))
    return results


def _child_arguments(parser: argparse.ArgumentParser) -> None:
    # Internal: the script runs itself in a fresh process for each peak-RSS figure.
    parser.add_argument("--rss-child", choices=("pipeline", "writer"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rss-prompts", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rss-shard-mb", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rss-out", type=Path, default=None, help=argparse.SUPPRESS)


def _rss_child(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="diffquant-bench-rss-") as tmp:
        if args.rss_child == "pipeline":
            result = _rss_of_calibrate(args.rss_prompts, args.rss_shard_mb, Path(tmp))
        else:
            result = _rss_of_writer(args.rss_prompts, args.rss_shard_mb, Path(tmp))
    args.rss_out.write_text(json.dumps(result))


def _rss_of_calibrate(num_prompts: int, shard_size_mb: float, tmp: Path) -> dict[str, Any]:
    """Calibrate `num_prompts` prompts with a preloaded, warmed-up pipeline."""
    preset = resolve_model(MODEL).with_overrides(steps=RSS_STEPS)
    pipe = load_pipeline(preset, device="cpu")
    builtin = load_prompts(None).prompts
    prompts_file = tmp / "prompts.txt"
    lines = [builtin[i % len(builtin)] + ("" if i < len(builtin) else f", take {i // len(builtin) + 1}") for i in range(num_prompts)]
    prompts_file.write_text("\n".join(lines) + "\n")
    with torch.no_grad():
        pipe(lines[0], num_inference_steps=RSS_STEPS, generator=seeded_generator(0, 0, "cpu"), output_type="latent", **preset.pipeline_kwargs)
    settings = CalibrationSettings(
        model=MODEL, out=tmp / "calib", prompts=str(prompts_file), num_prompts=num_prompts,
        steps=RSS_STEPS, shard_size_mb=shard_size_mb, device="cpu",
    )
    with _peak_meter() as meter, preloaded_pipeline(pipe):
        manifest = calibrate(settings, show_progress=False).manifest
    return {**meter, **_artifact_figures(num_prompts, manifest)}


def _rss_of_writer(num_prompts: int, shard_size_mb: float, tmp: Path) -> dict[str, Any]:
    """Write `num_prompts` prompts of synthetic SDXL 1024 px samples, made one at a time."""
    manifest = synthetic_manifest(SDXL_1024.name, num_prompts)
    with _peak_meter() as meter:
        with CalibrationWriter(tmp, manifest, int(shard_size_mb * (1 << 20))) as writer:
            feed_writer(writer, iter_synthetic_samples(SDXL_1024, num_prompts, RATIO_STEPS))
    return {**meter, **_artifact_figures(num_prompts, writer.manifest.to_json())}


@contextlib.contextmanager
def _peak_meter() -> Iterator[dict[str, Any]]:
    """RSS before, and peak RSS during, the body: the kernel's VmHWM reset at the start (or polling)."""
    gc.collect()
    # ru_maxrss would carry the parent's peak over the exec (getrusage(2)); VmHWM is this process's.
    figures: dict[str, Any] = {"rss_before_mb": rss_now_mb(), "preparation_peak_mb": rss_peak_mb()}
    exact = reset_rss_peak()
    with RssPoller() as poller:
        yield figures
    figures["peak_mb"] = rss_peak_mb() if exact else poller.peak_mb
    figures["process_peak_mb"] = max(figures["preparation_peak_mb"], figures["peak_mb"])
    figures["peak_method"] = "VmHWM reset before the run" if exact else "RSS polled every 5 ms"


def _artifact_figures(num_prompts: int, manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompts": num_prompts,
        "shards": len(manifest["shards"]),
        "largest_shard_mb": max(shard["bytes"] for shard in manifest["shards"]) / 2**20,
        "samples": manifest["num_samples"],
        "raw_mb": manifest["raw_bytes"] / 2**20,
        "stored_mb": manifest["stored_bytes"] / 2**20,
    }


# 3. Writer throughput --------------------------------------------------------------------------


def write_throughput(plan: Plan, work: Path) -> list[dict[str, Any]]:
    results = []
    for layout in (SDXL_1024, FLUX_1024):
        prompts = plan.writer_prompts[layout.name]
        progress(f"{SCRIPT}: writer throughput, {layout.name}, {prompts} prompts x {RATIO_STEPS} steps")
        samples = synthetic_samples(layout, prompts, RATIO_STEPS)
        manifest, times, seconds = write_synthetic_artifact(work / layout.name.split()[0].lower(), layout, samples, plan.writer_shard_mb)
        results.append({"layout": layout, "prompts": prompts, "manifest": manifest, "times": times, "seconds": seconds})
        del samples
        gc.collect()
    return results


# 4. Stored / raw -------------------------------------------------------------------------------


def storage_ratios(plan: Plan, work: Path) -> list[dict[str, Any]]:
    results = []
    for model in ("tiny-sdxl", "tiny-flux"):
        progress(f"{SCRIPT}: stored/raw, {model}, {plan.ratio_prompts} prompts x {RATIO_STEPS} steps")
        settings = CalibrationSettings(model=model, out=work / model, num_prompts=plan.ratio_prompts, steps=RATIO_STEPS, device="cpu")
        manifest = calibrate(settings, show_progress=False).manifest
        results.append({"model": model, "manifest": manifest})
    return results


# Output ----------------------------------------------------------------------------------------


def render(plan: Plan, quick: bool, overhead: dict[str, Any], rss: list[dict[str, Any]], writer: list[dict[str, Any]], ratios: list[dict[str, Any]], filesystem: str) -> str:
    out = ["## Stage one: calibration", ""]
    out += [command_line(SCRIPT, quick), "", threads_note() + f"; artifacts written to a temporary directory on {filesystem}.", ""]
    out += _render_overhead(plan, overhead)
    out += _render_rss(rss)
    out += _render_writer(plan, writer)
    out += _render_ratios(writer, ratios)
    return "\n".join(out).rstrip() + "\n"


def _render_overhead(plan: Plan, overhead: dict[str, Any]) -> list[str]:
    seconds = overhead["seconds"]
    plain = seconds["plain pipeline"]
    rows = []
    for name, values in seconds.items():
        ratios = [value / base for value, base in zip(values, plain)]
        target = "<= 1.10" if name == "calibrate()" else ""
        rows.append([name, fmt(median(values), 3), fmt(min(values), 3), fmt(median(ratios), 3), fmt(min(values) / min(plain), 3), target])
    writer = overhead["writer"]
    manifest = overhead["manifest"]
    stored_mb = manifest["stored_bytes"] / 2**20
    lines = [
        f"### Capture overhead ({MODEL}, 128 px, {plan.overhead_prompts} prompts x {plan.overhead_steps} steps, {plan.overhead_rounds} interleaved rounds)",
        "",
        "One pipeline, loaded once, serves all three modes, so model load time is in none of them. Every mode runs the same "
        "prompts (the built-in list), seeds (`seeded_generator(0, prompt)`), steps and pipeline kwargs, with "
        "`output_type=\"latent\"`: calibration skips the VAE decode, so the plain run skips it too. `calibrate()` is the "
        "library function itself (pipeline handed in instead of loaded): capture hook, writer thread, shards, manifest, "
        "fingerprint. The ratio column is the median of per-round ratios to the plain run of the same round.",
        "",
        markdown_table(["mode", "median s", "min s", "median ratio to plain", "min / min plain", "target"], rows),
        "",
        f"Writer thread during one more (instrumented) `calibrate()` run of {fmt(overhead['instrumented_seconds'], 2)} s: "
        f"busy {fmt(writer.busy, 3)} s ({fmt(100 * writer.busy / overhead['instrumented_seconds'], 1)} % of the run, on its own "
        f"thread), {fmt(stored_mb, 2)} MB stored in {len(manifest['shards'])} shard(s) "
        f"({fmt(stored_mb / writer.busy if writer.busy > 0 else None, 1)} MB/s of writer busy time).",
        "",
    ]
    return lines


def _render_rss(rss: list[tuple[RssSeries, list[list[dict[str, Any]]]]]) -> list[str]:
    rows, figures = [], []
    for series, runs in rss:
        added = []
        for repeats in runs:
            first = repeats[0]
            values = [r["peak_mb"] - r["rss_before_mb"] for r in repeats]
            added.append(median(values))
            rows.append([
                series.label, first["prompts"], first["samples"], series.shard_mb, f"{first['shards']} ({fmt(first['largest_shard_mb'], 2)})", fmt(first["raw_mb"], 1),
                fmt(first["stored_mb"], 1), fmt(first["rss_before_mb"], 0), " / ".join(fmt(v, 1) for v in values), fmt(median(values), 1),
                fmt(max(r["process_peak_mb"] for r in repeats), 0),
            ])
        growth = added[-1] - added[0]
        figures.append([f"{series.label}: growth {series.prompts[0]} -> {series.prompts[1]} prompts",
                        f"{fmt(growth, 2)} MB = {fmt(growth / series.shard_mb, 2)} x shard size", f"< 1.5 x shard size ({1.5 * series.shard_mb:g} MB)"])
    method = rss[0][1][0][0]["peak_method"]
    return [
        "### Peak RSS against prompt count",
        "",
        "Each run is a fresh process that prepares its inputs (loads the pipeline and generates once; or nothing for the writer "
        f"alone), then resets the peak-RSS counter ({method}) and runs: `calibrate()` with the loaded pipeline, or "
        f"`CalibrationWriter` fed with synthetic SDXL 1024 px samples ({RATIO_STEPS} steps a prompt) made one at a time. "
        "'added' is peak minus the RSS before the run, per repeat and the median; 'process peak' is the whole process's "
        "peak (VmHWM), model loading included.",
        "",
        markdown_table(["run", "prompts", "samples", "--shard-size-mb", "shards (largest MB)", "raw MB", "stored MB", "RSS before MB", "added MB (each run)", "added MB (median)", "process peak MB"], rows),
        "",
        markdown_table(["figure (median added, large - small count)", "value", "target"], figures),
        "",
        "The writer holds at most one shard of distinct tensors plus one prompt (the largest shard's size). With 1 MB "
        "shards the tiny pipeline's own heap churn is of the same size: the kept copies sit between the pipeline's "
        "freed temporaries, and the writer's `malloc_trim` after each shard returns most but not all of it (a census "
        "of live tensors at each shard flush found none beyond the model and the open shard). At real shapes the "
        "writer adds well under one shard.",
        "",
    ]


def _render_writer(plan: Plan, writer: list[dict[str, Any]]) -> list[str]:
    rows = []
    phase_rows = []
    for result in writer:
        manifest, times, seconds = result["manifest"], result["times"], result["seconds"]
        stored, raw = manifest["stored_bytes"] / 2**20, manifest["raw_bytes"] / 2**20
        rows.append([
            result["layout"].name, f"{result['prompts']} x {RATIO_STEPS}", len(manifest["shards"]), fmt(raw, 1), fmt(stored, 1),
            fmt(seconds, 3), fmt(stored / seconds, 1), fmt(raw / seconds, 1), fmt(times.busy, 3),
        ])
        accounted = sum(times.phases.values())
        phase_rows.append([result["layout"].name] + [fmt(100 * times.phases[name] / times.busy, 1) for name in WRITER_PHASES]
                          + [fmt(100 * (times.busy - accounted) / times.busy, 1)])
    return [
        f"### Writer throughput (synthetic samples at real shapes, {plan.writer_shard_mb:g} MB shards)",
        "",
        "Samples of the real submodule inputs at 1024 px (SDXL UNet: 2x4x128x128 latents, 2x77x2048 text embeddings, ...; "
        "Flux transformer: 1x4096x64 latents, 1x512x4096 T5 embeddings, ...), made before the clock starts, go through the "
        "real `CalibrationWriter` as `calibrate()` drives it: per-step tensors new at every step, per-prompt tensors handed "
        "on as the same object. Time runs from the first `add` to `finish()` returning; the writer is the only work, so "
        "this is its throughput. 'stored MB/s' counts shard bytes written; 'raw MB/s' counts captured bytes consumed.",
        "",
        markdown_table(["shapes", "prompts x steps", "shards", "raw MB", "stored MB", "seconds", "stored MB/s", "raw MB/s", "writer busy s"], rows),
        "",
        "Share of writer busy time per phase (%):",
        "",
        markdown_table(["shapes"] + list(WRITER_PHASES) + ["rest (flatten, dedup, queue)"], phase_rows),
        "",
    ]


def _render_ratios(writer: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> list[str]:
    expected = {"tiny-sdxl": "(real SDXL: ~1/3)", "tiny-flux": "(real Flux: ~1/7)", SDXL_1024.name: "~1/3 = 0.33", FLUX_1024.name: "~1/7 = 0.14"}
    rows = []
    for result in ratios:
        manifest = result["manifest"]
        rows.append(_ratio_row(result["model"] + " (real pipeline, tiny shapes)", manifest, expected[result["model"]]))
    for result in writer:
        rows.append(_ratio_row(result["layout"].name + " (synthetic, real shapes)", result["manifest"], expected[result["layout"].name]))
    return [
        f"### Stored bytes / raw captured bytes ({RATIO_STEPS} steps)",
        "",
        "From the manifest: raw = bytes of every captured tensor of every sample; tensor = bytes of the unique tensors kept "
        "(content dedup within a shard); stored = shard file bytes (tensors + safetensors header with the sample records). "
        "The tiny models' text embeddings are small next to their latents, so their ratios say little about the real models; "
        "the synthetic rows use the real shapes.",
        "",
        markdown_table(["artifact", "samples", "raw MB", "tensor MB", "stored MB", "tensor / raw", "stored / raw", "expected"], rows),
        "",
    ]


def _ratio_row(name: str, manifest: dict[str, Any], expected: str) -> list[Any]:
    raw = manifest["raw_bytes"]
    tensor = sum(shard["tensor_bytes"] for shard in manifest["shards"])
    stored = manifest["stored_bytes"]
    return [name, manifest["num_samples"], fmt(raw / 2**20, 2), fmt(tensor / 2**20, 2), fmt(stored / 2**20, 2),
            fmt(tensor / raw, 3), fmt(stored / raw, 3), expected]


if __name__ == "__main__":
    main()
