"""Shared pieces of the benchmark scripts: arguments, markdown output, timing, synthetic artifacts.

Every `bench_*.py` prints one markdown section on stdout (collected by `run_all.py`) and its
progress on stderr. Figures are ratios or rates measured side by side in one process; nothing
here asserts on a timing.

Example:
    >>> args = parse_args(__doc__)
    >>> print(markdown_table(["what", "seconds"], [["plain", 1.25]]))
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import queue
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import yaml

import diffquant.artifacts.calibration_writer as writer_module
from diffquant.artifacts.calibration_records import CalibrationManifest
from diffquant.artifacts.calibration_writer import CalibrationWriter, CapturedSample

BENCH_THREADS = 1


def parse_args(description: str | None, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """`--quick` (fewer repeats and smaller inputs, for checking that a script runs), plus what
    `extra` adds; also sets the torch thread count of every benchmark."""
    parser = argparse.ArgumentParser(description=(description or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller inputs (figures are rougher)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    torch.set_num_threads(BENCH_THREADS)
    return args


def command_line(script: str, quick: bool) -> str:
    return f"command: `python benchmarks/{script}{' --quick' if quick else ''}`"


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def nbytes(value: Any) -> int:
    """Bytes of every tensor in a nested sample."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(nbytes(item) for item in value.values())
    if isinstance(value, (tuple, list)):
        return sum(nbytes(item) for item in value)
    return 0


def touch(value: Any) -> float:
    """Read every element of every tensor in a nested sample (so lazy mappings are paid for)."""
    if isinstance(value, torch.Tensor):
        return float(value.sum()) if value.numel() else 0.0
    if isinstance(value, dict):
        return sum(touch(item) for item in value.values())
    if isinstance(value, (tuple, list)):
        return sum(touch(item) for item in value)
    return 0.0


# Writer instrumentation ------------------------------------------------------------------------

# What the writer thread calls, by the phase it stands for: (owner, attribute, phase); each is
# wrapped with a timer while `instrument_writer` is active.
def _writer_phase_candidates() -> list[tuple[Any, str, str]]:
    from diffquant.artifacts.location import ArtifactLocation
    from diffquant.artifacts.shard_formats import ShardFormat

    return [
        (writer_module, "tensor_digest", "hash each captured tensor (sha256)"),
        (ShardFormat, "write", "serialize + fsync + rename the shard"),
        (ArtifactLocation, "sha256", "re-read the shard for its sha256"),
        (ArtifactLocation, "write_json", "rewrite manifest.json (atomic, fsync)"),
    ]


WRITER_PHASES = list(dict.fromkeys(label for _, _, label in _writer_phase_candidates()))


@dataclass
class WriterTimes:
    """Wall time of the writer thread: alive, busy (not waiting on its queue), and per phase."""

    alive: float = 0.0
    waiting: float = 0.0
    phases: dict[str, float] = field(default_factory=lambda: {label: 0.0 for label in WRITER_PHASES})
    writer_class: type[CalibrationWriter] = CalibrationWriter

    @property
    def busy(self) -> float:
        return self.alive - self.waiting


class _TimedQueue(queue.Queue):
    def __init__(self, maxsize: int, times: WriterTimes) -> None:
        super().__init__(maxsize=maxsize)
        self.times = times

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        start = time.perf_counter()
        try:
            return super().get(block, timeout)
        finally:
            self.times.waiting += time.perf_counter() - start


def _timed_writer_class(times: WriterTimes) -> type[CalibrationWriter]:
    class TimedCalibrationWriter(CalibrationWriter):
        def __init__(self, out_dir: Path, manifest: dict[str, Any], shard_size_bytes: int, queue_size: int = 16) -> None:
            super().__init__(out_dir, manifest, shard_size_bytes, queue_size)
            self._queue = _TimedQueue(queue_size, times)

        def _run(self) -> None:
            start = time.perf_counter()
            try:
                super()._run()
            finally:
                times.alive += time.perf_counter() - start

    return TimedCalibrationWriter


