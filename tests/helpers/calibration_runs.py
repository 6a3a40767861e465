"""The calibration runs whose files `tests/test_calibration_fixtures.py` compares with stored hashes.

Each run is made the same way by the code that wrote the fixture (commit df4f6e6, before the
calibrate stage was rebuilt on the live-pipe path) and by the code under test, so equal hashes say
the two write the same bytes. Two kinds of run:

- synthetic: a pipeline whose every tensor is a small integer in float32 (randint latents from the
  prompt's generator, text embeddings from the prompt's characters, weights set to k/16), so its
  bytes are the same on every CPU; driven through the command line's stage (with `load_pipeline`
  patched to return it) and through `diffquant.calibrate`;
- tiny: the real tiny twins, whose float arithmetic may round differently on another CPU or
  library build, so their fixture holds for the environment it records.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

SYNTHETIC_PROMPTS = ["a cat", "a dog on a red sofa", "two birds", "a lighthouse at dusk"]


class IntegerDenoiser(ModelMixin, ConfigMixin):
    """A UNet-shaped module (sample, timestep, encoder_hidden_states) with weights k/16."""

    @register_to_config
    def __init__(self, in_channels: int = 4, context_dim: int = 8) -> None:
        super().__init__()
        self.proj_in = torch.nn.Linear(context_dim, in_channels)
        with torch.no_grad():
            self.proj_in.weight.copy_((torch.arange(in_channels * context_dim) % 9 - 4).reshape(in_channels, context_dim) / 16)
            self.proj_in.bias.copy_(torch.arange(in_channels) / 16)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, return_dict: bool = False):
        return (sample,)


class IntegerPipeline(DiffusionPipeline):
    """Calls `unet` once per step with integer-valued inputs; `strength` shifts the latents."""

    def __init__(self, unet: IntegerDenoiser) -> None:
        super().__init__()
        self.register_modules(unet=unet)
        self.fail_at_call: int | None = None  # raise at this call of the pipeline: an interrupted run
        self.calls = 0

    def __call__(self, prompt: str, num_inference_steps: int = 2, generator: torch.Generator | None = None, output_type: str = "pil",
                 return_dict: bool = True, height: int = 64, width: int = 64, guidance_scale: float = 5.0, strength: float = 0.0):
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise KeyboardInterrupt("interrupted on purpose")
        codes = torch.tensor([float(ord(c) % 16) for c in prompt.ljust(8)[:8]])
        text = codes.reshape(1, 1, 8).repeat(2, 3, 1)  # the same tensor at every step: stored once
        latents = torch.randint(0, 16, (2, 4, height // 8, width // 8), generator=generator).float() + float(round(strength * 4))
        for step in range(num_inference_steps):
            self.unet(latents, torch.tensor([1000.0 - 10 * step]), encoder_hidden_states=text, return_dict=False)
            latents = latents + 1.0
        return latents


def integer_pipeline(fail_at_call: int | None = None) -> IntegerPipeline:
    pipe = IntegerPipeline(IntegerDenoiser())
    pipe.set_progress_bar_config(disable=True)
    pipe.fail_at_call = fail_at_call
    return pipe


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (zarr groups are directories), by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def synthetic_cli(out: Path, fail_at_call: int | None = None) -> None:
    """The command line's stage on tiny-sdxl's preset, its pipeline replaced by the integer one
    (which raises KeyboardInterrupt at call `fail_at_call`, when given)."""
    import diffquant.stages.calibrate as stage

    original = stage.load_pipeline
    stage.load_pipeline = lambda preset, device="cpu", **placement: integer_pipeline(fail_at_call)
    try:
        stage.calibrate(stage.CalibrationSettings(model="tiny-sdxl", out=out, num_prompts=3, steps=3, shard_size_mb=1e-6, device="cpu"),
                        show_progress=False)
    finally:
        stage.load_pipeline = original


def synthetic_live(out: Path, fail_at_call: int | None = None) -> None:
    """`diffquant.calibrate` on the integer pipeline with per-prompt arguments."""
    import diffquant

    pipe = integer_pipeline(fail_at_call)
    diffquant.calibrate(pipe, pipe.unet, SYNTHETIC_PROMPTS, out, num_inference_steps=2, seed=3, height=32, width=32,
                        prompt_kwargs=lambda i: {"strength": 0.25 * i}, shard_size_mb=1e-6, show_progress=False)


def tiny_cli_sdxl(out: Path) -> None:
    from diffquant.stages.calibrate import CalibrationSettings, calibrate

    calibrate(CalibrationSettings(model="tiny-sdxl", out=out, num_prompts=3, steps=2, shard_size_mb=0.01, device="cpu"), show_progress=False)


def tiny_cli_flux_zarr(out: Path) -> None:
    from diffquant.stages.calibrate import CalibrationSettings, calibrate

    calibrate(CalibrationSettings(model="tiny-flux", out=out, num_prompts=2, steps=2, device="cpu", shard_format="zarr"), show_progress=False)


def tiny_live_sdxl(out: Path) -> None:
    import diffquant
    from diffusers import EulerAncestralDiscreteScheduler
    from diffquant.models.tiny import tiny_pipeline_dir

    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir("sdxl"))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    diffquant.calibrate(pipe, pipe.unet, ["a cat", "a dog"], out, num_inference_steps=2, height=64, width=64, show_progress=False)


def tiny_sdxl_stats(out: Path) -> None:
    """The stats cache a quantize run writes beside tiny_cli_sdxl's artifact (only `stats/` is compared)."""
    from diffquant.stages.quantize import QuantizeSettings, quantize

    tiny_cli_sdxl(out)
    quantize(QuantizeSettings(calib=out, recipe="int8_w8a8", out=out.parent / f"{out.name}-checkpoint", device="cpu", holdout=2),
             show_progress=False)
    for path in sorted(out.iterdir()):
        if path.name != "stats":
            shutil.rmtree(path) if path.is_dir() else path.unlink()


