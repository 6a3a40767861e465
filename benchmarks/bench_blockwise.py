"""Stage two block by block (`quantize --blockwise`) against the whole submodule on the device.

For each tiny family and recipe: `quantize()` with the submodule whole and block by block, side
by side in one run (statistics cache off, so both make the calibration pass), the wall-time ratio,
and the peak bytes of weights on the device against the whole model (the figure block-by-block
mode exists for). Also checks that both checkpoints hold the same tensors. On this CPU-only
machine the device is the CPU, so a block's move is free: the time ratio is the bookkeeping cost
only, and on a GPU each block also crosses PCIe once per sample and pass.

The tiny models have few, relatively large blocks; a second table gives the same figure for the
real SDXL UNet and Flux-dev transformer, built from their configs on the meta device (no weights):
the largest unit's share of the model, for top-level blocks and for the default share limit.

Run: `python benchmarks/bench_blockwise.py [--quick]`; prints one markdown section.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from harness import command_line, markdown_table, parse_args, progress
from safetensors.torch import load_file

from diffquant.models.blockwise import onload_units, split_modules
from diffquant.stages.calibrate import CalibrationSettings, calibrate
from diffquant.stages.quantize import DEFAULT_MAX_BLOCK_SHARE, QuantizeSettings, quantize

ROUNDS = 3
CASES = [("tiny-sdxl", "int8_w8a8"), ("tiny-flux", "svdquant_w4a4"), ("tiny-sd3", "fp8"), ("tiny-pixart", "nvfp4")]


def main() -> None:
    args = parse_args(__doc__)
    torch.set_num_threads(1)
    prompts, steps = (2, 2) if args.quick else (4, 4)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, recipe in CASES:
            calib = Path(tmp) / f"calib-{model}"
            progress(f"calibrating {model} ({prompts} prompts x {steps} steps)")
            calibrate(CalibrationSettings(model=model, out=calib, num_prompts=prompts, steps=steps, device="cpu"), show_progress=False)
            times: dict[bool, list[float]] = {False: [], True: []}
            results = {}
            # A warm-up run each (first-call costs), then interleaved timed rounds; medians.
            for round_index in range(ROUNDS + 1):
                for blockwise in (False, True):
                    out = Path(tmp) / f"{model}-{recipe}-{'blockwise' if blockwise else 'whole'}-{round_index}"
                    start = time.perf_counter()
                    results[blockwise] = quantize(QuantizeSettings(calib=calib, recipe=recipe, out=out, device="cpu", holdout=2,
                                                                   blockwise=blockwise, use_stats_cache=False), show_progress=False)
                    if round_index:
                        times[blockwise].append(time.perf_counter() - start)
            seconds = {mode: statistics.median(rounds) for mode, rounds in times.items()}
            want = load_file(str(results[False].out / "model.safetensors"))
            got = load_file(str(results[True].out / "model.safetensors"))
            identical = want.keys() == got.keys() and all(torch.equal(t, got[k]) for k, t in want.items())
            placement = results[True].manifest["placement"]
            rows.append([
                model, recipe, f"{seconds[False]:.2f}", f"{seconds[True]:.2f}", f"{seconds[True] / seconds[False]:.2f}",
                placement["total_bytes"], placement["peak_resident_bytes"],
                f"{placement['peak_resident_bytes'] / placement['total_bytes']:.3f}",
                f"{placement['largest_unit_bytes'] / placement['total_bytes']:.3f}", placement["transfers"],
                "yes" if identical else "NO",
            ])
            progress(f"  {model} {recipe}: whole {seconds[False]:.2f}s, blockwise {seconds[True]:.2f}s")
    print("## Stage two block by block\n")
    print(f"{prompts} prompts x {steps} steps per model, 2 held out; statistics cache off; median of {ROUNDS} interleaved rounds "
          "after a warm-up run of each mode; device = CPU (block moves are "
          "no-ops here, so the time ratio is bookkeeping only); 1 torch thread. Peak = the most weight bytes on the device "
          "at once: the root's own tensors, one block, and one quantized layer while it is measured.\n")
    print(markdown_table(
        ["model", "recipe", "whole s", "blockwise s", "time ratio", "model bytes", "peak bytes on device", "peak / model",
         "largest block / model", "block moves", "same checkpoint"], rows))
    print()
    print("Real architectures (built on the meta device, no weights loaded): the most weight bytes on the device at once, "
          "as a share of the model, block by block.\n")
    print(markdown_table(["model", "parameters", "units (top level)", "largest / model (top level)",
                          f"units (share {DEFAULT_MAX_BLOCK_SHARE})", f"largest + pinned / model (share {DEFAULT_MAX_BLOCK_SHARE})"],
                         real_architecture_rows()))
    print()
    print(command_line("bench_blockwise.py", args.quick))


def real_architectures() -> dict[str, torch.nn.Module]:
    """The real SDXL UNet and Flux-dev transformer, built from their configs on the meta device
    (no weights); bench_inference.py takes its blocks from here too."""
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights():
        return {
            # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
            "SDXL UNet": diffusers.UNet2DConditionModel(
                sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(320, 640, 1280),
                layers_per_block=2, transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            ),
            # black-forest-labs/FLUX.1-dev: the class defaults plus guidance embeddings
            "Flux-dev transformer": diffusers.FluxTransformer2DModel(guidance_embeds=True),
        }


def real_architecture_rows() -> list[list[object]]:
    models = real_architectures()
    rows = []
    for name, model in models.items():
        total = _bytes(model)
        budget = int(total * DEFAULT_MAX_BLOCK_SHARE)
        top, fine = onload_units(model), onload_units(model, budget)
        pinned = sum(_bytes(module, recurse=False) for _, module in split_modules(model, budget))
        rows.append([name, f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B", len(top),
                     f"{max(_bytes(u) for _, u in top) / total:.3f}", len(fine),
                     f"{(max(_bytes(u) for _, u in fine) + pinned) / total:.3f}"])
    return rows


def _bytes(module: torch.nn.Module, recurse: bool = True) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)])


if __name__ == "__main__":
    main()
