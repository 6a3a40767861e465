"""Benchmark: native int8 Linear (torch._int_mm) against float32 and bfloat16 nn.Linear on the CPU.

Shapes: every distinct (input shape, out features) of the tiny-sdxl unet's Linear layers in one
denoising call of a 64 px generation with classifier-free guidance (batch 2, 8 x 8 latent), found
by running the unet with forward hooks; and realistic SDXL shapes (4096 tokens of 640 features: the 64 x 64 level of a
1024 px image; 1280 features as in its deepest blocks). The native int8 time includes quantizing
the activations and scaling the int32 result back to float32; "fake-quant" is the QuantizedLinear
it replaces. Each number is the fastest block of torch.utils.benchmark.Timer.blocked_autorange
(a block's mean) over ROUNDS rounds that alternate the four variants, in microseconds per call,
under torch.no_grad: on a shared machine the fastest block is the one least disturbed by other
processes, so the header prints the load average too.

Usage:
    python benchmarks/bench_native.py            # 1 thread and the default thread count, ~40 s
    python benchmarks/bench_native.py --quick    # 1 thread, tiny shapes and one SDXL shape, ~15 s

Prints a markdown section to stdout.
"""

from __future__ import annotations

import argparse
import os
import platform
from collections import Counter
from dataclasses import dataclass

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch.utils.benchmark import Timer  # noqa: E402

from diffquant.models.presets import resolve_model  # noqa: E402
from diffquant.models.submodule import load_submodule  # noqa: E402
from diffquant.quant.codecs import input_params, quantize_weight  # noqa: E402
from diffquant.quant.modules import QuantizedLinear  # noqa: E402
from diffquant.quant.native import NativeInt8Linear, int8_matmul, quantize_int8, scale_accumulator_  # noqa: E402
from diffquant.quant.spec import TensorSpec  # noqa: E402

# (input shape [..., K], N out features)
SDXL_SHAPES: list[tuple[tuple[int, ...], int]] = [((4096, 640), 640), ((4096, 1280), 1280)]
VAE_SCALE = 8  # SDXL's VAE downsamples 8x: a 64 px image is an 8 x 8 latent
CFG_BATCH = 2  # classifier-free guidance runs the unconditional and the conditional batch together
ROUNDS = 2  # alternate the variants, so that a burst of load elsewhere does not hit only one


Shape = tuple[tuple[int, ...], int]


@dataclass
class Row:
    shape: Shape
    count: int
    fp32: float
    bf16: float
    fake: float
    int8: float


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 thread, tiny shapes and one SDXL shape, shorter timing")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    default_threads = torch.get_num_threads()
    thread_counts = [1] if args.quick or default_threads == 1 else [1, default_threads]
    min_run_time = 0.05 if args.quick else 0.1
    tiny = tiny_sdxl_linear_shapes()
    sdxl = SDXL_SHAPES[:1] if args.quick else SDXL_SHAPES

    print("## Native int8 Linear on the CPU\n")
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, {platform.machine()}, "
          f"{os.cpu_count()} logical CPUs, load average {load}; weight and input int8 symmetric per-tensor, static scales.")
    print("Times in µs per call (fastest timing block); speed ratios are fp32 or bf16 time / native int8 time "
          "(> 1: int8 is faster).\n")
    for threads in thread_counts:
        rows = [time_shape(shape, count, threads, min_run_time) for shape, count in [*tiny.items(), *[(s, 0) for s in sdxl]]]
        print_table(rows, threads)
    if not args.quick:
        print_breakdown([next(iter(tiny)), SDXL_SHAPES[0]], min_run_time)


def tiny_sdxl_linear_shapes() -> Counter[Shape]:
    """(input shape, N) -> number of Linear calls, for one tiny-sdxl unet call of a 64 px CFG batch."""
    unet = load_submodule(resolve_model("tiny-sdxl"))
    config = unet.config
    side = 64 // VAE_SCALE
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    shapes: Counter[Shape] = Counter()

    def record(module: torch.nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        shapes[(tuple(inputs[0].shape), module.out_features)] += 1

    handles = [m.register_forward_hook(record) for m in unet.modules() if isinstance(m, torch.nn.Linear)]
    unet(
        torch.randn(CFG_BATCH, config.in_channels, side, side),
        torch.tensor(500),
        encoder_hidden_states=torch.randn(CFG_BATCH, 77, config.cross_attention_dim),
        added_cond_kwargs={"text_embeds": torch.randn(CFG_BATCH, pooled), "time_ids": torch.randn(CFG_BATCH, 6)},
    )
    for handle in handles:
        handle.remove()
    return Counter(dict(sorted(shapes.items(), key=lambda item: -item[1])))


def int8_layers(shape: Shape) -> tuple[QuantizedLinear, NativeInt8Linear, torch.Tensor]:
    """(fake-quant layer, its native twin, float32 input of the shape's input shape), random."""
    input_shape, out_features = shape
    in_features = input_shape[-1]
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=generator) * in_features**-0.5
    x = torch.randn(input_shape, generator=generator)
    spec = TensorSpec("int8")
    stored = quantize_weight(weight, spec, weight.min().reshape(1), weight.max().reshape(1))
    fake = QuantizedLinear(torch.Size(weight.shape), spec, stored, torch.randn(out_features, generator=generator),
                           torch.float32, spec, input_params(spec, x.min(), x.max()))
    return fake, NativeInt8Linear.from_quantized(fake), x