SYNTHETIC_RUNS: dict[str, Callable[[Path], None]] = {"synthetic_cli": synthetic_cli, "synthetic_live": synthetic_live}
TINY_RUNS: dict[str, Callable[[Path], None]] = {
    "tiny_cli_sdxl": tiny_cli_sdxl, "tiny_cli_flux_zarr": tiny_cli_flux_zarr, "tiny_live_sdxl": tiny_live_sdxl, "tiny_sdxl_stats": tiny_sdxl_stats,
}


def environment() -> dict[str, Any]:
    """What the tiny runs' bytes may depend on besides the code: the CPU kernels and library builds."""
    manifest_versions = {}
    import diffusers
    import safetensors
    import transformers

    manifest_versions = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                         "safetensors": safetensors.__version__, "python": sys.version.split()[0]}
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), **manifest_versions}


def make_interrupted(name: str, out: Path, fail_at_call: int = 3) -> None:
    """A synthetic run killed in its third prompt: two prompts committed (one shard each), status in_progress."""
    try:
        SYNTHETIC_RUNS[name](out, fail_at_call)
    except KeyboardInterrupt:
        return
    raise AssertionError(f"{name} was not interrupted")


def make_fixture(work: Path) -> dict[str, Any]:
    torch.set_num_threads(1)
    runs = {**SYNTHETIC_RUNS, **TINY_RUNS}
    hashes = {}
    for name, run in runs.items():
        run(work / name)
        hashes[name] = file_hashes(work / name)
    return {"environment": environment(), "runs": hashes}


if __name__ == "__main__":
    if sys.argv[1] == "interrupted":  # python -m tests.helpers.calibration_runs interrupted DIR
        for run in SYNTHETIC_RUNS:
            make_interrupted(run, Path(sys.argv[2]) / run)
    else:
        print(json.dumps(make_fixture(Path(sys.argv[1])), indent=2, sort_keys=True))
