"""diffquant against AMD Quark 0.13 at equal settings, on tiny diffusers twins (issue 17).

For each tiny family: one diffquant calibration artifact (`diffquant.compat.quark.get_calib_dataloader`)
feeds both tools, every sample to both (diffquant with `holdout=0`: stage two otherwise keeps
held-out samples from its observers, and the figures below are taken over every sample); both quantize exactly the same layers (every nn.Linear diffquant's recipe quantizes;
Quark excludes every other Linear / Conv2d by name). Printed per recipe: output SQNR of the target
submodule over every artifact sample, and the median / worst layer SQNR (each quantized layer fed the
float model's own input of the first sample), and image PSNR: the pipeline with the quantized
target against the float pipeline, 8 prompts x 2 steps at 64 px, same seeds. Every model runs in
float32. Rows: `quark`; `diffquant` (the shipped recipe as it is now); and for the integer recipes
explicit variants that do not depend on the shipped defaults: `qmax` (s = amax / qmax, min_max: the
round-to-nearest baseline), `half_span` (Quark's amax / ((qmax - qmin) / 2)) on the weight, on the
weight and the integer inputs (`w+x`), and the weight `observer: mse_search` clip search on top.
Calibration-free baselines (`*_rtn`, `fp8_dynamic`) and SVDQuant have no Quark row (Quark's
SVDQuant is not run here). Quark's own log goes to stdout too: keep the `| <family>` rows.

    PYTHONPATH=. python benchmarks/bench_vs_quark.py [--quick] [--families sdxl,sd3,flux (default: every tiny family)]
        [--recipes w4a16,w4a4] [--no-images] [--variants "diffquant half_span"] [--quark-rounding]
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from diffusers import DiffusionPipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import CONFIGS, QUARK_RECIPES, check_same_layers, diffquant_recipe, quark_config, quark_exclude, quark_layer_names, variants_for  # noqa: E402

from diffquant.api import quantize  # noqa: E402
from diffquant.compat.quark import get_calib_dataloader  # noqa: E402
from diffquant.models.tiny import TINY_FAMILIES, tiny_pipeline_dir  # noqa: E402

RECIPES = ("int8_weight_only", "int8_w8a8", "w4a16", "w4a4", "fp8", "nvfp4_static", "svdquant_w4a16", "svdquant_w4a4")
# 8 images: with 2 (as before) the image PSNR of two equally good checkpoints differed by up to ~0.8 dB.
IMAGE_PROMPTS = ["a cat on a sofa", "a mountain lake at dawn", "a red car in the rain", "a bowl of fruit",
                 "an old man reading", "a city street at night", "a field of sunflowers", "a wooden boat"]
PROMPTS = ["a cat on a sofa", "a red car in the rain", "a mountain lake at dawn", "a bowl of fruit"]
PIPE_KWARGS = {"height": 64, "width": 64}


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    noise = (ref.double() - approx.double()).pow(2).sum()
    return float(10 * torch.log10(ref.double().pow(2).sum() / noise.clamp_min(1e-300)))


def images(pipe, target: str, model: torch.nn.Module) -> torch.Tensor:
    """float [N, H, W, 3] in [0, 1]: the pipeline with `model` as its target, fixed seeds."""
    setattr(pipe, target, model)
    out = []
    with torch.no_grad():
        for i, prompt in enumerate(IMAGE_PROMPTS):
            result = pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(100 + i), output_type="np", **PIPE_KWARGS)
            out.append(torch.from_numpy(result.images[0]))
    return torch.stack(out).double()


def psnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    mse = float((ref - approx).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def layer_inputs(model: torch.nn.Module, names: list[str], sample: dict) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0].detach())) for n in names]
    with torch.no_grad():
        model(**sample)
    for h in handles:
        h.remove()
    return seen


def outputs(model: torch.nn.Module, samples: list[dict]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**s)[0].flatten() for s in samples])


def evaluate(model, reference, ref_out, samples, inputs, names, image_fn=None) -> dict[str, float]:
    modules = dict(model.named_modules())
    ref_modules = dict(reference.named_modules())
    layer = []
    with torch.no_grad():
        for n in names:
            layer.append(sqnr_db(ref_modules[n](inputs[n]), modules[n](inputs[n])))
    result = {"out": sqnr_db(ref_out, outputs(model, samples)), "median": statistics.median(layer), "worst": min(layer)}
    result["psnr"] = image_fn(model) if image_fn else float("nan")
    return result


def run_family(family: str, recipes: tuple[str, ...], work: Path, with_images: bool = True,
               variants: tuple[str, ...] | None = None) -> list[tuple]:
    from quark.torch import ModelQuantizer

    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir(family)).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    target = "unet" if hasattr(pipe, "unet") and pipe.unet is not None else "transformer"
    model = getattr(pipe, target).float().eval()
    loader = get_calib_dataloader(pipe, model, PROMPTS, n_steps=2, out=work / f"{family}-calib", show_progress=False, **PIPE_KWARGS)
    samples = list(loader)
    artifact = work / f"{family}-calib"
    ref_out = outputs(model, samples)
    ref_images = images(pipe, target, model) if with_images else None
    image_fn = (lambda q: psnr_db(ref_images, images(pipe, target, q))) if with_images else None
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    rows = []
    for recipe in recipes:
        raw = yaml.safe_load((CONFIGS / f"{recipe}.yaml").read_text())
        dq = {}
        for label in variants_for(recipe, raw):
            if variants is not None and label not in variants and label != "diffquant":
                continue
            q = copy.deepcopy(model)
            start = time.perf_counter()
            quantize(q, str(artifact), diffquant_recipe(recipe, label, exclude=convs), holdout=0)  # observers see every sample, as Quark's do
            seconds = time.perf_counter() - start
            names = [n for n, m in q.named_modules() if type(m).__name__ == "QuantizedLinear"]
            dq[label] = (q, names, seconds)
        names = dq["diffquant"][1]
        inputs = layer_inputs(model, names, samples[0])
        first = len(rows)
        if recipe in QUARK_RECIPES:
            start = time.perf_counter()
            qq = ModelQuantizer(quark_config(recipe, quark_exclude(model, names))).quantize_model(copy.deepcopy(model), loader)
            quark_s = time.perf_counter() - start
            check_same_layers(quark_layer_names(qq), names)
            rows.append((family, recipe, "quark", len(names), quark_s, evaluate(qq, model, ref_out, samples, inputs, names, image_fn)))
        for label, (q, _, seconds) in dq.items():
            rows.append((family, recipe, label, len(names), seconds, evaluate(q, model, ref_out, samples, inputs, names, image_fn)))
        for row in rows[first:]:
            print_row(row, flush=True)
    setattr(pipe, target, model)
    return rows


def print_row(row, flush=False) -> None:
    family, recipe, tool, layers, seconds, m = row
    print(f"| {family} | {recipe} | {tool} | {layers} | {m['out']:.2f} | {m['median']:.2f} | {m['worst']:.2f} | {m['psnr']:.2f} | {seconds:.1f} |",
          flush=flush)


def use_quark_rounding() -> None:
    """Experiment only: make diffquant's affine codes round(x * fl(1/s)) + zp, as Quark's
    `fake_quantize_per_channel_affine` (quark/torch/kernel/hw_emulation/hw_emulation_interface.py)
    and torch.fake_quantize_per_tensor_affine compute them, instead of its own round(x / s) + zp.
    The two differ only where x / s lies within an ulp of a tie k + 0.5; the rows this prints
    show that this is the whole difference left at equal settings."""
    import diffquant.quant.weights.affine as affine

    def quantize_affine(x, scale, zero_point, qmin, qmax, dtype=torch.int32):
        y = torch.round(x.float() * (1.0 / scale.float())).nan_to_num(nan=0.0)
        if zero_point is not None:
            y = y + zero_point.float()
        return y.clamp(qmin, qmax).to(dtype)

    affine.quantize_affine = quantize_affine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny-sdxl only, w4a16 and int8_w8a8")
    parser.add_argument("--families", default=",".join(TINY_FAMILIES), help="tiny families (default: every one)")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--no-images", action="store_true", help="skip the image PSNR column (nan)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated diffquant rows to add to the shipped `diffquant` row (default: every variant)")
    parser.add_argument("--quark-rounding", action="store_true",
                        help="experiment: diffquant's integer codes as round(x * fl(1/s)), Quark's fake quantizer, not round(x / s)")
    args = parser.parse_args()
    if args.quark_rounding:
        use_quark_rounding()
    families = ["sdxl"] if args.quick else args.families.split(",")
    recipes = ("int8_w8a8", "w4a16") if args.quick else tuple(args.recipes.split(","))
    torch.manual_seed(0)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| family | recipe | tool | layers | output SQNR dB | median layer dB | worst layer dB | image PSNR dB | quantize s |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            variants = None if args.variants is None else tuple(v for v in args.variants.split(",") if v)
            run_family(family, recipes, Path(tmp), with_images=not args.no_images, variants=variants)


if __name__ == "__main__":
    main()
