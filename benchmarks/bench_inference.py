"""Inference of quantized layers on each execution path: resident bytes and latency, side by side.

For every quantization format of configs/quant (recipes that differ only in their observers share
a format: their layers compute the same way) and each shape: the layer on the `exact`, `dequant`
and `native` paths (native where a kernel runs it on the device), in the bf16 compute dtype of
SDXL / Flux checkpoints, against a bf16 and a float32 nn.Linear, at 1 and 2 threads. Shapes
(tokens M x in K -> out N): SDXL's 4096 x 640 -> 640 and 4096 x 1280 -> 5120 (64 x 64 and its
feed-forward at 1024 px), Flux's 4096 x 3072 -> 3072 and 4096 x 3072 -> 12288; and two real
blocks with random weights, built from the configs bench_blockwise.py uses: an SDXL transformer
block of the 1280-channel level (1024 tokens, 77 text tokens) and a Flux double block (dim 3072;
`--block-tokens` image + 1/4 as many text tokens, default 256 + 64: the CPU cannot run 4096 in
the time budget). Static input scales come from one bf16 pass over the same inputs.

The float32 module is timed once per case (rounds of its own: it is the slowest variant), the bf16
one interleaved with each format's paths.

Figures: bytes = the quantized module's parameters and buffers / the bf16 module's (resident
weight bytes; the `exact` path also caches a float copy per layer, by design). Latency = the median
over `--rounds` interleaved rounds of one call each (after one warm-up call of every variant),
divided by the bf16 and by the float32 module's. `auto` = the path `set_execution(.., "auto")`
chose and its latency / the best of the paths it can choose from (native, dequant).

Run: `python benchmarks/bench_inference.py [--quick] [--device cuda] [--threads 1,2] [--cases ...]
[--tokens M]`; prints one markdown section. `--quick`: the first shape, three formats, 1 thread.
Cost: the full default (all formats, the four shapes at 4096 tokens, both blocks, 1 and 2 threads)
is about 30 min on 2 busy AVX512 cores, seconds on a GPU; `--cases` / `--tokens` cut it down.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from harness import markdown_table, parse_args, progress

from diffquant.quant.kernels.select import set_execution
from diffquant.quant.modules import QuantizedLayer, QuantizedLinear
from diffquant.quant.quantizer import swap_layers
from diffquant.recipes import available_recipes, load_recipe
from diffquant.quant.spec import TensorSpec, resolve_scale_dtype
from diffquant.quant.weights import input_params, quantize_weight

LAYER_SHAPES = {"sdxl640": (4096, 640, 640), "sdxl1280": (4096, 1280, 5120), "flux3072": (4096, 3072, 3072),
                "flux12288": (4096, 3072, 12288)}
BLOCKS = ("sdxl_block", "flux_block")
CASE_NAMES = (*LAYER_SHAPES, *BLOCKS)
QUICK_FORMATS = ("int8_w8a8", "w4a16", "nvfp4")
PATHS = ("exact", "dequant", "native")
COMPUTE_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Format:
    """The layer computation shared by one or more recipes."""

    recipes: tuple[str, ...]
    weight: TensorSpec
    input: TensorSpec | None
    rank: int | None

    @property
    def name(self) -> str:
        return self.recipes[0]


def formats() -> list[Format]:
    """One Format per distinct (weight spec, input spec, SVD rank) of the shipped recipes, observers ignored."""
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for name in available_recipes():
        recipe = load_recipe(name)
        spec = resolve_scale_dtype(recipe.global_spec, str(COMPUTE_DTYPE).removeprefix("torch."))  # `model` dtypes, as planning does
        weight, act = spec.weight, spec.input
        rank = recipe.svdquant.rank if recipe.svdquant else None
        key = (_without_observer(weight), _without_observer(act), rank)
        groups.setdefault(key, [weight, act, rank, []])[3].append(name)
    return [Format(tuple(sorted(names)), weight, act, rank) for weight, act, rank, names in groups.values()]


def _without_observer(spec: TensorSpec | None) -> Any:
    if spec is None:
        return None
    raw = spec.to_dict()
    raw.pop("observer", None)
    return tuple(sorted(raw.items()))


def input_ranges(module: torch.nn.Module, run: Callable[[torch.nn.Module], Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(min, max) of each Linear's input over one call of `run(module)`."""
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear):
            def hook(_: torch.nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
                x = args[0].float()
                lo, hi = x.min(), x.max()
                if name in ranges:
                    lo, hi = torch.minimum(lo, ranges[name][0]), torch.maximum(hi, ranges[name][1])
                ranges[name] = (lo, hi)
            handles.append(layer.register_forward_pre_hook(hook))
    with torch.inference_mode():
        run(module)
    for handle in handles:
        handle.remove()
    return ranges


def quantized_linear(linear: torch.nn.Linear, fmt: Format, lo: torch.Tensor, hi: torch.Tensor, seed: int) -> QuantizedLinear:
    """`linear` quantized as `fmt` (an SVDQuant branch of random factors: latency only)."""
    weight = quantize_weight(linear.weight.detach().float(), fmt.weight)
    params = input_params(fmt.input, lo, hi) if fmt.input is not None and not fmt.input.dynamic else None
    lowrank = None
    if fmt.rank:
        generator = torch.Generator().manual_seed(seed)
        out_features, in_features = linear.weight.shape
        lowrank = {"smooth_factor": torch.ones(in_features),
                   "lora_down": (torch.randn(fmt.rank, in_features, generator=generator) * in_features**-0.5).to(COMPUTE_DTYPE),
                   "lora_up": (torch.randn(out_features, fmt.rank, generator=generator) * fmt.rank**-0.5).to(COMPUTE_DTYPE)}
    bias = linear.bias.detach().to(COMPUTE_DTYPE) if linear.bias is not None else None
    layer = QuantizedLinear(weight, bias, COMPUTE_DTYPE, fmt.input, params, lowrank)
    return layer.to(linear.weight.device)


def quantize_module(module: torch.nn.Module, fmt: Format, ranges: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.nn.Module:
    """A copy of `module` (a Linear or a block) with every Linear quantized as `fmt`."""
    if isinstance(module, torch.nn.Linear):
        lo, hi = ranges[""]
        return torch.nn.Sequential(quantized_linear(module, fmt, lo, hi, 0))
    quantized = copy.deepcopy(module)
    layers = {name: quantized_linear(layer, fmt, *ranges[name], index)
              for index, (name, layer) in enumerate(module.named_modules()) if isinstance(layer, torch.nn.Linear) and name in ranges}
    swap_layers(quantized, layers)
    return quantized


def tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for _, t in [*module.named_parameters(), *module.named_buffers()])


def quantized_weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's tensors without the `exact` path's cached float weights."""
    cached = sum(layer.dequantized_weight.numel() * layer.dequantized_weight.element_size()
                 for layer in module.modules() if isinstance(layer, QuantizedLayer) and hasattr(layer, "dequantized_weight"))
    return tensor_bytes(module) - cached


# Cases: a module, how to call it, and a label.
@dataclass
class Case:
    label: str
    module: torch.nn.Module  # bf16 reference
    run: Callable[[torch.nn.Module], Any]
    fp32_run: Callable[[torch.nn.Module], Any]


def layer_case(tokens: int, k: int, n: int, device: str) -> Case:
    generator = torch.Generator().manual_seed(k * n)
    linear = torch.nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=generator) * k**-0.5)
    x = torch.randn(tokens, k, generator=generator).to(device)
    x16 = x.to(COMPUTE_DTYPE)
    return Case(f"{tokens} x {k} -> {n}", linear.to(device, COMPUTE_DTYPE), lambda m: m(x16), lambda m: m(x))


def _materialize(block: torch.nn.Module, device: str, seed: int) -> torch.nn.Module:
    block = block.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*block.named_parameters(), *block.named_buffers()]:
            if tensor.dim() >= 2:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * tensor.shape[-1] ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                tensor.fill_(1.0)
            else:
                tensor.zero_()
    return block.to(device, COMPUTE_DTYPE).eval()


def block_cases(device: str, block_tokens: int) -> list[Case]:
    from bench_blockwise import real_architectures

    models = real_architectures()
    sdxl = _materialize(models["SDXL UNet"].down_blocks[2].attentions[0].transformer_blocks[0], device, 1)
    flux_model = models["Flux-dev transformer"]
    flux = _materialize(flux_model.transformer_blocks[0], device, 2)
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(1, 1024, 1280, generator=generator).to(device)
    context = torch.randn(1, 77, 2048, generator=generator).to(device)
    text = max(block_tokens // 4, 1)
    image, txt = torch.randn(1, block_tokens, 3072, generator=generator).to(device), torch.randn(1, text, 3072, generator=generator).to(device)
    temb = torch.randn(1, 3072, generator=generator).to(device)
    side = int(block_tokens**0.5)
    ids = torch.cat([torch.zeros(text, 3), torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side).float(), torch.arange(block_tokens // side).float(), indexing="ij"), -1).reshape(-1, 3).float()])
    rotary = tuple(t.to(device) for t in flux_model.pos_embed.to_empty(device="cpu")(ids))

    def sdxl_run(dtype: torch.dtype) -> Callable[[torch.nn.Module], Any]:
        return lambda m: m(hidden.to(dtype), encoder_hidden_states=context.to(dtype))

    def flux_run(dtype: torch.dtype) -> Callable[[torch.nn.Module], Any]:
        return lambda m: m(image.to(dtype), txt.to(dtype), temb.to(dtype), rotary)

    return [Case("SDXL transformer block (1280 ch, 1024 + 77 tokens)", sdxl, sdxl_run(COMPUTE_DTYPE), sdxl_run(torch.float32)),
            Case(f"Flux double block (3072, {block_tokens} + {text} tokens)", flux, flux_run(COMPUTE_DTYPE), flux_run(torch.float32))]


def timed(run: Callable[[torch.nn.Module], Any], module: torch.nn.Module, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        run(module)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(case: Case, fmts: list[Format], threads: list[int], rounds: int, device: str) -> list[list[Any]]:
    """Rows of the table for one case: every format x path x thread count."""
    ranges = input_ranges(case.module, case.run) if not isinstance(case.module, torch.nn.Linear) else None
    if ranges is None:
        ranges = input_ranges(torch.nn.Sequential(case.module), case.run)
        ranges = {"": ranges["0"]}
    fp32 = copy.deepcopy(case.module).float()
    bf16_bytes = tensor_bytes(case.module)
    fp32_latency = {}
    for count in threads:  # float32 once per case (the slowest variant); bf16 interleaved with every format
        torch.set_num_threads(count)
        timed(case.fp32_run, fp32, device)
        fp32_latency[count] = statistics.median(timed(case.fp32_run, fp32, device) for _ in range(rounds))
    del fp32
    rows = []
    for fmt in fmts:
        progress(f"  {case.label}: {fmt.name}")
        variants: dict[str, tuple[torch.nn.Module, Callable[[torch.nn.Module], Any]]] = {"bf16": (case.module, case.run)}
        base = quantize_module(case.module, fmt, ranges)
        auto_kernels = [layer.kernel for layer in set_execution(base, "auto").layers]
        auto_name = ""
        for path in PATHS:
            module = copy.deepcopy(base)
            report = set_execution(module, path)
            if path == "native" and not any(layer.path == "native" for layer in report.layers):
                continue
            variants[path] = (module, case.run)
            if [layer.kernel for layer in report.layers] == auto_kernels and path != "exact":
                auto_name = path
        if not auto_name:  # auto mixes paths or kernels (e.g. the by-tokens kernels): timed on its own
            auto_name = "mixed"
            variants["auto"] = (base, case.run)
        auto_report = None
        del auto_report
        for count in threads:
            torch.set_num_threads(count)
            seconds: dict[str, list[float]] = {name: [] for name in variants}
            for name, (module, run) in variants.items():
                timed(run, module, device)  # warm-up
            for _ in range(rounds):
                for name, (module, run) in variants.items():
                    seconds[name].append(timed(run, module, device))
            latency = {name: statistics.median(values) for name, values in seconds.items()}
            latency["fp32"] = fp32_latency[count]
            choosable = {path: latency[path] for path in ("native", "dequant") if path in latency}  # what auto may pick
            best = min(choosable.values())
            auto_latency = latency["auto"] if "auto" in latency else latency[auto_name]
            for path in PATHS:
                if path not in latency:
                    continue
                module = variants[path][0]
                rows.append([case.label, ", ".join(fmt.recipes), count, path, f"{quantized_weight_bytes(module) / bf16_bytes:.3f}",
                             f"{latency[path] * 1e3:.1f}", f"{latency[path] / latency['bf16']:.2f}", f"{latency[path] / latency['fp32']:.2f}",
                             "auto" if path == auto_name else "", f"{auto_latency / best:.2f}" if path == auto_name else ""])
            if auto_name == "mixed":
                rows.append([case.label, ", ".join(fmt.recipes), count, f"auto ({auto_kernels[0]})", "", f"{auto_latency * 1e3:.1f}",
                             f"{auto_latency / latency['bf16']:.2f}", f"{auto_latency / latency['fp32']:.2f}", "auto", f"{auto_latency / best:.2f}"])
            rows.append([case.label, "(nn.Linear baselines)", count, "bf16 / fp32", "1.000", f"{latency['bf16'] * 1e3:.1f} / {latency['fp32'] * 1e3:.1f}",
                         "1.00", f"{latency['bf16'] / latency['fp32']:.2f}", "", ""]) if fmt is fmts[-1] else None
        del variants, base
    return rows


def main() -> None:
    def extra(parser: Any) -> None:
        parser.add_argument("--device", default="cpu", help="cpu or cuda")
        parser.add_argument("--threads", default=None, help="comma-separated torch thread counts (default 1,2; --quick 1)")
        parser.add_argument("--rounds", type=int, default=None, help="interleaved timed rounds (default 2; --quick 2)")
        parser.add_argument("--block-tokens", type=int, default=256, help="Flux block image tokens (a square number)")
        parser.add_argument("--cases", default=",".join(CASE_NAMES), help=f"comma-separated subset of {', '.join(CASE_NAMES)}")
        parser.add_argument("--formats", default=None, help="comma-separated recipe names (a format is run when one of its recipes is named)")
        parser.add_argument("--tokens", type=int, default=None, help="tokens M of the layer shapes (default 4096)")

    args = parse_args(__doc__, extra)
    torch.set_grad_enabled(False)
    threads = [int(t) for t in (args.threads or ("1" if args.quick else "1,2")).split(",")]
    rounds = args.rounds or 2
    fmts = formats()
    names = set(QUICK_FORMATS) if args.quick else set(args.formats.split(",")) if args.formats else None
    if names is not None:
        fmts = [fmt for fmt in fmts if names & set(fmt.recipes)]
    wanted = ["sdxl640"] if args.quick else args.cases.split(",")
    unknown = sorted(set(wanted) - set(CASE_NAMES))
    if unknown:
        raise SystemExit(f"--cases: unknown {', '.join(unknown)}; choose from {', '.join(CASE_NAMES)}")
    started = time.perf_counter()
    cases = []
    for name in wanted:
        if name in LAYER_SHAPES:
            tokens, k, n = LAYER_SHAPES[name]
            cases.append(layer_case(args.tokens or tokens, k, n, args.device))
    if any(name in BLOCKS for name in wanted):
        blocks = dict(zip(BLOCKS, block_cases(args.device, args.block_tokens)))
        cases += [blocks[name] for name in wanted if name in BLOCKS]
    rows = []
    for case in cases:
        progress(f"{case.label}")
        rows += measure(case, fmts, threads, rounds, args.device)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print("## Inference: execution paths of quantized layers\n")
    print(f"command: `python {' '.join(sys.argv)}`; device {describe_device(args.device)}; torch {torch.__version__}; "
          f"compute dtype bfloat16; median of {rounds} interleaved rounds of one call; load average before "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}; {time.perf_counter() - started:.0f} s.\n")
    print("bytes: resident weight bytes (parameters + buffers) / the bf16 module's; `exact` also caches a float copy per layer, "
          "not counted. latency: ms per call; / bf16 and / fp32: against nn.Linear (or the block) in bf16 and float32. "
          "auto: the path `auto` chose; auto/best: its latency over the faster of native and dequant.\n")
    print(markdown_table(["case", "recipes", "threads", "path", "bytes / bf16", "latency ms", "/ bf16", "/ fp32", "auto", "auto / best"], rows))


def describe_device(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from diffquant.quant.kernels.gemm import cpu_has_int8_dot

    return (f"{model} ({platform.machine()}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"int8 dot product {'yes' if cpu_has_int8_dot() else 'no'})")


if __name__ == "__main__":
    main()
