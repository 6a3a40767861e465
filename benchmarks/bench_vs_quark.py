"""diffquant against AMD Quark 0.13 at equal settings, on tiny diffusers twins (issue 17).

For each tiny family: one diffquant calibration artifact (`diffquant.compat.quark.get_calib_dataloader`)
feeds both tools; both quantize exactly the same layers (every nn.Linear diffquant's recipe quantizes;
Quark excludes every other Linear / Conv2d by name). Printed per recipe: output SQNR of the target
submodule over every artifact sample, and the median / worst layer SQNR (each quantized layer fed the
float model's own input of the first sample). The diffquant rows: shipped numerics, `scale_rule:
half_span` (Quark's amax / ((qmax - qmin) / 2), opt-in), and for the INT4 recipes also the weight
`observer: mse_search` clip search on top. Quark's own log goes to stdout too: keep the `| <family>` rows.

    PYTHONPATH=. python benchmarks/bench_vs_quark.py [--quick] [--families sdxl,sd3]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml
from diffusers import DiffusionPipeline

from diffquant.api import quantize
from diffquant.compat.quark import get_calib_dataloader
from diffquant.models.tiny import tiny_pipeline_dir

RECIPES = ("int8_weight_only", "int8_w8a8", "w4a16", "w4a4")
PROMPTS = ["a cat on a sofa", "a red car in the rain", "a mountain lake at dawn", "a bowl of fruit"]
PIPE_KWARGS = {"height": 64, "width": 64}
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "quant"


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    noise = (ref.double() - approx.double()).pow(2).sum()
    return float(10 * torch.log10(ref.double().pow(2).sum() / noise.clamp_min(1e-300)))


def quark_config(recipe: str, exclude: list[str]):
    from quark.torch.quantization.config.config import Int4PerGroupSpec, Int8PerTensorSpec, QConfig, QLayerConfig

    int8 = Int8PerTensorSpec(observer_method="min_max", symmetric=True, scale_type="float", round_method="half_even",
                             is_dynamic=False).to_quantization_spec()
    int4w = Int4PerGroupSpec(ch_axis=-1, group_size=64, symmetric=True, is_dynamic=False).to_quantization_spec()
    int4x = Int4PerGroupSpec(ch_axis=-1, group_size=64, symmetric=True, is_dynamic=True).to_quantization_spec()
    layer = {"int8_weight_only": QLayerConfig(weight=int8), "int8_w8a8": QLayerConfig(weight=int8, input_tensors=int8),
             "w4a16": QLayerConfig(weight=int4w), "w4a4": QLayerConfig(weight=int4w, input_tensors=int4x)}[recipe]
    return QConfig(global_quant_config=layer, exclude=exclude)


VARIANTS = {"diffquant": (None, None), "diffquant half_span": ("half_span", None),
            "diffquant half_span+mse_search": ("half_span", "mse_search")}


def diffquant_recipe(recipe: str, exclude: list[str], scale_rule: str | None, weight_observer: str | None = None) -> dict:
    raw = yaml.safe_load((CONFIGS / f"{recipe}.yaml").read_text())
    raw.update(name=f"{recipe}-bench", exclude=exclude, exclude_mode="replace")
    if weight_observer:
        raw["global"]["weight"]["observer"] = weight_observer
    if scale_rule:
        for key in ("weight", "input"):
            spec = raw["global"].get(key)
            if spec and spec["dtype"].startswith("int") and not (spec["dtype"] == "int8" and spec.get("dynamic")):
                spec["scale_rule"] = scale_rule
    return raw


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


def evaluate(model, reference, ref_out, samples, inputs, names) -> dict[str, float]:
    modules = dict(model.named_modules())
    ref_modules = dict(reference.named_modules())
    layer = []
    with torch.no_grad():
        for n in names:
            layer.append(sqnr_db(ref_modules[n](inputs[n]), modules[n](inputs[n])))
    return {"out": sqnr_db(ref_out, outputs(model, samples)), "median": statistics.median(layer), "worst": min(layer)}


def run_family(family: str, recipes: tuple[str, ...], work: Path) -> list[tuple]:
    from quark.torch import ModelQuantizer

    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir(family))
    pipe.set_progress_bar_config(disable=True)
    target = "unet" if hasattr(pipe, "unet") and pipe.unet is not None else "transformer"
    model = getattr(pipe, target).float().eval()
    loader = get_calib_dataloader(pipe, model, PROMPTS, n_steps=2, out=work / f"{family}-calib", show_progress=False, **PIPE_KWARGS)
    samples = list(loader)
    artifact = work / f"{family}-calib"
    ref_out = outputs(model, samples)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    rows = []
    for recipe in recipes:
        dq = {}
        for label, (rule, observer) in VARIANTS.items():
            if observer and not recipe.startswith("w4"):
                continue
            q = copy.deepcopy(model)
            start = time.perf_counter()
            quantize(q, str(artifact), diffquant_recipe(recipe, convs, rule, observer))
            seconds = time.perf_counter() - start
            names = [n for n, m in q.named_modules() if type(m).__name__ == "QuantizedLinear"]
            dq[label] = (q, names, seconds)
        names = dq["diffquant"][1]
        inputs = layer_inputs(model, names, samples[0])
        exclude = [n for n in linears + convs if n not in set(names)]
        start = time.perf_counter()
        qq = ModelQuantizer(quark_config(recipe, exclude)).quantize_model(copy.deepcopy(model), loader)
        quark_s = time.perf_counter() - start
        quark_layers = [n for n, m in qq.named_modules() if type(m).__name__.startswith("Quant") and n in set(names)]
        assert len(quark_layers) == len(names), f"Quark quantized {len(quark_layers)} of the {len(names)} layers"
        rows.append((family, recipe, "quark", len(names), quark_s, evaluate(qq, model, ref_out, samples, inputs, names)))
        for label, (q, _, seconds) in dq.items():
            rows.append((family, recipe, label, len(names), seconds, evaluate(q, model, ref_out, samples, inputs, names)))
        for row in rows[-1 - len(dq):]:
            print_row(row, flush=True)
    return rows


def print_row(row, flush=False) -> None:
    family, recipe, tool, layers, seconds, m = row
    print(f"| {family} | {recipe} | {tool} | {layers} | {m['out']:.2f} | {m['median']:.2f} | {m['worst']:.2f} | {seconds:.1f} |", flush=flush)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny-sdxl only, w4a16 and int8_w8a8")
    parser.add_argument("--families", default="sdxl,sd3")
    args = parser.parse_args()
    families = ["sdxl"] if args.quick else args.families.split(",")
    recipes = ("int8_w8a8", "w4a16") if args.quick else RECIPES
    torch.manual_seed(0)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| family | recipe | tool | layers | output SQNR dB | median layer dB | worst layer dB | quantize s |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            run_family(family, recipes, Path(tmp))


if __name__ == "__main__":
    main()
