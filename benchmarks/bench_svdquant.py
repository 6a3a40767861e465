"""SVDQuant's SVD choices on tiny twins (issue 17): randomized vs exact SVD, oversampling, power
iterations, and refine rounds, by output / median / worst layer SQNR and quantize time.

One diffquant calibration artifact per family (4 prompts x 2 steps at 64 px, as bench_vs_quark);
each variant overrides the shipped recipe's svdquant options only. Layer SQNR: each quantized layer
on the float model's own input of the first sample. Then `low_rank_split` alone at real layer shapes
(the cost of oversampling / power iterations), and `refine_low_rank` on a synthetic layer with
outlier input channels (the gain of refinement on the layer output).

    PYTHONPATH=. python benchmarks/bench_svdquant.py [--families flux] [--recipe svdquant_w4a4] [--no-shapes]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from diffusers import DiffusionPipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_quark import CONFIGS, PIPE_KWARGS, PROMPTS, layer_inputs, outputs, sqnr_db  # noqa: E402

from diffquant.api import quantize  # noqa: E402
from diffquant.compat.quark import get_calib_dataloader  # noqa: E402
from diffquant.models.tiny import tiny_pipeline_dir  # noqa: E402
from diffquant.quant.algorithms.svdquant import low_rank_split  # noqa: E402

VARIANTS = {
    "full": {"svd": "full"},
    "lowrank niter 4": {"svd": "lowrank", "niter": 4, "oversample": 0},
    "lowrank niter 8": {"svd": "lowrank", "niter": 8, "oversample": 0},
    "lowrank niter 4 oversample 8": {"svd": "lowrank", "niter": 4, "oversample": 8},
    "lowrank niter 4 oversample 16": {"svd": "lowrank", "niter": 4, "oversample": 16},
    "lowrank niter 2 oversample 16": {"svd": "lowrank", "niter": 2, "oversample": 16},
    "full refine 2": {"svd": "full", "refine_iters": 2},
    "full refine 5": {"svd": "full", "refine_iters": 5},
    "lowrank niter 4 oversample 16 refine 2": {"svd": "lowrank", "niter": 4, "oversample": 16, "refine_iters": 2},
    "lowrank niter 4 oversample 16 refine 5": {"svd": "lowrank", "niter": 4, "oversample": 16, "refine_iters": 5},
}


def run_family(family: str, recipe: str, work: Path) -> None:
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir(family)).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    target = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    model = getattr(pipe, target).float().eval()
    loader = get_calib_dataloader(pipe, model, PROMPTS, n_steps=2, out=work / f"{family}-calib", show_progress=False, **PIPE_KWARGS)
    samples = list(loader)
    ref_out = outputs(model, samples)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    inputs = None
    for label, options in VARIANTS.items():
        raw = yaml.safe_load((CONFIGS / f"{recipe}.yaml").read_text())
        raw.update(name=f"{recipe}-bench", exclude=convs, exclude_mode="replace")
        raw["algorithms"][0].update(options)
        q = copy.deepcopy(model)
        start = time.perf_counter()
        quantize(q, str(work / f"{family}-calib"), raw)
        seconds = time.perf_counter() - start
        names = [n for n, m in q.named_modules() if type(m).__name__ == "QuantizedLinear"]
        inputs = inputs or layer_inputs(model, names, samples[0])
        ref_modules, modules = dict(model.named_modules()), dict(q.named_modules())
        with torch.no_grad():
            layer = [sqnr_db(ref_modules[n](inputs[n]), modules[n](inputs[n])) for n in names]
        worst = names[layer.index(min(layer))]
        print(f"| {family} | {recipe} | {label} | {sqnr_db(ref_out, outputs(q, samples)):.2f} | {statistics.median(layer):.2f} | "
              f"{min(layer):.2f} ({worst}) | {seconds:.1f} |", flush=True)


def shapes() -> None:
    """low_rank_split time and residual at real shapes: Gaussian plus a rank-8 part of 3x its norm."""
    print("\n| weight shape | variant | ms | residual / full residual |")
    print("|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for rows, cols in ((1280, 1280), (3072, 3072), (1280, 5120)):
        noise = torch.randn(rows, cols, generator=generator)
        low = torch.randn(rows, 8, generator=generator) @ torch.randn(8, cols, generator=generator)
        w = noise + 3 * low * noise.norm() / low.norm()
        ones = torch.ones(cols)
        full = float(low_rank_split(w, ones, 32, "full").residual.pow(2).sum())
        for label, (niter, oversample) in {"niter 4": (4, 0), "niter 8": (8, 0), "niter 4 oversample 16": (4, 16),
                                           "niter 2 oversample 16": (2, 16)}.items():
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                split = low_rank_split(w, ones, 32, "lowrank", niter, oversample)
                best = min(best, time.perf_counter() - start)
            print(f"| {rows}x{cols} | {label} | {best * 1e3:.0f} | {float(split.residual.pow(2).sum()) / full:.4f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="flux")
    parser.add_argument("--recipe", default="svdquant_w4a4")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated labels of VARIANTS")
    parser.add_argument("--no-shapes", action="store_true")
    args = parser.parse_args()
    chosen = args.variants.split(",")
    for label in list(VARIANTS):
        if label not in chosen:
            del VARIANTS[label]
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| family | recipe | svd | output SQNR dB | median layer dB | worst layer dB (layer) | quantize s |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            run_family(family, args.recipe, Path(tmp))
    if not args.no_shapes:
        shapes()


if __name__ == "__main__":
    main()
