"""AMD Quark's `ModelQuantizer.quantize_model` on a diffquant calibration artifact, in a process of its own.

What `bench_scale.py --quark` runs once per recipe, after `diffquant quantize` wrote its checkpoint:
its peak RSS (VmHWM) is then Quark's alone. The checkpoint given first with `--against` fixes the
layers (Quark gets every other Linear / Conv2d by name as `exclude`, and the set Quark quantized is
checked equal to diffquant's), the held-out samples (split by stage two's own rule,
`diffquant.artifacts.sample_split.choose_samples`, for the same recipe and `--holdout`, and checked
equal to the ids the checkpoint recorded) and so the calibration samples: Quark calibrates on
exactly the samples diffquant's observers saw.

Steps, as stage two orders them: load the submodule (`diffquant.models.placement`, as `diffquant
quantize --device D` does); one pass of the float model over the held-out samples that keeps each
layer's inputs (`capture_layer_inputs`, the same rows as the quality report) and the outputs;
`quantize_model(model, loader)` over the calibration samples (timed); the output SQNR over the
held-out samples with stage two's own `measure_output`. Peak RSS and the process's seconds are
read there, before the per-layer part:

- every layer's output SQNR on its held-out inputs: Quark's layer as it runs (input quantizer
  included) against the float layer; for weight-only recipes also the float layer with each
  checkpoint's dequantized weight (a check on the manifest's per-layer figure, which is also given);
- per checkpoint, Quark's fake-quantized weight against diffquant's codes and scale
  (`harness.compare_int_weights`: the scales, the differing codes and values, how close the
  differing elements lie to a rounding tie).

Prints one line `RESULT <json>`; `--layers-out FILE` gets the per-layer records.

    python benchmarks/quark_stage_two.py --calib DIR --recipe int8_weight_only --holdout 2 \\
        --against CHECKPOINT [--against CHECKPOINT2] [--layers-out FILE] [--started EPOCH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import check_same_layers, compare_int_weights, layer_forward, quark_config, quark_exclude, quark_layer_names, quark_weight, rss_peak_mb  # noqa: E402

from diffquant.artifacts.calibration_reader import CalibrationArtifact, CalibrationDataset, calibration_loader  # noqa: E402
from diffquant.artifacts.sample_split import SELECTION_FIELDS, choose_samples  # noqa: E402
from diffquant.eval.measure import DEFAULT_LAYER_ROWS, capture_layer_inputs, measure_output, sqnr_from_energy  # noqa: E402
from diffquant.models.placement import placement_for  # noqa: E402
from diffquant.models.presets import preset_of_artifact  # noqa: E402
from diffquant.recipes import load_recipe  # noqa: E402


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--recipe", required=True, help="a shipped recipe with a Quark configuration (harness.quark_config)")
    parser.add_argument("--holdout", type=int, required=True)
    parser.add_argument("--against", type=Path, action="append", required=True, help="a diffquant checkpoint of the same artifact")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers-out", type=Path, default=None)
    parser.add_argument("--started", type=float, default=None, help="time.time() when the parent started this process")
    return parser.parse_args()


def main() -> None:
    args = parse()
    started = args.started if args.started is not None else time.time()
    from quark.torch import ModelQuantizer

    artifact = CalibrationArtifact(args.calib)
    manifests = [json.loads((path / "quant_manifest.json").read_text()) for path in args.against]
    names = [layer["name"] for layer in manifests[0]["layers"]]
    recipe = load_recipe(args.recipe)
    overrides = {**dict.fromkeys(SELECTION_FIELDS), "holdout": args.holdout}
    split = choose_samples(artifact.records, overrides, recipe.calibration, "holdout" in (recipe.source.get("calibration") or {}))
    holdout_ids = [artifact.records[i].id for i in split.holdout]
    for path, manifest in zip(args.against, manifests):
        recorded = manifest["calibration"]
        if recorded["holdout_sample_ids"] != holdout_ids or recorded["num_calibration_samples"] != len(split.calibration):
            raise SystemExit(f"{path}: held out {recorded['holdout_sample_ids']} of {recorded['num_calibration_samples']} + held out, "
                             f"this split holds out {holdout_ids} of {len(split.calibration)} + held out")
        if [layer["name"] for layer in manifest["layers"]] != names:
            raise SystemExit(f"{path} quantized other layers than {args.against[0]}")

    def samples(indices: list[int]) -> Any:
        return calibration_loader(CalibrationDataset(artifact, indices=indices), args.device)

    load_start = time.perf_counter()
    model = placement_for(args.device).load(preset_of_artifact(artifact.manifest["model"])).eval()
    load_s = time.perf_counter() - load_start
    reference_start = time.perf_counter()
    layer_inputs, fp_outputs = capture_layer_inputs(model, names, samples(split.holdout), DEFAULT_LAYER_ROWS, False)
    reference_s = time.perf_counter() - reference_start
    exclude = quark_exclude(model, names)
    loader = torch.utils.data.DataLoader(CalibrationDataset(artifact, indices=split.calibration), batch_size=None)
    quantize_start = time.perf_counter()
    model = ModelQuantizer(quark_config(args.recipe, exclude)).quantize_model(model, loader)
    quantize_s = time.perf_counter() - quantize_start
    layers = check_same_layers(quark_layer_names(model), names)
    model.eval()
    output_start = time.perf_counter()
    output_sqnr = measure_output(model, fp_outputs, samples(split.holdout))
    output_s = time.perf_counter() - output_start
    peak_bytes = rss_peak_mb() * 2**20
    process_s = time.time() - started
    del fp_outputs

    weight_only = recipe.global_spec.input is None
    records = []
    modules = dict(model.named_modules())
    with layer_inputs:
        for index, name in enumerate(names):
            records.append(compare_layer(name, modules[name], layer_inputs.pop(name), manifests, args.against, weight_only))
            if index % 50 == 0:
                print(f"compared {index + 1} of {len(names)} layers", file=sys.stderr, flush=True)
    if args.layers_out is not None:
        args.layers_out.write_text(json.dumps(records, indent=1) + "\n")
    result = {"recipe": args.recipe, "layers": layers, "excluded": len(exclude), "calibration_samples": len(split.calibration),
              "holdout_sample_ids": holdout_ids, "load_s": load_s, "reference_s": reference_s, "quantize_s": quantize_s,
              "output_s": output_s, "process_s": process_s, "peak_bytes": peak_bytes, "output_sqnr_db": output_sqnr,
              "summary": summarize(records, [str(path) for path in args.against])}
    print("RESULT " + json.dumps(result), flush=True)


def compare_layer(name: str, module: torch.nn.Module, inputs: list[torch.Tensor], manifests: list[dict[str, Any]],
                  checkpoints: list[Path], weight_only: bool) -> dict[str, Any]:
    """One layer's record: output SQNRs on its held-out inputs and the weight comparison per checkpoint."""
    from safetensors import safe_open

    weight = module.weight.detach()
    quark, quark_scale = quark_weight(module)
    record: dict[str, Any] = {"name": name, "type": type(module).__name__, "quark_output_sqnr_db": None, "checkpoints": []}
    dequantized_weights = []
    for path, manifest in zip(checkpoints, manifests):
        layer = next(entry for entry in manifest["layers"] if entry["name"] == name)
        with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
            codes = handle.get_tensor(layer["tensors"]["weight"])
            scale = handle.get_tensor(layer["tensors"]["weight_scale"])
        comparison = compare_int_weights(weight, quark, quark_scale, codes, scale)
        entry = {"checkpoint": str(path), "manifest_output_sqnr_db": layer["quality"].get("output_sqnr_db"), **dataclasses.asdict(comparison)}
        if module.input_quantizer is not None and "input_scale" in layer.get("input_tensors", {}):
            with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
                input_scale = handle.get_tensor(layer["input_tensors"]["input_scale"]).float().reshape(())
            quark_input = module.input_quantizer.scale.detach().float().reshape(())
            entry.update(quark_input_scale=float(quark_input), diffquant_input_scale=float(input_scale),
                         same_input_scale=bool(torch.equal(quark_input, input_scale)))
        record["checkpoints"].append(entry)
        dequantized_weights.append((codes.float() * scale.float()).reshape(weight.shape) if weight_only else None)
    signal = 0.0
    noise = [0.0] * (1 + len(checkpoints))
    with torch.inference_mode():
        for x in inputs:
            reference = layer_forward(module, x, weight).double()
            signal += float(reference.pow(2).sum())
            noise[0] += float((reference - module(x).double()).pow(2).sum())
            for i, dequantized in enumerate(dequantized_weights):
                if dequantized is not None:
                    noise[i + 1] += float((reference - layer_forward(module, x, dequantized).double()).pow(2).sum())
    record["quark_output_sqnr_db"] = sqnr_from_energy(signal, noise[0])
    for i, entry in enumerate(record["checkpoints"]):
        entry["recomputed_output_sqnr_db"] = sqnr_from_energy(signal, noise[i + 1]) if weight_only else None
    return record