def time_shape(shape: Shape, count: int, threads: int, min_run_time: float) -> Row:
    fake, native, x = int8_layers(shape)
    fp32 = torch.nn.Linear(x.shape[-1], shape[1])
    bf16 = torch.nn.Linear(x.shape[-1], shape[1]).to(torch.bfloat16)
    x16 = x.to(torch.bfloat16)

    variants = {"fp32": (fp32, x), "bf16": (bf16, x16), "fake": (fake, x), "int8": (native, x)}
    best = {name: float("inf") for name in variants}
    for _ in range(ROUNDS):
        for name, (module, inputs) in variants.items():
            timer = Timer("module(inputs)", globals={"module": module, "inputs": inputs}, num_threads=threads)
            best[name] = min(best[name], fastest_block_us(timer, min_run_time))
    return Row(shape, count, **best)


def label(shape: Shape) -> str:
    return f"{' x '.join(map(str, shape[0]))} -> {shape[1]}"


def fastest_block_us(timer: Timer, min_run_time: float) -> float:
    return min(timer.blocked_autorange(min_run_time=min_run_time).times) * 1e6


def print_table(rows: list[Row], threads: int) -> None:
    print(f"### {threads} thread{'s' if threads > 1 else ''}\n")
    print("| input [..., K] -> N | calls per tiny unet call | fp32 | bf16 | int8 fake-quant | int8 native | speed int8/fp32 | speed int8/bf16 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        calls = str(r.count) if r.count else "SDXL"
        print(f"| {label(r.shape)} | {calls} | {r.fp32:.1f} | {r.bf16:.1f} | {r.fake:.1f} | {r.int8:.1f} | "
              f"{r.fp32 / r.int8:.2f}x | {r.bf16 / r.int8:.2f}x |")
    tiny = [r for r in rows if r.count]
    totals = {name: sum(getattr(r, name) * r.count for r in tiny) for name in ("fp32", "bf16", "fake", "int8")}
    print(f"| all Linear calls of one tiny unet call | {sum(r.count for r in tiny)} | {totals['fp32']:.0f} | "
          f"{totals['bf16']:.0f} | {totals['fake']:.0f} | {totals['int8']:.0f} | {totals['fp32'] / totals['int8']:.2f}x | "
          f"{totals['bf16'] / totals['int8']:.2f}x |\n")


def print_breakdown(shapes: list[Shape], min_run_time: float) -> None:
    """Where the native int8 time goes, 1 thread."""
    print("### Native int8 breakdown, 1 thread (µs)\n")
    print("| input [..., K] -> N | quantize input | torch._int_mm | scale + bias | whole layer, input as [M, K] |")
    print("|---|---:|---:|---:|---:|")
    for shape in shapes:
        _, native, x = int8_layers(shape)
        x = x.reshape(-1, x.shape[-1])
        codes = quantize_int8(x, native.input_scale)
        acc = int8_matmul(codes, native.weight.t())
        stmts = {
            "quantize": "quantize_int8(x, native.input_scale)",
            "gemm": "int8_matmul(codes, native.weight.t())",
            "scale": "scale_accumulator_(acc.clone(), native.output_scale, native.kernel_bias)",
            "clone": "acc.clone()",
            "layer": "native(x)",
        }
        env = {"quantize_int8": quantize_int8, "int8_matmul": int8_matmul, "scale_accumulator_": scale_accumulator_,
               "native": native, "x": x, "codes": codes, "acc": acc}
        t = {name: fastest_block_us(Timer(stmt, globals=env, num_threads=1), min_run_time)
             for name, stmt in stmts.items()}
        print(f"| {label(shape)} | {t['quantize']:.1f} | {t['gemm']:.1f} | {max(t['scale'] - t['clone'], 0.0):.1f} | {t['layer']:.1f} |")
    print()


if __name__ == "__main__":
    main()
