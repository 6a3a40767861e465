"""Exports in their runtimes: output SQNR through the runtime's own code against diffquant's,
side by side on the same held-out samples, and whether the runtime's weights are diffquant's.

tiny-flux (bf16) is calibrated once (3 prompts x 2 steps, 2 samples held out, as the tests do);
each recipe quantizes it, `export_checkpoint` writes each format, and a fresh interpreter that
never imports diffquant loads the file with the runtime (diffusers' GGUF backend, diffusers'
TorchAoConfig, amd-quark's diffusers integration: the loader scripts of tests/test_export_*.py)
and runs the held-out samples. SQNR is against the float model's outputs; "weights equal" counts
the layers whose dequantized weights in the model dtype equal diffquant's bit for bit.

Run: `python benchmarks/bench_exports.py [--quick]`; prints one markdown section.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from harness import command_line, fmt, markdown_table, parse_args, progress, threads_note

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' loader scripts

from diffquant.export import export_checkpoint  # noqa: E402
from diffquant.export.stored import StoredCheckpoint  # noqa: E402
from diffquant.models.tiny import tiny_pipeline_dir  # noqa: E402
from diffquant.stages.calibrate import CalibrationSettings, calibrate  # noqa: E402
from diffquant.stages.quantize import QuantizeSettings, quantize  # noqa: E402
from tests.helpers.export_checks import float_outputs, held_out_samples, outputs, run_without_diffquant, sqnr, to_plain  # noqa: E402

SCRIPT = "bench_exports.py"
MODEL = "tiny-flux"


@dataclass(frozen=True)
class Case:
    fmt: str
    recipe: str
    options: tuple[tuple[str, str], ...] = ()


FULL = (
    Case("gguf", "gguf_q8_0"), Case("gguf", "int8_weight_only"), Case("gguf", "w4a16"),
    Case("torchao", "int8_weight_only"), Case("torchao", "int8_weight_only", (("int8_tensor", "Int8Tensor"),)),
    Case("torchao", "int8_dynamic"), Case("torchao", "fp8_dynamic"), Case("torchao", "w4a16"),
    Case("quark", "int8_weight_only"), Case("quark", "int8_w8a8"), Case("quark", "fp8"), Case("quark", "mxfp4"), Case("quark", "nvfp4_static"),
)
QUICK = (Case("gguf", "gguf_q8_0"), Case("torchao", "int8_dynamic"))


def main() -> None:
    args = parse_args(__doc__)
    cases = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="diffquant-bench-") as tmp:
        work = Path(tmp)
        progress(f"{SCRIPT}: calibrating {MODEL}, 3 prompts x 2 steps")
        calib = work / "calib"
        calibrate(CalibrationSettings(model=MODEL, out=calib, num_prompts=3, steps=2, device="cpu"), show_progress=False)
        results: dict[str, Any] = {}
        rows = []
        for case in cases:
            if case.recipe not in results:
                progress(f"{SCRIPT}: quantize {case.recipe}")
                results[case.recipe] = quantize(QuantizeSettings(calib=calib, recipe=case.recipe, out=work / "q" / case.recipe, device="cpu",
                                                                 holdout=2), show_progress=False)
            progress(f"{SCRIPT}: export {case.recipe} --to {case.fmt} {dict(case.options) or ''}")
            rows.append(measure(case, results[case.recipe], calib, work / f"{case.fmt}-{case.recipe}-{len(rows)}"))
        print(render(args.quick, rows))


def measure(case: Case, result: Any, calib: Path, work: Path) -> list[Any]:
    """One table row: format, recipe, options, runtime SQNR, diffquant SQNR, their difference, weights equal."""
    from tests.test_export_gguf import DIFFUSERS_LOAD
    from tests.test_export_quark import QUARK_LOAD
    from tests.test_export_torchao import TORCHAO_LOAD

    work.mkdir(parents=True)
    samples = held_out_samples(result, calib)
    torch.save([to_plain(s) for s in samples], work / "samples.pt")
    dtype = result.manifest["model"]["torch_dtype"]
    out, loaded_path = work / ("m.gguf" if case.fmt == "gguf" else "export"), work / "loaded.safetensors"
    report = export_checkpoint(result.out, case.fmt, out, **({"names": "diffusers"} if case.fmt == "gguf" else {}), **dict(case.options))
    if case.fmt == "gguf":
        run_without_diffquant(DIFFUSERS_LOAD, str(out), "FluxTransformer2DModel", str(tiny_pipeline_dir("flux")), "transformer", dtype,
                              str(work / "samples.pt"), str(loaded_path))
    else:
        run_without_diffquant(TORCHAO_LOAD if case.fmt == "torchao" else QUARK_LOAD, str(out), "FluxTransformer2DModel", dtype,
                              str(work / "samples.pt"), str(loaded_path))
    loaded = load_file(loaded_path)
    reference = float_outputs(MODEL, samples)
    runtime = sqnr(reference, [loaded[f"output.{i}"] for i in range(len(samples))])
    ours = sqnr(reference, outputs(result.model, samples))
    source = StoredCheckpoint.read(result.out)
    compute = getattr(torch, dtype)
    linear = [r for r in source.layers if f"{r.name}.weight" in loaded]
    equal = sum(torch.equal(loaded[f"{r.name}.weight"].to(compute).reshape(-1), source.dequantized(r, compute).reshape(-1)) for r in linear)
    option = ", ".join(f"{k}={v}" for k, v in case.options) or "default"
    layout = ", ".join(f"{name} x{count}" for name, count in report.layers.items())
    return [case.fmt, case.recipe, option, layout, fmt(runtime), fmt(ours), fmt(runtime - ours, 3), f"{equal} / {len(linear)}"]


def render(quick: bool, rows: list[list[Any]]) -> str:
    headers = ["format", "recipe", "option", "layout written", "runtime SQNR (dB)", "diffquant SQNR (dB)", "runtime - diffquant (dB)",
               "layers with diffquant's weights"]
    return "\n".join([
        "## Exports in their runtimes (tiny-flux, bf16)",
        "",
        f"{command_line(SCRIPT, quick)} · {threads_note()}. Output SQNR of the held-out samples against the float model, through the "
        "runtime's own loader in a process without diffquant, and through diffquant's exact path; the weight column compares the "
        "runtime's dequantized weights in bf16 with diffquant's.",
        "",
        markdown_table(headers, rows),
        "",
    ])


if __name__ == "__main__":
    main()