@contextlib.contextmanager
def instrument_writer() -> Iterator[WriterTimes]:
    """Time the writer thread (alive, waiting on its queue) and its phases (`WRITER_PHASES`);
    meanwhile `calibrate()` uses the timed writer, also found as `times.writer_class`.

    Only for runs whose own duration is not the figure: the timers add a little work per call.
    """
    import diffquant.stages.capture as capture_module

    times = WriterTimes()
    times.writer_class = _timed_writer_class(times)
    candidates = _writer_phase_candidates()
    originals = [(owner, attr, owner.__dict__[attr]) for owner, attr, _ in candidates]

    def timer(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times.phases[label] += time.perf_counter() - start

        return wrapper

    try:
        for owner, attr, label in candidates:
            setattr(owner, attr, timer(label, getattr(owner, attr)))
        capture_module.CalibrationWriter = times.writer_class
        yield times
    finally:
        for owner, attr, original in originals:
            setattr(owner, attr, original)
        capture_module.CalibrationWriter = CalibrationWriter


@contextlib.contextmanager
def preloaded_pipeline(pipe: Any) -> Iterator[None]:
    """Make `calibrate()` use `pipe` instead of loading its own, so load time stays out of the timing."""
    import diffquant.stages.calibrate as calibrate_module

    original = calibrate_module.load_pipeline
    calibrate_module.load_pipeline = lambda preset, device="cpu", **placement: pipe
    try:
        yield
    finally:
        calibrate_module.load_pipeline = original


# Synthetic samples at the real models' shapes -------------------------------------------------


@dataclass(frozen=True)
class SampleLayout:
    """The inputs of one real submodule call: per-step tensors (new every step) and per-prompt ones
    (the same tensor object at every step of a prompt, as the capture hook hands them on)."""

    name: str
    per_step: dict[str, tuple[tuple[int, ...], torch.dtype]]
    per_prompt: dict[str, tuple[tuple[int, ...], torch.dtype]]
    constants: dict[str, Any]


# SDXL base at 1024 px with classifier-free guidance (UNet2DConditionModel.forward).
SDXL_1024 = SampleLayout(
    name="SDXL 1024 px, fp16",
    per_step={"sample": ((2, 4, 128, 128), torch.float16), "timestep": ((), torch.float16)},
    per_prompt={
        "encoder_hidden_states": ((2, 77, 2048), torch.float16),
        "added_cond_kwargs.text_embeds": ((2, 1280), torch.float16),
        "added_cond_kwargs.time_ids": ((2, 6), torch.float16),
    },
    constants={"return_dict": False},
)
# FLUX.1-dev at 1024 px, max_sequence_length 512, guidance-distilled (FluxTransformer2DModel.forward).
FLUX_1024 = SampleLayout(
    name="Flux 1024 px, bf16",
    per_step={"hidden_states": ((1, 4096, 64), torch.bfloat16), "timestep": ((1,), torch.bfloat16)},
    per_prompt={
        "encoder_hidden_states": ((1, 512, 4096), torch.bfloat16),
        "pooled_projections": ((1, 768), torch.bfloat16),
        "img_ids": ((4096, 3), torch.bfloat16),
        "txt_ids": ((512, 3), torch.bfloat16),
        "guidance": ((1,), torch.float32),
    },
    constants={"return_dict": False},
)


def synthetic_samples(layout: SampleLayout, prompts: int, steps: int, seed: int = 0) -> list[CapturedSample]:
    """Captured samples of `layout`, materialised up front so that making them is not timed."""
    return list(iter_synthetic_samples(layout, prompts, steps, seed))


def iter_synthetic_samples(layout: SampleLayout, prompts: int, steps: int, seed: int = 0) -> Iterator[CapturedSample]:
    """Captured samples of `layout`, made one at a time (random values, fixed seed)."""
    generator = torch.Generator().manual_seed(seed)
    for prompt in range(prompts):
        shared = {path: torch.randn(shape, generator=generator, dtype=dtype) for path, (shape, dtype) in layout.per_prompt.items()}
        for step in range(steps):
            fresh = {path: torch.randn(shape, generator=generator, dtype=dtype) for path, (shape, dtype) in layout.per_step.items()}
            yield CapturedSample(prompt, step, float(1000 - step), _nest({**fresh, **shared, **layout.constants}))


def feed_writer(writer: CalibrationWriter, samples: Iterable[CapturedSample]) -> None:
    """Hand `samples` to `writer` as `calibrate()` does (end_prompt at each prompt change), then finish."""
    current = None
    for sample in samples:
        if current is not None and sample.prompt_index != current:
            writer.end_prompt(current)
        current = sample.prompt_index
        writer.add(sample)
    if current is not None:
        writer.end_prompt(current)
    writer.finish()


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        head, _, tail = path.partition(".")
        if tail:
            nested.setdefault(head, {})[tail] = value
        else:
            nested[head] = value
    return nested


def synthetic_manifest(name: str, prompts: int) -> CalibrationManifest:
    """The fields of a calibration manifest that the writer and the reader use."""
    return CalibrationManifest(model={"name": f"synthetic ({name})"}, prompts={"count": prompts}, extra={"synthetic": name})


def write_synthetic_artifact(out: Path, layout: SampleLayout, samples: list[CapturedSample], shard_size_mb: float) -> tuple[dict[str, Any], WriterTimes, float]:
    """Write `samples` through an instrumented CalibrationWriter the way `calibrate()` does;
    returns (manifest, writer times, wall seconds from the first sample to `finish()` returning)."""
    out.mkdir(parents=True, exist_ok=True)
    prompts = len({sample.prompt_index for sample in samples})
    with instrument_writer() as times:
        start = time.perf_counter()
        with times.writer_class(out, synthetic_manifest(layout.name, prompts), int(shard_size_mb * (1 << 20))) as writer:
            feed_writer(writer, samples)
        seconds = time.perf_counter() - start
    return writer.manifest.to_json(), times, seconds


def threads_note() -> str:
    return f"torch threads: {torch.get_num_threads()} (set by the script); logical CPUs: {_cpu_count()}"


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding `path` (from /proc/mounts), e.g. `ext4` or `tmpfs`."""
    resolved = str(Path(path).resolve())
    best, kind = "", "unknown filesystem"
    try:
        with open("/proc/mounts") as handle:
            for line in handle:
                parts = line.split()
                mount = parts[1]
                inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
                if len(parts) > 2 and inside and len(mount) >= len(best):
                    best, kind = mount, parts[2]
    except OSError:
        pass
    return kind


def last_level_cache() -> str:
    """Size of the CPU's largest cache level as sysfs reports it (e.g. `32768K`), or `unknown`."""
    caches = sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"))
    best: tuple[int, str] = (0, "unknown")
    for cache in caches:
        try:
            level = int((cache / "level").read_text())
            size = (cache / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        best = max(best, (level, f"L{level} {size}"))
    return best[1]


def rss_now_mb() -> float:
    return _status_kb("VmRSS") / 1024


def rss_peak_mb() -> float:
    return _status_kb("VmHWM") / 1024


def reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _status_kb(key: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return float(line.split()[1])
    raise OSError(f"/proc/self/status has no {key}")


class RssPoller:
    """Peak RSS sampled every `interval` seconds on a thread (a fallback where VmHWM cannot be reset)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_now_mb())
            time.sleep(self.interval)


# Equal settings against AMD Quark (bench_vs_quark.py, bench_scale.py --quark) -------------------

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "quant"
QUARK_RECIPES = ("int8_weight_only", "int8_w8a8", "w4a16", "w4a4", "fp8", "nvfp4_static")
# The module types Quark 0.13's ModelQuantizer replaces by its Quant* modules
# (quark/torch/quantization/model_transformation.py, LAYER_TO_QUANT_LAYER_MAP); each one diffquant
# does not quantize goes into Quark's `exclude`, so both tools quantize the same layers.
QUARK_LAYER_TYPES: tuple[type[torch.nn.Module], ...] = (
    torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Embedding, torch.nn.EmbeddingBag)


def quark_config(recipe: str, exclude: list[str]) -> Any:
    """Quark's `QConfig` at diffquant's settings for `recipe`: INT8 per-tensor symmetric min_max
    half_even static (weights; and inputs for int8_w8a8), INT4 per-group 64 symmetric (w4a4:
    dynamic INT4 g64 inputs), FP8 E4M3 per-tensor min_max static, Quark's NVFP4 scheme; every
    module named in `exclude` is left float."""
    from quark.torch.quantization.config.config import (FP8E4M3PerTensorSpec, Int4PerGroupSpec, Int8PerTensorSpec, QConfig,
                                                         QLayerConfig)
    from quark.torch.quantization.config.template import FP4Block16ScaleE4M3Scheme

    if recipe == "nvfp4_static":  # Quark's NVFP4: static weights, dynamic E2M1 blocks, static E4M3 per-tensor input scale
        return QConfig(global_quant_config=FP4Block16ScaleE4M3Scheme().config, exclude=exclude)
    fp8 = FP8E4M3PerTensorSpec(observer_method="min_max", is_dynamic=False).to_quantization_spec()
    int8 = Int8PerTensorSpec(observer_method="min_max", symmetric=True, scale_type="float", round_method="half_even",
                             is_dynamic=False).to_quantization_spec()
    int4w = Int4PerGroupSpec(ch_axis=-1, group_size=64, symmetric=True, is_dynamic=False).to_quantization_spec()
    int4x = Int4PerGroupSpec(ch_axis=-1, group_size=64, symmetric=True, is_dynamic=True).to_quantization_spec()
    layer = {"int8_weight_only": QLayerConfig(weight=int8), "int8_w8a8": QLayerConfig(weight=int8, input_tensors=int8),
             "w4a16": QLayerConfig(weight=int4w), "w4a4": QLayerConfig(weight=int4w, input_tensors=int4x),
             "fp8": QLayerConfig(weight=fp8, input_tensors=fp8)}
    if recipe not in layer:
        raise ValueError(f"no Quark configuration for recipe {recipe!r}; known: {', '.join(QUARK_RECIPES)}")
    return QConfig(global_quant_config=layer[recipe], exclude=exclude)


def quark_exclude(model: torch.nn.Module, quantized: Iterable[str]) -> list[str]:
    """The names of every module of `model` of a type Quark quantizes (`QUARK_LAYER_TYPES`) that is
    not in `quantized`: Quark's `exclude` for quantizing exactly the layers diffquant quantized."""
    keep = set(quantized)
    return [name for name, module in model.named_modules() if isinstance(module, QUARK_LAYER_TYPES) and name not in keep]


def quark_layer_names(model: torch.nn.Module) -> list[str]:
    """The modules Quark replaced by a quantized module with a weight quantizer, in model order."""
    from quark.torch.quantization.nn.modules.mixin import QuantMixin

    return [name for name, module in model.named_modules() if isinstance(module, QuantMixin) and module.weight_quantizer is not None]


def check_same_layers(quark: Iterable[str], diffquant: Iterable[str]) -> int:
    """The number of layers, after checking that both tools quantized exactly the same set; raises
    AssertionError naming the layers only one of them quantized."""
    quark_set, diffquant_set = set(quark), set(diffquant)
    if quark_set != diffquant_set:
        only_quark, only_diffquant = sorted(quark_set - diffquant_set), sorted(diffquant_set - quark_set)
        raise AssertionError(f"the tools quantized different layers: {len(only_quark)} by Quark only {only_quark[:5]}, "
                             f"{len(only_diffquant)} by diffquant only {only_diffquant[:5]}")
    return len(quark_set)


# label -> (weight scale_rule, input scale_rule, weight observer); None keeps the shipped recipe's value.
VARIANTS = {
    "diffquant": (None, None, None),
    "diffquant qmax": ("qmax", "qmax", "min_max"),
    "diffquant half_span": ("half_span", "qmax", "min_max"),
    "diffquant half_span w+x": ("half_span", "half_span", "min_max"),
    "diffquant half_span+mse_search": ("half_span", "qmax", "mse_search"),
    "diffquant half_span w+x+mse_search": ("half_span", "half_span", "mse_search"),
}


def _int_inputs_with_a_rule(inputs: dict[str, Any] | None) -> bool:
    """Whether a recipe's input spec is an integer one whose scale rule a variant may set: every
    integer input spec but dynamic int8 (its kernel computes amax / 127), so static INT8 and the
    dynamic INT4 inputs of w4a4."""
    return bool(inputs) and inputs["dtype"].startswith("int") and not (inputs["dtype"] == "int8" and inputs.get("dynamic"))


def variants_for(recipe: str, raw: dict[str, Any]) -> list[str]:
    """The variants that differ for this recipe: integer weights get all, others only the shipped row."""
    weight, inputs = raw["global"]["weight"], raw["global"].get("input")
    if not weight["dtype"].startswith("int"):
        return ["diffquant"]
    labels = [label for label in VARIANTS if _int_inputs_with_a_rule(inputs) or "w+x" not in label]
    if weight["dtype"] == "int8":
        labels = [label for label in labels if "mse_search" not in label]
    return labels


def quark_equal_variant(recipe: str) -> str:
    """The diffquant variant at Quark's scale rule for `recipe`: half_span on the weight, and on
    integer inputs too (Quark's observer divides every symmetric range by (qmax - qmin) / 2)."""
    raw = yaml.safe_load((CONFIGS / f"{recipe}.yaml").read_text())
    return "diffquant half_span w+x" if _int_inputs_with_a_rule(raw["global"].get("input")) else "diffquant half_span"


def diffquant_recipe(recipe: str, variant: str, exclude: list[str] | None = None) -> dict[str, Any]:
    """The shipped recipe `recipe` as a mapping, with the `VARIANTS[variant]` settings and named
    `<recipe>-bench` (`-<variant>` added for a variant); `exclude` given: it replaces the preset's
    exclude patterns."""
    raw = yaml.safe_load((CONFIGS / f"{recipe}.yaml").read_text())
    raw["name"] = f"{recipe}-bench" + ("" if variant == "diffquant" else "-" + variant.removeprefix("diffquant ").replace(" ", "-"))
    if exclude is not None:
        raw.update(exclude=exclude, exclude_mode="replace")
    weight_rule, input_rule, observer = VARIANTS[variant]
    weight, inputs = raw["global"]["weight"], raw["global"].get("input")
    if observer:
        weight["observer"] = observer
    if weight_rule:
        weight["scale_rule"] = weight_rule
    if input_rule and _int_inputs_with_a_rule(inputs):
        inputs["scale_rule"] = input_rule
    return raw


def quark_weight(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(the weight Quark computes with, its scale) of a Quark-quantized layer: the fake-quantized
    weight (float, on the code grid: code x scale) from the layer's own weight quantizer."""
    with torch.no_grad():
        return module.get_quant_weight(module.weight.detach()), module.weight_quantizer.scale.detach()


@dataclass(frozen=True)
class WeightComparison:
    """One layer's weight as Quark and as diffquant quantized it (per-tensor scales).

    differing_codes: elements whose integer codes differ; differing_values: elements whose
    dequantized float32 values differ (bit for bit); tie_distance_max: over the differing codes,
    the largest distance of |w| / quark_scale from the nearest rounding tie k + 0.5 (float64), so
    a value near 0 says every difference is a tie broken differently (None: no difference)."""

    numel: int
    quark_scale: float
    diffquant_scale: float
    same_scale: bool
    differing_codes: int
    max_code_difference: int
    differing_values: int
    tie_distance_max: float | None
    quark_weight_sqnr_db: float
    diffquant_weight_sqnr_db: float


def compare_int_weights(weight: torch.Tensor, quark: torch.Tensor, quark_scale: torch.Tensor, codes: torch.Tensor,
                        scale: torch.Tensor) -> WeightComparison:
    """Compare Quark's fake-quantized `quark` (with per-tensor `quark_scale`) with diffquant's
    integer `codes` and per-tensor `scale` (dequantized as codes x scale in float32, diffquant's
    `dequantize_affine`) for the float `weight`. Quark's codes are quark / quark_scale rounded;
    refused (ValueError) when `quark` is not on that grid."""
    from diffquant.eval.metrics import sqnr_db

    if quark_scale.numel() != 1 or scale.numel() != 1:
        raise ValueError(f"per-tensor scales only, got {quark_scale.numel()} and {scale.numel()} elements")
    if codes.numel() != weight.numel() or quark.numel() != weight.numel():
        raise ValueError(f"weight has {weight.numel()} elements, Quark's {quark.numel()}, diffquant's codes {codes.numel()}")
    weight, quark, codes = weight.reshape(-1), quark.reshape(-1).float(), codes.reshape(-1)
    s_quark, s_diffquant = quark_scale.float().reshape(()), scale.float().reshape(())
    quark_codes = torch.round(quark / s_quark)
    if not torch.equal(quark_codes * s_quark, quark):
        raise ValueError("Quark's weight is not code x scale for its scale: not a per-tensor integer grid")
    dequantized = codes.float() * s_diffquant
    differ = quark_codes.to(torch.int32) != codes.to(torch.int32)
    count = int(differ.sum())
    ties = None
    if count:
        ratio = weight[differ].double().abs() / float(s_quark)
        ties = float((ratio - (torch.floor(ratio) + 0.5)).abs().max())
    max_diff = int((quark_codes[differ].to(torch.int32) - codes[differ].to(torch.int32)).abs().max()) if count else 0
    return WeightComparison(
        numel=weight.numel(), quark_scale=float(s_quark), diffquant_scale=float(s_diffquant),
        same_scale=bool(torch.equal(s_quark, s_diffquant)), differing_codes=count, max_code_difference=max_diff,
        differing_values=int((quark != dequantized).sum()), tie_distance_max=ties,
        quark_weight_sqnr_db=sqnr_db(weight, quark), diffquant_weight_sqnr_db=sqnr_db(weight, dequantized))


def layer_forward(module: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`module`'s float computation (a Linear's, or a zero-padded Conv2d's: its own stride,
    padding, dilation and groups) with `weight` in place of its own and its own bias."""
    bias = module.bias
    if weight.dim() == 2:
        return torch.nn.functional.linear(x, weight, bias)
    if weight.dim() == 4 and getattr(module, "padding_mode", "zeros") == "zeros":
        return torch.nn.functional.conv2d(x, weight, bias, module.stride, module.padding, module.dilation, module.groups)
    raise ValueError(f"{type(module).__name__} with a {weight.dim()}-d weight is neither a Linear nor a zero-padded Conv2d")
