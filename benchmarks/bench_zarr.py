"""zarr vs safetensors shards: write and read throughput and bytes on disk, with and without compression,
in a local directory and in an fsspec store (`memory://`, which isolates the store layer's own cost
from any network).

Calibrates tiny-sdxl and tiny-flux once (safetensors), then rewrites the same samples with
`convert_artifact` into each shard format (so every variant stores exactly the same samples and
pays the same hashing and manifest work) and reads them all back through `CalibrationArtifact`
touching every byte. Throughput is computed on the deduplicated tensor bytes. Page cache warm.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from harness import command_line, markdown_table, parse_args, progress, touch

from diffquant.artifacts.calibration_reader import CalibrationArtifact
from diffquant.artifacts.shard_formats import ShardFormat
from diffquant.stages.calibrate import CalibrationSettings, calibrate
from diffquant.stages.convert import convert_artifact

VARIANTS = [
    (ShardFormat("safetensors"), "local"), (ShardFormat("zarr", "none"), "local"), (ShardFormat("zarr", "zstd"), "local"),
    (ShardFormat("zarr", "blosc"), "local"), (ShardFormat("safetensors"), "memory://"), (ShardFormat("zarr", "none"), "memory://"),
]


def main() -> None:
    args = parse_args(__doc__)
    prompts, steps = (2, 3) if args.quick else (8, 10)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in ("tiny-sdxl", "tiny-flux"):
            source = Path(tmp) / f"{model}-source"
            progress(f"calibrating {model} ({prompts} prompts x {steps} steps, 128 px)")
            calibrate(CalibrationSettings(model=model, out=source, num_prompts=prompts, steps=steps, device="cpu",
                                          pipeline_kwargs={"height": 128, "width": 128}), show_progress=False)
            for variant, where in VARIANTS:
                label = variant.name + ("" if variant.name == "safetensors" else f"/{variant.compression}")
                name = f"{model}-{variant.name}-{variant.compression}"
                out = Path(tmp) / name if where == "local" else f"memory://diffquant-bench/{name}"
                start = time.perf_counter()
                manifest = convert_artifact(source, out, variant, show_progress=False)
                write_s = time.perf_counter() - start
                tensor_bytes = sum(s["tensor_bytes"] for s in manifest["shards"])
                artifact = CalibrationArtifact(out)
                for index in range(len(artifact)):  # warm the page cache
                    touch(artifact.sample(index))
                artifact = CalibrationArtifact(out)
                start = time.perf_counter()
                for index in range(len(artifact)):
                    sample = artifact.sample(index)
                    touch(sample)
                read_s = time.perf_counter() - start
                raw = manifest["raw_bytes"]
                rows.append([model, label, where, manifest["stored_bytes"], f"{manifest['stored_bytes'] / tensor_bytes:.3f}",
                             f"{tensor_bytes / write_s / 2**20:.0f}", f"{len(artifact) / read_s:.0f}",
                             f"{raw / read_s / 2**20:.0f}"])
                progress(f"  {model} {label} {where}: write {write_s:.2f}s read {read_s:.2f}s")
    print("## Shard formats: zarr vs safetensors\n")
    print(f"{prompts} prompts x {steps} steps at 128 px per model; the same samples in every format (written by "
          "`convert_artifact`, so each row includes hashing and manifest commits); read = every sample rebuilt and "
          "every element summed; 1 torch thread.\n")
    print(markdown_table(
        ["model", "format", "location", "bytes stored", "disk / tensor bytes", "write MB/s (tensor bytes)", "read samples/s",
         "read MB/s (raw sample bytes)"], rows))
    print()
    print(command_line("bench_zarr.py", args.quick))


if __name__ == "__main__":
    main()
