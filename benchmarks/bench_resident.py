"""Resident memory of a loaded checkpoint by process RSS, on real SDXL and Flux blocks.

For an SDXL transformer block (the 1280-channel level) and a Flux double block, built from the
real configs (bench_blockwise.real_architectures) with random bf16 weights, and for each weight
format: the block's Linear layers are quantized (bench_inference.quantize_module) and written as a
checkpoint (safetensors + layer records). A fresh process then builds the block on the meta
device, reads its RSS, loads the checkpoint through the loader's install path
(`diffquant.models.quantized.install`, the rebuild path every load takes) with the `auto`
execution paths, returns freed heap to the OS (malloc_trim) and reads its RSS again. The figure is
(RSS after - RSS before) / the checkpoint's tensor bytes, target <= 1.05; the bf16 block loaded the
same way is the method's own baseline (its ratio should be about 1.00).

Run: `python benchmarks/bench_resident.py [--quick]` (part of `make bench`; about a minute).
"""

from __future__ import annotations

import ctypes
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import command_line, markdown_table, parse_args, progress  # noqa: E402

FORMATS = ("int8_w8a8", "int8_weight_only", "fp8", "w4a16", "svdquant_w4a16", "nvfp4", "mxfp4")
QUICK_FORMATS = ("int8_weight_only", "w4a16")
BLOCKS = {"SDXL transformer block (1280 ch)": ("SDXL UNet", "down_blocks.2.attentions.0.transformer_blocks.0"),
          "Flux double block (3072)": ("Flux-dev transformer", "transformer_blocks.0")}


def meta_block(model: str, path: str) -> torch.nn.Module:
    from bench_blockwise import real_architectures

    return real_architectures()[model].get_submodule(path)


def layer_records(module: torch.nn.Module) -> list[dict[str, Any]]:
    """The checkpoint records of `module`'s quantized layers, as stage two writes them."""
    from diffquant.artifacts.checkpoint_records import LayerRecord, SvdRecord
    from diffquant.quant.modules import QuantizedLayer

    records = []
    for name, layer in module.named_modules():
        if not isinstance(layer, QuantizedLayer):
            continue
        svd = None
        if layer.has_lowrank:
            svd = SvdRecord(rank=layer.lora_down.shape[0], alpha=0.5, method="random",
                            tensors={t: f"{name}.{t}" for t in ("smooth_factor", "lora_down", "lora_up")}, smoothing="")
        records.append(LayerRecord(
            name=name, type="Linear", shape=tuple(layer.weight_shape), dtype=str(layer.compute_dtype).removeprefix("torch."),
            weight=layer.weight_spec.to_dict(), tensors={s: f"{name}.{s}" for s in layer.stored_names},
            input=layer.input_spec.to_dict() if layer.input_spec else None,
            input_tensors={s: f"{name}.{s}" for s in layer.input_param_names},
            bias=f"{name}.bias" if layer.bias is not None else None, svd=svd).to_json())
    return records


def write_checkpoint(module: torch.nn.Module, out: Path) -> int:
    """model.safetensors + records.json of `module`; returns the tensor bytes."""
    out.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "records.json").write_text(json.dumps(layer_records(module)))
    return sum(t.numel() * t.element_size() for t in state.values())


CHILD = """
import ctypes, gc, json, sys
sys.path.insert(0, sys.argv[1])
import torch
from safetensors.torch import load_file
from bench_resident import meta_block, rss_bytes, trim
from diffquant.models.quantized import install
from diffquant.quant.kernels.select import set_execution
block = meta_block(sys.argv[3], sys.argv[4]).to(torch.bfloat16)
records = json.loads(open(sys.argv[2] + "/records.json").read())
gc.collect(); trim(); before = rss_bytes()
tensors = load_file(sys.argv[2] + "/model.safetensors")
if records:
    install(block, {"layers": records}, tensors, place_like_original=False)  # copies the tensors
    set_execution(block, "auto")
else:
    block.load_state_dict({k: v.clone() for k, v in tensors.items()}, assign=True)
del tensors
for tensor in block.state_dict().values():  # every page read, so a lazily mapped one is counted too
    tensor.reshape(-1).contiguous().view(torch.uint8).sum()
gc.collect(); trim(); after = rss_bytes()
print(after - before)
"""


def rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS:"))


def trim() -> None:
    """Give freed heap back to the OS, so RSS counts what is live (glibc only; else a no-op)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def resident_delta(checkpoint: Path, model: str, path: str) -> int:
    done = subprocess.run([sys.executable, "-c", CHILD, str(Path(__file__).resolve().parent), str(checkpoint), model, path],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return int(done.stdout.split()[-1])


def main() -> None:
    args = parse_args(__doc__)
    torch.set_grad_enabled(False)
    from bench_inference import _materialize, formats, input_ranges, quantize_module

    wanted = set(QUICK_FORMATS if args.quick else FORMATS)
    fmts = [fmt for fmt in formats() if wanted & set(fmt.recipes)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-resident-") as tmp:
        for label, (model, path) in BLOCKS.items():
            progress(label)
            block = _materialize(meta_block(model, path), "cpu", 1)
            linears = {name: m for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
            # Static input ranges: each Linear's own weight range stands in (bytes do not depend on it).
            ranges = {name: (m.weight.float().amin().reshape(()), m.weight.float().amax().reshape(())) for name, m in linears.items()}
            bf16_bytes = write_checkpoint(block, Path(tmp) / f"{model}-bf16")
            delta = resident_delta(Path(tmp) / f"{model}-bf16", model, path)
            rows.append([label, "bf16 (no quantization)", f"{bf16_bytes / 2**20:.1f}", f"{delta / 2**20:.1f}", f"{delta / bf16_bytes:.3f}"])
            for fmt in fmts:
                quantized = quantize_module(block, fmt, ranges)
                out = Path(tmp) / f"{model}-{fmt.name}"
                checkpoint_bytes = write_checkpoint(quantized, out)
                del quantized
                delta = resident_delta(out, model, path)
                rows.append([label, ", ".join(fmt.recipes), f"{checkpoint_bytes / 2**20:.1f}", f"{delta / 2**20:.1f}",
                             f"{delta / checkpoint_bytes:.3f}"])
            del block
            gc.collect()
    print("## Resident memory of a loaded checkpoint (process RSS)\n")
    print(command_line("bench_resident.py", args.quick))
    print("\nRSS growth of a fresh process loading the checkpoint into the block built on the meta device (auto paths), "
          "after malloc_trim; target <= 1.05 x the checkpoint's tensor bytes.\n")
    print(markdown_table(["block", "recipes", "checkpoint tensors MiB", "RSS growth MiB", "RSS / checkpoint"], rows))


if __name__ == "__main__":
    main()
