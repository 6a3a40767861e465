"""`diffquant calibrate`: stage one from the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

from diffquant.cli.params import ARTIFACT_PATH, parse_set_options
from diffquant.errors import ConfigError
from diffquant.stages.calibrate import DEFAULT_NUM_PROMPTS, DEFAULT_SHARD_SIZE_MB, CalibrationSettings, calibrate


@click.command("calibrate")
@click.option("--model", required=True, help="Preset name (see configs/models), local pipeline directory, or hub id.")
@click.option("--out", type=ARTIFACT_PATH, default=None, help="Output directory or fsspec URL (s3://bucket/calib/run) [default: artifacts/calib/<model>-<short hash of the settings>].")
@click.option("--prompts", default=None, help="'builtin' (default), a text file (one prompt per line), or a COCO2014 captions .tsv.")
@click.option("--num-prompts", type=int, default=DEFAULT_NUM_PROMPTS, help="How many prompts to run.")
@click.option("--shuffle/--no-shuffle", default=False, help="Shuffle the prompts with --seed before taking --num-prompts.")
@click.option("--steps", type=int, default=None, help="Denoising steps per prompt [default: the preset's].")
@click.option("--seed", type=int, default=0, help="Seed; each prompt's generator is seeded from it and the prompt index.")
@click.option("--shard-size-mb", type=float, default=DEFAULT_SHARD_SIZE_MB, help="Close a shard at the first prompt boundary past this size.")
@click.option("--device", default="auto", help="Device to run the pipeline on: auto (cuda if available), cpu, cuda, cuda:1, ...")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None, help="Override the preset's torch dtype.")
@click.option("--target", default=None, help="Submodule attribute to capture [default: the preset's, unet or transformer].")
@click.option("--set", "set_options", multiple=True, metavar="KEY=VALUE", help="Any keyword of pipe(...), e.g. --set height=256.")
@click.option("--format", "shard_format", type=click.Choice(["safetensors", "zarr"]), default="safetensors", help="Shard format.")
@click.option("--compression", type=click.Choice(["none", "zstd", "blosc"]), default="none", help="zarr shard compression.")
@click.option("--device-map", default=None, help="Spread the pipeline over devices with from_pretrained's device_map, e.g. balanced.")
@click.option("--offload", type=click.Choice(["model", "sequential"]), default=None, help="Keep weights in CPU memory, moved to --device as they run.")
@click.option("--num-processes", type=int, default=1, help="Data-parallel ranks: relaunches itself with `accelerate launch` (gloo on CPUs).")
@click.option("--overwrite", is_flag=True, help="Replace an artifact of other settings in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON.")
def calibrate_command(model: str, out: Path | str | None, prompts: str | None, num_prompts: int, shuffle: bool, steps: int | None, seed: int,
                      shard_size_mb: float, device: str, dtype: str | None, target: str | None, set_options: tuple[str, ...],
                      shard_format: str, compression: str, device_map: str | None, offload: str | None, num_processes: int,
                      overwrite: bool, as_json: bool) -> None:
    """Capture the inputs of a pipeline's heavy submodule to a resumable on-disk artifact.

    \b
    Example:
      diffquant calibrate --model tiny-sdxl --num-prompts 4 --steps 3 --out artifacts/calib/check
      diffquant calibrate --model sdxl --prompts captions.tsv --num-prompts 64 --device cuda \\
          --set guidance_scale=8.0 --out artifacts/calib/sdxl-coco64

    Re-running the same command after a crash resumes it; re-running a finished one changes nothing.
    """
    if num_processes < 1:
        raise ConfigError(f"--num-processes {num_processes} is not allowed", "pass 1 or more")
    if num_processes > 1 and os.environ.get("WORLD_SIZE") is None:
        raise SystemExit(launch_data_parallel(num_processes))
    settings = CalibrationSettings(
        model=model, out=out, prompts=prompts, num_prompts=num_prompts, shuffle=shuffle, steps=steps, seed=seed,
        shard_size_mb=shard_size_mb, device=device, dtype=dtype, target=target,
        pipeline_kwargs=parse_set_options(set_options), overwrite=overwrite, shard_format=shard_format,
        compression=compression, device_map=device_map, offload=offload,
    )
    result = calibrate(settings, show_progress=not as_json)
    out = result.out
    if not result.is_main_rank:
        return  # rank 0 reports for the whole data-parallel run
    if result.already_complete:
        click.echo(f"{out} already holds this complete calibration run; nothing to do.", err=True)
    elif result.resumed_from_prompt:
        click.echo(f"resumed: {result.resumed_from_prompt} prompts were already done.", err=True)
    from diffquant.cli.inspect import artifact_summary, echo_summary

    echo_summary(artifact_summary(out), as_json)
    if not as_json:
        click.echo(f"calibration artifact: {out}  (quantize it: diffquant quantize --calib {out} --recipe NAME, or make quantize CALIB={out})")


def launch_data_parallel(num_processes: int) -> int:
    """Run this same command under `accelerate launch` with `num_processes` ranks; its exit code.

    accelerate's `--multi_gpu` launcher also serves CPU-only machines, where the ranks form a gloo
    process group. The command line is passed on unchanged but for `--num-processes`.
    """
    args = sys.argv[sys.argv.index("calibrate") + 1 :] if "calibrate" in sys.argv else sys.argv[1:]
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--num-processes":
            skip = True
        elif not arg.startswith("--num-processes="):
            kept.append(arg)
    command = [
        sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
        "--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "-m", "diffquant", "calibrate", *kept,
    ]
    click.echo(f"launching {num_processes} ranks: {' '.join(command[2:])}", err=True)
    return subprocess.call(command)
