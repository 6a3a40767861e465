"""Stage two at real model size: peak memory / model bytes and the time of each phase, per recipe.

A UNet with the real Stable Diffusion 1.5 configuration (stable-diffusion-v1-5/stable-diffusion-v1-5,
unet/config.json: the UNet2DConditionModel defaults with cross_attention_dim 768; 860 M
parameters, 3.4 GB in float32) gets random weights and is saved into a copy of the tiny SD 1.5
pipeline directory, so stage two loads it through `from_pretrained` as it would a hub model. Stage
one runs through a stand-in pipeline that calls that UNet with random latents of a 256 px image
and 77 text tokens (classifier-free guidance batch of 2), `--prompts` x `--steps` times.

Each recipe is then quantized in a fresh process (`python -m diffquant quantize`), whose peak RSS
(VmHWM) is read at exit: "peak / model" is that peak over the UNet's bytes, and "peak - base /
model" subtracts the RSS of a process that imported the same libraries and did nothing (the
interpreter, torch, diffusers: about 0.5 GB that no model size changes). Phase times come from
the checkpoint manifest (`timing.phases_seconds`).

Not part of `make bench` (about 15 minutes on 2 cores): `make bench-scale`, or
`python benchmarks/bench_scale.py [--quick] [--recipes a,b] [--workdir DIR]`. `--quick` uses a
UNet 1/10 the width for a smoke run; `--workdir` keeps the built UNet and its calibration in DIR
and reuses them on the next run (otherwise a temporary directory is removed at the end).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import command_line, markdown_table, parse_args, preloaded_pipeline, progress  # noqa: E402

from diffquant.models.tiny import tiny_pipeline_dir  # noqa: E402
from diffquant.stages.calibrate import CalibrationSettings, calibrate  # noqa: E402

RECIPES = ("int8_weight_only", "int8_w8a8", "int8_w8a8_mse", "svdquant_w4a4", "nvfp4")
LATENT = (4, 32, 32)  # 256 px
TEXT = (77, 768)


class StandInPipeline:
    """Calls its UNet as StableDiffusionPipeline's denoising loop does, with random inputs."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet

    def __call__(self, prompt: str, num_inference_steps: int = 4, generator: torch.Generator | None = None,
                 output_type: str = "latent", **kwargs: object) -> object:
        text = torch.randn(2, *TEXT, generator=generator)
        latents = torch.randn(2, *LATENT, generator=generator)
        for step in range(num_inference_steps):
            timestep = torch.tensor(999 - step * (1000 // num_inference_steps))
            latents = latents - 0.1 * self.unet(latents, timestep, encoder_hidden_states=text, return_dict=False)[0]
        return latents


def build_model_dir(root: Path, quick: bool) -> tuple[Path, int]:
    """A copy of the tiny SD 1.5 pipeline whose unet/ is the SD 1.5-size UNet; (dir, UNet bytes)."""
    import diffusers

    model_dir = root / "sd15-size"
    shutil.copytree(tiny_pipeline_dir("sd15"), model_dir)
    shutil.rmtree(model_dir / "unet")
    torch.manual_seed(0)
    config = {"cross_attention_dim": 768, "sample_size": 64}
    if quick:
        config.update(block_out_channels=(32, 64, 128, 128), attention_head_dim=4)
    unet = diffusers.UNet2DConditionModel(**config)
    unet.save_pretrained(model_dir / "unet")
    return model_dir, sum(p.numel() * p.element_size() for p in unet.parameters())


def quantize_peak(calib: Path, recipe: str, out: Path) -> tuple[float, dict]:
    """(peak RSS in bytes of a `diffquant quantize` process, its checkpoint manifest)."""
    script = (
        "import sys, runpy\n"
        "sys.argv = ['diffquant', 'quantize', '--calib', sys.argv[1], '--recipe', sys.argv[2], '--out', sys.argv[3], '--device', 'cpu',"
        " '--holdout', '2', '--json']\n"
        "try:\n    runpy.run_module('diffquant', run_name='__main__')\nexcept SystemExit as exit:\n    code = exit.code\nelse:\n    code = 0\n"
        "print('VmHWM', [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1], file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(calib), recipe, str(out)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"quantize {recipe} failed: {done.stderr[-2000:]}")
    peak_kb = float(next(line for line in done.stderr.splitlines() if line.startswith("VmHWM")).split()[1])
    return peak_kb * 1024, json.loads((out / "quant_manifest.json").read_text())


def baseline_rss() -> float:
    """Peak RSS of a process that imports what `diffquant quantize` imports and quantizes nothing."""
    script = ("import diffquant.cli, diffquant.stages.quantize, diffusers\n"
              "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    return float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()[-1]) * 1024


def main() -> None:
    args = parse_args(__doc__, lambda p: (p.add_argument("--recipes", default=",".join(RECIPES)),
                                          p.add_argument("--prompts", type=int, default=3), p.add_argument("--steps", type=int, default=4),
                                          p.add_argument("--workdir", type=Path, default=None)))
    recipes = [r for r in args.recipes.split(",") if r]
    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        model_dir, model_bytes, calib_seconds = prepare(root, args.quick, args.prompts, args.steps)
        base = baseline_rss()
        rows = []
        for recipe in recipes:
            progress(f"quantize {recipe}")
            shutil.rmtree(root / f"q-{recipe}", ignore_errors=True)
            peak, manifest = quantize_peak(root / "calib", recipe, root / f"q-{recipe}")
            phases = manifest["timing"]["phases_seconds"]
            work = manifest["timing"]["quantize_seconds"] - phases.get("quality_report", 0.0)
            rows.append([recipe, f"{peak / model_bytes:.2f}", f"{(peak - base) / model_bytes:.2f}",
                         *(f"{phases.get(name, 0.0):.1f}" for name in ("load", "statistics", "weights", "quality_report", "write")),
                         f"{work / (phases.get('load', 0.0) + phases.get('write', 0.0)):.2f}",
                         f"{manifest['quality']['output_sqnr_db']:.2f}"])
            progress(" | ".join(str(cell) for cell in rows[-1]))
        print(f"## Stage two at real size ({'quick: a 1/10-width UNet' if args.quick else 'SD 1.5-size UNet, float32'})\n")
        print(command_line("bench_scale.py", args.quick))
        print(f"\nUNet: {model_bytes / 2**30:.2f} GiB of float32 weights; calibration: {args.prompts} prompts x {args.steps} steps at 256 px "
              f"({calib_seconds:.0f} s); 2 held-out samples; base RSS of the libraries alone {base / 2**30:.2f} GiB.\n")
        print(markdown_table(["recipe", "peak / model", "peak - base / model", "load s", "statistics s", "weights s", "quality report s",
                              "write s", "wall without quality report / (load + write)", "output SQNR dB"], rows))
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def prepare(root: Path, quick: bool, prompts: int, steps: int) -> tuple[Path, int, float]:
    """The SD 1.5-size pipeline and its calibration under `root`, built unless already there
    (a finished calibration has its manifest); (model dir, UNet bytes, calibration seconds)."""
    import diffusers

    model_dir = root / "sd15-size"
    if not (model_dir / "unet" / "config.json").is_file():
        progress("building the SD 1.5-size UNet")
        shutil.rmtree(model_dir, ignore_errors=True)
        build_model_dir(root, quick)
    unet = diffusers.UNet2DConditionModel.from_pretrained(model_dir / "unet")
    model_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    seconds_file = root / "calibration_seconds.txt"
    if not (root / "calib" / "manifest.json").is_file() or not seconds_file.is_file():
        progress("calibrating")
        start = time.perf_counter()
        with preloaded_pipeline(StandInPipeline(unet)):
            calibrate(CalibrationSettings(model=str(model_dir), out=root / "calib", num_prompts=prompts, steps=steps, dtype="float32",
                                          overwrite=True), show_progress=False)
        seconds_file.write_text(f"{time.perf_counter() - start:.1f}")
    return model_dir, model_bytes, float(seconds_file.read_text())


if __name__ == "__main__":
    main()
