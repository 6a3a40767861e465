"""Where diffquant and AMD Quark 0.13 differ, bit for bit, on INT4 w4a4 (issue 17).

Both tools quantize a tiny twin as `bench_vs_quark.py` does (same calibration artifact, same 50 / 32
layers), with INT4 per-group-64 weights and dynamic per-group-64 inputs at s = amax / 7.5 and
min_max on both (diffquant `half_span w+x`). For every layer, this script compares the fake-quantized
weight and the fake-quantized input of the first sample against two independent formulas:
round(x / s), diffquant's (`diffquant/quant/formats/affine.py`), and round(x * (1 / s)), Quark's
(`quark/torch/kernel/hw_emulation/hw_emulation_interface.py`, `fake_quantize_per_channel_affine`).
It prints, per layer, how many values each tool misses each formula by, and sorts every code
on which the two formulas disagree by (division code, reciprocal code, where in its group).

    PYTHONPATH=. python benchmarks/quark_bit_diff.py [--family flux|sd3|sdxl]

Measured (flux): each tool equals its own formula on every weight and input, and all 1,246
differing codes are the -amax element of a group: -8 against -7 or the reverse
(benchmarks/RESULTS.md, "Why diffquant and Quark differ on w4a4").
"""

from __future__ import annotations

import argparse
import collections
import copy
import tempfile
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from bench_vs_quark import PIPE_KWARGS, PROMPTS, layer_inputs  # type: ignore[import-not-found]
from harness import diffquant_recipe, quark_config  # type: ignore[import-not-found]
from diffquant.api import quantize
from diffquant.compat.quark import get_calib_dataloader
from diffquant.models.tiny import tiny_pipeline_dir

GROUP = 64


def half_span_codes(x: torch.Tensor, reciprocal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """INT4 codes of x in rows of 64 at s = amax / 7.5: (codes, groups, s), x / s or x * (1 / s)."""
    groups = x.detach().float().reshape(-1, GROUP)
    scale = groups.abs().amax(1, keepdim=True) / 7.5
    quotient = groups * (1.0 / scale) if reciprocal else groups / scale
    return torch.clamp(torch.round(quotient), -8, 7), groups, scale


def misses(fake_quantized: torch.Tensor, x: torch.Tensor) -> tuple[int, int]:
    """How many values of a fake-quantized x differ from the (division, reciprocal) formula."""
    out = []
    for reciprocal in (False, True):
        codes, _, scale = half_span_codes(x, reciprocal)
        out.append(int((fake_quantized.detach().float().reshape(-1, GROUP) != codes * scale).sum()))
    return out[0], out[1]


def where_in_group(groups: torch.Tensor, row: int, col: int) -> str:
    value, amax = groups[row, col], groups[row].abs().amax()
    return "-amax" if value == -amax else "+amax" if value == amax else "inside"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="flux")
    args = parser.parse_args()
    torch.manual_seed(0)
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir(args.family)).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    target = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    model = getattr(pipe, target).float().eval()
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "calib"
        loader = get_calib_dataloader(pipe, model, PROMPTS, n_steps=2, out=artifact, show_progress=False, **PIPE_KWARGS)
        samples = list(loader)
        convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
        ours = copy.deepcopy(model)
        quantize(ours, str(artifact), diffquant_recipe("w4a4", "diffquant half_span w+x", exclude=convs), holdout=0)
        names = [n for n, m in ours.named_modules() if type(m).__name__ == "QuantizedLinear"]
        linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        exclude = [n for n in linears + convs if n not in set(names)]
        from quark.torch import ModelQuantizer

        theirs = ModelQuantizer(quark_config("w4a4", exclude)).quantize_model(copy.deepcopy(model), loader)
    inputs = layer_inputs(model, names, samples[0])
    ours_by_name, theirs_by_name = dict(ours.named_modules()), dict(theirs.named_modules())
    kinds: collections.Counter[tuple] = collections.Counter()
    print("| layer | tensor | values | diffquant misses x/s, x*(1/s) | Quark misses x/s, x*(1/s) |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for name in names:
            a, b = ours_by_name[name], theirs_by_name[name]
            pairs = {"weight": (b.weight, a.quantized_weight().dequantize(torch.float32), b.get_quant_weight(b.weight)),
                     "input": (inputs[name], a.fake_quantize_input(inputs[name]), b.get_quant_input(inputs[name]))}
            for tensor, (x, by_diffquant, by_quark) in pairs.items():
                print(f"| {name} | {tensor} | {x.numel()} | {misses(by_diffquant, x)} | {misses(by_quark, x)} |")
                by_division, groups, _ = half_span_codes(x, reciprocal=False)
                by_reciprocal, _, _ = half_span_codes(x, reciprocal=True)
                for row, col in (by_division != by_reciprocal).nonzero().tolist():
                    kinds[(tensor, int(by_division[row, col]), int(by_reciprocal[row, col]), where_in_group(groups, row, col))] += 1
    print("\n| tensor | code by x/s | code by x*(1/s) | element | count |\n|---|---|---|---|---|")
    for (tensor, division, reciprocal, where), count in sorted(kinds.items()):
        print(f"| {tensor} | {division} | {reciprocal} | {where} | {count} |")


if __name__ == "__main__":
    main()