def summarize(records: list[dict[str, Any]], checkpoints: list[str]) -> list[dict[str, Any]]:
    """Per checkpoint: totals of the weight comparison over the layers, and the median layer SQNRs."""
    def median(values: list[float | None]) -> float | None:
        finite = sorted(v for v in values if v is not None)
        return finite[len(finite) // 2] if finite else None  # stage two's rule (`median_and_worst`)

    out = []
    for i, checkpoint in enumerate(checkpoints):
        entries = [record["checkpoints"][i] for record in records]
        recomputed = [e["recomputed_output_sqnr_db"] for e in entries]
        manifest = [e["manifest_output_sqnr_db"] for e in entries]
        gaps = [abs(a - b) for a, b in zip(recomputed, manifest) if a is not None and b is not None]
        ties = [e["tie_distance_max"] for e in entries if e["tie_distance_max"] is not None]
        out.append({
            "checkpoint": checkpoint,
            "elements": sum(e["numel"] for e in entries),
            "layers_same_scale": sum(e["same_scale"] for e in entries),
            "scale_ratio_min": min(e["diffquant_scale"] / e["quark_scale"] for e in entries),
            "scale_ratio_max": max(e["diffquant_scale"] / e["quark_scale"] for e in entries),
            "differing_codes": sum(e["differing_codes"] for e in entries),
            "layers_with_differing_codes": sum(e["differing_codes"] > 0 for e in entries),
            "max_code_difference": max(e["max_code_difference"] for e in entries),
            "differing_values": sum(e["differing_values"] for e in entries),
            "tie_distance_max": max(ties) if ties else None,
            "median_layer_quark_db": median([r["quark_output_sqnr_db"] for r in records]),
            "median_layer_manifest_db": median(manifest),
            "median_layer_recomputed_db": median(recomputed),
            "max_recomputed_vs_manifest_db": max(gaps) if gaps else None,
            **input_scale_summary(entries),
            "median_weight_sqnr_quark_db": median([e["quark_weight_sqnr_db"] for e in entries]),
            "median_weight_sqnr_diffquant_db": median([e["diffquant_weight_sqnr_db"] for e in entries]),
        })
    return out


def input_scale_summary(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Static input scales (W8A8): how many layers have Quark's bit for bit, and the ratio range."""
    scaled = [e for e in entries if "quark_input_scale" in e]
    if not scaled:
        return {}
    ratios = [e["diffquant_input_scale"] / e["quark_input_scale"] for e in scaled]
    return {"input_scaled_layers": len(scaled), "layers_same_input_scale": sum(e["same_input_scale"] for e in scaled),
            "input_scale_ratio_min": min(ratios), "input_scale_ratio_max": max(ratios)}


if __name__ == "__main__":
    main()
