"""What makes a better calibration set (issue 17): seeds per prompt, several seeds per prompt,
steps per prompt, and sample selection by timestep, by output SQNR on one fixed held-out set.

Tiny twin (default tiny-sdxl, float32, 64 px). Held out: 4 prompts that no calibration set uses,
4 steps, seed 1234, every sample; each calibration set quantizes the model (statistics cache off,
one sample held out by quantize itself, `calibration: {holdout: 1}`) and the quantized target's
output over every held-out sample is compared with the float target's (SQNR, dB). The sets hold
about the same number of samples, so the comparison is of what they hold, not how much:

- `seed per prompt`: diffquant's rule, prompt i runs with a generator seeded from (seed, i);
- `one seed for all`: Quark's rule (every prompt's generator seeded with `seed`), emulated here by
  patching the calibrate stage's `seeded_generator` for that run only (not a diffquant option);
- `2 seeds per prompt`: each prompt listed twice (so two prompt indices, two seeds);
- more steps per prompt and fewer prompts; a longer capture thinned by `uniform_steps` or
  `timestep_min`/`timestep_max` (recipe `calibration:` selection).

    PYTHONPATH=. python benchmarks/bench_calib_set.py [--family sdxl] [--recipes int8_w8a8,fp8] [--repeats 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from diffusers import DiffusionPipeline

import diffquant.stages.calibrate as calibrate_stage
from diffquant.api import calibrate, quantize
from diffquant.artifacts.calibration_reader import CalibrationArtifact
from diffquant.models.tiny import tiny_pipeline_dir

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "quant"
POOL = ["a cat on a sofa", "a red car in the rain", "a mountain lake at dawn", "a bowl of fruit", "a lighthouse at night",
        "an old man reading", "a city street in fog", "a field of sunflowers"]
HELD_OUT = ["a dog on a beach", "a snowy forest", "a plate of pasta", "a sailing boat at sunset"]
PIPE_KWARGS = {"height": 64, "width": 64}

# label -> (prompts, steps, shared seed, calibration selection)
SETS = {
    "8 prompts x 2 steps, seed per prompt": (POOL, 2, False, {}),
    "8 prompts x 2 steps, one seed for all": (POOL, 2, True, {}),
    "4 prompts x 2 seeds x 2 steps": (POOL[:4] * 2, 2, False, {}),
    "4 prompts x 4 steps": (POOL[:4], 4, False, {}),
    "2 prompts x 8 steps": (POOL[:2], 8, False, {}),
    "4 prompts x 8 steps, uniform_steps 4": (POOL[:4], 8, False, {"uniform_steps": 4}),
    "8 prompts x 4 steps, late half (t <= 500)": (POOL, 4, False, {"timestep_max": 500}),
    "8 prompts x 4 steps, early half (t > 500)": (POOL, 4, False, {"timestep_min": 501}),
}


@contextmanager
def one_seed_for_all():
    original = calibrate_stage.seeded_generator
    calibrate_stage.seeded_generator = lambda seed, prompt_index, device: original(seed, 0, device)
    try:
        yield
    finally:
        calibrate_stage.seeded_generator = original


def held_out_outputs(model: torch.nn.Module, artifact: CalibrationArtifact) -> tuple[list[dict], torch.Tensor]:
    samples = [artifact.sample(i) for i in range(len(artifact.records))]
    with torch.no_grad():
        return samples, torch.cat([model(**s)[0].flatten() for s in samples])


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.double().pow(2).sum() / (ref.double() - approx.double()).pow(2).sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sdxl")
    parser.add_argument("--recipes", default="int8_w8a8,fp8")
    parser.add_argument("--sets", default=";".join(SETS), help="semicolon-separated labels of SETS")
    parser.add_argument("--seeds", default="0", help="calibration base seeds, comma-separated (one row per seed)")
    args = parser.parse_args()
    recipes = args.recipes.split(",")
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir(args.family)).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    target = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    model = getattr(pipe, target).eval()
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, tiny-{args.family}")
    print("| calibration set | seed | samples | " + " | ".join(f"{r} held-out SQNR dB" for r in recipes) + " | calibrate s |")
    print("|---|---|---|" + "---|" * len(recipes) + "---|")
    with tempfile.TemporaryDirectory() as tmp:
        held = calibrate(pipe, target, HELD_OUT, Path(tmp) / "held-out", num_inference_steps=4, seed=1234, show_progress=False, **PIPE_KWARGS)
        samples, reference = held_out_outputs(model, CalibrationArtifact(held.out))
        for label in args.sets.split(";"):
            prompts, steps, shared, selection = SETS[label]
            for seed in (int(s) for s in args.seeds.split(",")):
                out = Path(tmp) / f"set-{abs(hash((label, seed)))}"
                start = time.perf_counter()
                if shared:
                    with one_seed_for_all():
                        calibrate(pipe, target, prompts, out, num_inference_steps=steps, seed=seed, show_progress=False, **PIPE_KWARGS)
                else:
                    calibrate(pipe, target, prompts, out, num_inference_steps=steps, seed=seed, show_progress=False, **PIPE_KWARGS)
                seconds = time.perf_counter() - start
                cells, used = [], None
                for recipe in recipes:
                    raw = yaml.safe_load((CONFIGS / f"{recipe}.yaml").read_text())
                    raw.update(name=f"{recipe}-calibset", exclude=convs, exclude_mode="replace", calibration={"holdout": 1, **selection})
                    q = copy.deepcopy(model)
                    quantize(q, str(out), raw, out=Path(tmp) / "q", overwrite=True, use_stats_cache=False)
                    manifest = json.loads((Path(tmp) / "q" / "quant_manifest.json").read_text())
                    used = manifest["calibration"]["num_calibration_samples"] if used is None else used
                    with torch.no_grad():
                        cells.append(sqnr_db(reference, torch.cat([q(**s)[0].flatten() for s in samples])))
                print(f"| {label} | {seed} | {used} | " + " | ".join(f"{c:.2f}" for c in cells) + f" | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
